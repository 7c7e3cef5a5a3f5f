"""A tiny FLUX.1 text side for tests, made offline: a T5 tokenizer built with the `tokenizers` library and a
randomized transformers T5EncoderModel of `f2d_jax.models.t5.TINY_T5`'s sizes, each saved with save_pretrained.
Needs torch and transformers.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from sd_fixtures import randomize
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from f2d_jax.models.t5 import TINY_T5

SPECIAL = ("<pad>", "</s>", "<unk>")   # ids 0, 1, 2 as in T5's vocabulary
WORDS = ("a", "photo", "of", "f", "l", "person", "in", "paris", "portrait", "smiling", "eating", "bread", "the",
         "front", "eiffel", "tower", "an", "oil", "painting", "as", "knight", "fl", "and")


def tiny_t5_vocabulary() -> list[tuple[str, float]]:
    """(piece, log probability) of the tiny Unigram model: the specials, the word marker "▁", whole words with
    their marker, then single characters (less likely: a known word stays one piece, an unknown one is the
    marker and its letters)."""
    pieces = [(token, 0.0) for token in SPECIAL] + [("▁", -2.0)]
    pieces += [(f"▁{word}", -3.0) for word in WORDS]
    return pieces + [(char, -6.0) for char in string.ascii_letters + string.digits + ",.!?'()-"]


def tiny_t5_tokenizer(folder) -> Path:
    """Write a T5TokenizerFast folder (tokenizer.json, tokenizer_config.json) built as T5's: a Unigram model
    (<pad> 0, </s> 1, <unk> 2), runs of spaces collapsed, the Metaspace pre-tokenizer ("▁" before each word)
    and "$A </s>" after; no sentinel tokens."""
    tokenizer = Tokenizer(Unigram(tiny_t5_vocabulary(), unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                             special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(folder)
    return Path(folder)


def tiny_t5(folder, seed: int = 0, **changes) -> T5EncoderModel:
    """Write a T5EncoderModel of TINY_T5 (with `changes`) with seeded random weights, every norm perturbed, through
    save_pretrained (model.safetensors); returns the model."""
    torch.manual_seed(seed)
    model = randomize(T5EncoderModel(T5Config(**{**TINY_T5, **changes})), seed)
    model.save_pretrained(folder)
    return model
