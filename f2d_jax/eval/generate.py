"""`generate`: every reference face x prompt x seed through the JAX pipeline, resumable.

Images land in OUT/images/<face>/<prompt slug>_s<seed>.png and are listed in OUT/manifest.jsonl only
once written, so an interrupted run picks up where it stopped; OUT/settings.json holds the generation
settings, and a second run with other settings is refused rather than mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from f2d_jax.eval.manifest import MANIFEST, SETTINGS, Entry, append_entries, read_manifest
from f2d_jax.eval.prompts import slug
from f2d_jax.faces import NoFaceError, align_face

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# The settings that make an image what it is; a resumed run must have the same ones.
GENERATION_KEYS = ("system", "steps", "guidance_scale", "scheduler", "negative_prompt", "height", "width")


class GenerateError(ValueError):
    """Inputs `generate` cannot use (no faces, faces without a face, a folder of other settings)."""


def reference_faces(directory) -> list[Path]:
    """The image files of `directory` (sorted); their stems name the faces."""
    directory = Path(directory)
    if not directory.is_dir():
        raise GenerateError(f"--faces {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise GenerateError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    stems = [p.stem for p in files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise GenerateError(f"several files in {directory} share a name ({', '.join(clashes)}); the name identifies "
                            "the face, rename them")
    return files


def image_name(prompt: str, seed: int) -> str:
    return f"{slug(prompt)}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}_s{seed}.png"


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    path = out / SETTINGS
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in GENERATION_KEYS
                   if before.get(k) != settings.get(k)]
        if changed:
            raise GenerateError(f"{out} holds images generated with other settings ({'; '.join(changed)}); use "
                                "another --out, or the same settings to resume")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")


def _done(out: Path) -> set:
    if not (out / MANIFEST).is_file():
        return set()
    return {e.key() for e in read_manifest(out)[1] if os.path.isfile(e.image)}


def generate(pipe, faces: Sequence[Path], prompts: Sequence[str], seeds: Sequence[int], out, settings: dict[str, Any],
             batch_size: int = 8, detector=None) -> int:
    """Generates the missing (face, prompt, seed) images into `out`; returns how many it made.

    settings: steps, guidance_scale, scheduler, negative_prompt, height, width (passed to `pipe.sample`)
    and system (the name reports use)."""
    if batch_size < 1:
        raise GenerateError(f"batch size must be at least 1, got {batch_size}")
    out = Path(out)
    aligned, missing = {}, []
    for path in faces:  # every reference is checked before anything is generated
        try:
            aligned[path] = align_face(str(path), detector=detector)
        except NoFaceError:
            missing.append(str(path))
    if missing:
        raise GenerateError(f"no face found in {', '.join(missing)}: use photos with a clear, roughly frontal face")
    _check_settings(out, settings)
    done = _done(out)
    todo = {path: [(i, s) for i, p in enumerate(prompts) for s in seeds if (path.stem, p, s) not in done]
            for path in faces}
    total = sum(map(len, todo.values()))
    sample_args = {k: settings[k] for k in GENERATION_KEYS if k != "system"}
    with tqdm(total=total, desc="generating", unit="image", dynamic_ncols=True) as bar:
        for path, pairs in todo.items():
            if not pairs:
                continue
            context = pipe.encode_prompt(aligned[path], list(prompts))
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                rows, chunk_seeds = np.array([i for i, _ in chunk]), [s for _, s in chunk]
                images = pipe.sample(context[rows], chunk_seeds, progress=False, **sample_args)
                entries = []
                for (i, seed), image in zip(chunk, images):
                    file = out / "images" / path.stem / image_name(prompts[i], seed)
                    file.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(file.with_suffix(".tmp.png"))
                    os.replace(file.with_suffix(".tmp.png"), file)
                    entries.append(Entry(str(file), str(path.resolve()), prompts[i], int(seed), path.stem))
                append_entries(out, entries)
                bar.update(len(chunk))
    return total
