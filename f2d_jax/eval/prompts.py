"""The evaluation prompts: a text file with one prompt per line, each containing the identifier "f l"."""
from __future__ import annotations

import os
import re
from importlib import resources

from f2d_jax.text import CLASS_WORDS, IDENTIFIER, PromptError

DEFAULT_PROMPTS = "eval_prompts.txt"
NEUTRAL = CLASS_WORDS
_IDENTIFIER = re.compile(r"\bf l\b")


def load_prompts(path: str | os.PathLike | None = None) -> list[str]:
    """The prompts of `path` (default: the 40 shipped with the package); blank lines and lines starting
    with # are skipped. Raises PromptError for a prompt without "f l" and for duplicates."""
    if path is None:
        text = resources.files("f2d_jax").joinpath(f"assets/{DEFAULT_PROMPTS}").read_text()
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no prompt file at {path}")
        text = open(path, encoding="utf-8").read()
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise PromptError(f"{path} has no prompts (one per line, each with {IDENTIFIER!r})")
    for number, prompt in enumerate(prompts, 1):
        if not _IDENTIFIER.search(prompt):
            raise PromptError(f"prompt {number} has no identifier {IDENTIFIER!r}: {prompt!r}")
    duplicates = sorted({p for p in prompts if prompts.count(p) > 1})
    if duplicates:
        raise PromptError(f"duplicate prompts: {duplicates}")
    return prompts


def slug(prompt: str) -> str:
    """A file-name form of a prompt (lower case, runs of other characters as _, at most 48)."""
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:48]


def neutral_prompt(prompt: str) -> str:
    """The prompt the CLIP score reads: the identifier replaced by "a person"."""
    return _IDENTIFIER.sub(NEUTRAL, prompt)
