"""What a generated PNG carries in its text chunks, so that it can be made again: `f2d_jax`, JSON with its
prompt and seed, every setting and the weights, and `parameters`, the usual one-paragraph summary.

    {"prompt": "a photo of f l", "seed": 5, "steps": 30, ..., "checkpoint": "/abs/runs/f2d", "step": 5000,
     "weights": {...}}

An image has its own prompt and seed; a grid of several (`grid`) has "prompts" and "seeds".
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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


def weights_source(args, pipe) -> dict[str, Any]:
    """What names the weights of images `pipe` made, as their PNG metadata records it, from the weights options
    of f2d-sample and the web app (`args`, f2d_jax.cli.add_weights): --checkpoint (absolute) and its step,
    --config (a name, or a file's absolute path), --model (absolute), and the weights paths (local ones
    absolute)."""
    def absolute(path: str) -> str:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    source = dict(checkpoint=absolute(args.checkpoint), step=pipe.checkpoint[1] if pipe.checkpoint else None,
                  config=absolute(args.config), model=absolute(args.model))
    weights = pipe.config.weights if pipe.config is not None else {}
    return {**source, "weights": {name: absolute(path) for name, path in weights.items()} or None}


def grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(N, H, W, 3) -> one (rows * H, cols * W, 3) image."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    canvas = np.zeros((rows * cols, h, w, c), images.dtype)
    canvas[:n] = images
    return canvas.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
