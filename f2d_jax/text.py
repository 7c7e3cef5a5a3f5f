"""Prompts -> token ids for the CLIP text encoder, and the position of the identifier "f l".

The tokenizer is Stable Diffusion v1's CLIP BPE tokenizer (transformers' CLIPTokenizer),
built from the vocabulary file shipped in this package unless a tokenizer directory is given.
Ids follow the official code: tokenize with truncation to 77 (start and end tokens included),
then pad with the tokenizer's pad token; the identifier position is that of the first "f"
that is followed by "l".
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from f2d_jax import InputWarning

MAX_LENGTH = 77
IDENTIFIER = "f l"
CLASS_WORDS = "a person"  # the identifier's words in the class prompt "a photo of a person"


class PromptError(ValueError):
    """A prompt the model cannot use (no identifier, identifier cut off by truncation)."""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) byte -> printable character table: the printable Latin-1 bytes map to themselves,
    the other bytes to the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def _bpe_files(directory: Path) -> tuple[Path, Path]:
    """Write Hugging Face's vocab.json/merges.txt from OpenAI's bpe_simple_vocab_16e6.txt.gz."""
    with resources.files("f2d_jax").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the merge list, after the version line
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory / "vocab.json", directory / "merges.txt"


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str | None = None):
    """The CLIP tokenizer: SD v1's from the bundled vocabulary, or from a directory / hub id.

    `path` may be a tokenizer directory, a diffusers model directory (its `tokenizer/`
    subfolder is used) or a hub id.
    """
    from transformers import CLIPTokenizer

    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            vocab, merges = _bpe_files(Path(tmp))
            return CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>", model_max_length=MAX_LENGTH)
    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "tokenizer")):
        return CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    return CLIPTokenizer.from_pretrained(path)


def _ids(tokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """(truncated ids with start/end tokens, the untruncated ones)."""
    content = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(prompt))
    full = [tokenizer.bos_token_id, *content, tokenizer.eos_token_id]
    return full[:MAX_LENGTH - 1] + [tokenizer.eos_token_id] if len(full) > MAX_LENGTH else full, full


def _pad(ids: list[int], tokenizer) -> list[int]:
    return ids + [tokenizer.pad_token_id] * (MAX_LENGTH - len(ids))


def _find(ids: list[int], first: int, last: int) -> int:
    return next((i for i in range(len(ids) - 1) if ids[i] == first and ids[i + 1] == last), -1)


def token_ids(prompts: str | list[str], tokenizer=None) -> np.ndarray:
    """(N, 77) int32 ids, truncated and padded as Stable Diffusion pipelines do."""
    tokenizer = tokenizer or load_tokenizer()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    rows = []
    for prompt in prompts:
        ids, full = _ids(tokenizer, prompt)
        if len(full) > MAX_LENGTH:
            warnings.warn(f"prompt is {len(full) - 2} tokens long; CLIP reads only the first {MAX_LENGTH - 2}: "
                          f"{prompt!r}", InputWarning, stacklevel=2)
        rows.append(_pad(ids, tokenizer))
    return np.asarray(rows, np.int32)


def word_ids(words: str, tokenizer=None) -> tuple[int, ...]:
    """Token ids of the words of `words`, each a single token."""
    tokenizer = tokenizer or load_tokenizer()
    ids = [tokenizer(word).input_ids[1:-1] for word in words.split()]
    assert all(len(i) == 1 for i in ids), f"{words!r}: every word must be one token"
    return tuple(i[0] for i in ids)


def identifier_ids(tokenizer=None) -> tuple[int, int]:
    """Token ids of the identifier's two words (SD v1: "f" = 325, "l" = 331)."""
    return word_ids(IDENTIFIER, tokenizer)


def class_ids(tokenizer=None) -> tuple[int, int]:
    """Token ids of the class words that stand where the identifier stands in CGDR's class prompt
    (SD v1: "a" = 320, "person" = 2533)."""
    return word_ids(CLASS_WORDS, tokenizer)


def identifier_prompts(prompts: str | list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """Prompts containing "f l" -> ((N, 77) int32 ids, (N,) int32 positions of "f").

    Raises PromptError for a prompt without the identifier, or one so long that truncation
    at 77 tokens cuts it.
    """
    tokenizer = tokenizer or load_tokenizer()
    first, last = identifier_ids(tokenizer)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = token_ids(prompts, tokenizer)
    positions = []
    for prompt, row in zip(prompts, ids):
        position = _find(list(row), first, last)
        if position < 0:
            full = _ids(tokenizer, prompt)[1]
            if _find(full, first, last) >= 0:
                raise PromptError(f"the identifier {IDENTIFIER!r} is cut off: the prompt is {len(full) - 2} tokens "
                                  f"long and CLIP reads only the first {MAX_LENGTH - 2}; move {IDENTIFIER!r} earlier "
                                  f"or shorten the prompt: {prompt!r}")
            raise PromptError(f"the prompt has no identifier {IDENTIFIER!r} (the words f and l, as in "
                              f"'a photo of f l'): {prompt!r}")
        if _find(list(row[position + 2:]), first, last) >= 0:
            warnings.warn(f"the prompt has the identifier {IDENTIFIER!r} twice; only the first stands for the "
                          f"person, the second is read as the words f and l: {prompt!r}", InputWarning, stacklevel=2)
        positions.append(position)
    return ids, np.asarray(positions, np.int32)
