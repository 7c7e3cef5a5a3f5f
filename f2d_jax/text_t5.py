"""Prompts -> token ids for FLUX.1's T5 encoder, and the positions of the tokens that carry "f" and "l".

The tokenizer is FLUX.1's `tokenizer_2` (transformers' T5TokenizerFast: sentencepiece's Unigram model behind
a Metaspace pre-tokenizer). Ids are made as FluxPipeline makes them: padded with <pad> and truncated to
`max_length` (512 for FLUX.1-dev, 256 for schnell), the end-of-sequence token </s> closing the prompt's tokens.
The identifier is the first "f l" in the prompt, by the rule of f2d_jax.text: the words f and l (any case)
apart by white space only ("fl", "f.l", "xf l", "f lx" are not it).
"""
from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path

import numpy as np

from f2d_jax import InputWarning
from f2d_jax.text import CLASS_WORDS, IDENTIFIER, PromptError

MAX_LENGTH = 512   # FluxPipeline's max_sequence_length for FLUX.1-dev
SUBFOLDER = "tokenizer_2"   # the T5 tokenizer of a FLUX pipeline folder
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")

# "f", white space, "l": neither letter touching another letter (digits and punctuation end a word, as CLIP's
# tokenizer splits them off).
_IDENTIFIER = re.compile(r"(?<![^\W\d_])f\s+l(?![^\W\d_])", re.IGNORECASE)


def load_t5_tokenizer(path_or_hub_id, revision: str | None = None):
    """FLUX.1's T5 tokenizer (transformers' AutoTokenizer: T5TokenizerFast) from a tokenizer folder, a FLUX
    pipeline folder (its tokenizer_2/ is read) or a hub id of either (only the tokenizer files are downloaded)."""
    from transformers import AutoTokenizer

    path = Path(os.fspath(path_or_hub_id)).expanduser()
    if not path.is_dir():
        if path.exists():
            raise NotADirectoryError(f"{path} is a file; expected a tokenizer folder or a FLUX pipeline folder")
        path = _download(os.fspath(path_or_hub_id), revision)
    return AutoTokenizer.from_pretrained(path / SUBFOLDER if (path / SUBFOLDER).is_dir() else path)


def _download(name: str, revision: str | None) -> Path:
    import huggingface_hub

    patterns = [f"{prefix}{file}" for prefix in ("", f"{SUBFOLDER}/") for file in _TOKENIZER_FILES]
    try:
        return Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(f"{name!r} is neither a local folder nor a downloadable hub id: {e}") from e


def _carrier(offsets: list[tuple[int, int]], char: int) -> int:
    """The index of the token that carries character `char` of the prompt: the last whose span covers it.

    Sentencepiece's pieces may hold the letter with its word's space marker ("▁f") or after a lone marker
    ("▁", then "f"); the tokenizer aligns that lone "▁" with the character it stands before, so both tokens
    report the letter's span, and the piece holding the letter is the later one. With the marker replacing a
    space ("▁l" spanning " l") the span starts at the space, and again only that token covers the letter.
    """
    covering = [i for i, (start, end) in enumerate(offsets) if start <= char < end]
    if not covering:
        raise PromptError(f"the tokenizer gives no token for character {char} of the prompt")
    return covering[-1]


def t5_identifier_prompts(prompts: str | list[str], tokenizer, max_length: int = MAX_LENGTH
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts containing "f l" -> ((N, max_length) int32 ids, (N, 2) int32 positions of the tokens carrying
    "f" and "l"), the ids as FluxPipeline's `tokenizer_2(prompt, padding="max_length", max_length=max_length,
    truncation=True)` gives them.

    Each letter's token is found from the tokenizer's character offsets (`_carrier`), since T5's pieces do not
    split the same way everywhere: "f l" may be "▁f", "▁l" or "▁", "F", "▁", "L", and punctuation may stand
    between. Raises PromptError for a prompt without the identifier, or one so long that truncation at
    max_length tokens cuts it; warns (InputWarning) for a prompt truncated, or holding the identifier twice.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = t5_token_ids(prompts, tokenizer, max_length)
    positions = []
    for prompt, row in zip(prompts, ids):
        full = tokenizer(prompt, return_offsets_mapping=True)   # untruncated, </s> last
        length = len(full.input_ids) - 1                        # the prompt's tokens
        kept = min(length, max_length - 1)                      # those T5 reads
        found = [(_carrier(full.offset_mapping, m.start()), _carrier(full.offset_mapping, m.end() - 1))
                 for m in _IDENTIFIER.finditer(prompt)]
        if not found:
            raise PromptError(f"the prompt has no identifier {IDENTIFIER!r} (the words f and l, as in "
                              f"'a photo of f l'): {prompt!r}")
        if found[0][1] >= kept:
            raise PromptError(f"the identifier {IDENTIFIER!r} is cut off: the prompt is {length} tokens long and T5 "
                              f"reads only the first {max_length - 1}; move {IDENTIFIER!r} earlier or shorten the "
                              f"prompt: {prompt!r}")
        if length > kept:
            warnings.warn(f"prompt is {length} tokens long; T5 reads only the first {kept}: {prompt!r}",
                          InputWarning, stacklevel=2)
        if any(last < kept for _, last in found[1:]):
            warnings.warn(f"the prompt has the identifier {IDENTIFIER!r} twice; only the first stands for the "
                          f"person, the second is read as the words f and l: {prompt!r}", InputWarning, stacklevel=2)
        assert list(row[:kept]) == full.input_ids[:kept], (prompt, row, full.input_ids)
        positions.append(found[0])
    return ids, np.asarray(positions, np.int32).reshape(len(prompts), 2)


def t5_token_ids(prompts: str | list[str], tokenizer, max_length: int = MAX_LENGTH) -> np.ndarray:
    """(N, max_length) int32 ids of prompts as they are (no identifier), as FluxPipeline makes them."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return np.asarray(tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids,
                      np.int32)


def t5_class_ids(tokenizer) -> tuple[int, int]:
    """The ids of the class words "a person" for T5, one token each: what identity scale 0 writes at the
    tokens carrying "f" and "l"."""
    ids = [tokenizer(word, add_special_tokens=False).input_ids for word in CLASS_WORDS.split()]
    if any(len(i) != 1 for i in ids):
        raise PromptError(f"the T5 tokenizer splits the class words {CLASS_WORDS!r} into {ids}: each must be one token")
    return ids[0][0], ids[1][0]


# The tiny T5 tokenizer's vocabulary: T5's special pieces (<pad> 0, </s> 1, <unk> 2), the word marker, whole words
# of typical prompts with their marker, then single characters (less likely: a known word stays one piece, an
# unknown one is the marker and its letters).
_TINY_WORDS = ("a", "photo", "of", "f", "l", "person", "in", "paris", "portrait", "smiling", "eating", "bread", "the",
               "front", "eiffel", "tower", "an", "oil", "painting", "as", "knight", "fl", "and")


@functools.lru_cache(maxsize=1)
def tiny_t5_tokenizer():
    """The tiny FLUX's T5 tokenizer (a T5TokenizerFast built as T5's: a Unigram model, runs of spaces collapsed,
    the Metaspace pre-tokenizer, "$A </s>" after), made offline: for the tiny random FLUX of tests and demos."""
    import string

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), *((f"▁{w}", -3.0) for w in _TINY_WORDS),
              *((c, -6.0) for c in string.ascii_letters + string.digits + ",.!?'()-")]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Replace(Regex(" {2,}"), " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                             special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=MAX_LENGTH)
