"""What a generated PNG carries in its text chunks, so that it can be made again: `f2d_jax`, JSON with its
prompt and seed, every setting and the weights, and `parameters`, the usual one-paragraph summary.

    {"prompt": "a photo of f l", "seed": 5, "steps": 30, ..., "checkpoint": "/abs/runs/f2d", "step": 5000,
     "weights": {...}}

An image has its own prompt and seed; a grid of several has "prompts" and "seeds".
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import PngImagePlugin


def png_text(prompt: str | Sequence[str], seed: int | Sequence[int], settings: Mapping[str, Any],
             source: Mapping[str, Any]) -> dict[str, str]:
    """The text chunks of an image (`prompt` and `seed`: its own) or a grid (lists of them). `settings`:
    steps, guidance, scheduler, identity_scale, negative_prompt, height, width and any more to record;
    `source`: what names the weights (checkpoint and step, config, model, weights paths)."""
    single = isinstance(prompt, str)
    seeds = [int(seed)] if isinstance(seed, int) else [int(s) for s in seed]
    record = {"prompt": prompt, "seed": seeds[0]} if single else {"prompts": list(prompt), "seeds": seeds}
    if single:
        assert len(seeds) == 1, seeds
    s = settings
    seed_text = str(seeds[0]) if len(seeds) == 1 else \
        f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))
    return {"f2d_jax": json.dumps({**record, **settings, **source}),
            "parameters": f"{prompt if single else ' | '.join(prompt)}\nNegative prompt: {s['negative_prompt'] or ''}\n"
                          f"Steps: {s['steps']}, Sampler: {s['scheduler']}, CFG scale: {s['guidance']}, Seed: "
                          f"{seed_text}, Size: {s['width']}x{s['height']}, Identity scale: {s['identity_scale']}"}


def png_info(text: Mapping[str, str]) -> PngImagePlugin.PngInfo:
    """PIL's `pnginfo=` argument for `Image.save` of a PNG with these text chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info
