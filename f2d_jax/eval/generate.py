"""`generate`: every reference face x prompt x seed through the JAX pipeline, resumable.

Images land in OUT/images/<face>/<prompt slug>_s<seed>_scale<identity scale>.png and are listed in
OUT/manifest.jsonl only once written, so an interrupted run picks up where it stopped; OUT/settings.json
holds the generation settings, and a second run with other settings (another generator: config,
checkpoint step, weights; or other sampling settings) is refused rather than mixed in. The identity
scales are the exception: an image's scale is in its manifest line and its name, so a run with another
list of scales adds the images of the scales the folder lacks, and settings.json lists every scale
made. A folder made before the scales existed holds scale 1.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from f2d_jax.eval.manifest import MANIFEST, SETTINGS, Entry, append_entries, identity_scales, read_manifest
from f2d_jax.eval.prompts import slug
from f2d_jax.faces import AlignedFace, NoFaceError, align_face
from f2d_jax.sampling import check_identity_scale, check_sampling
from f2d_jax.sampling.metadata import png_info, png_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# The settings that make an image what it is; a resumed run must have the same ones. The generator:
GENERATOR_KEYS = ("system", "config", "checkpoint", "step", "weights")
# and how it samples (`pipe.sample`'s arguments):
SAMPLING_KEYS = ("steps", "guidance_scale", "scheduler", "negative_prompt", "height", "width")
BASE_DEFAULTS = ("guidance_scale", "scheduler")  # None: the base's, known once the model has loaded


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


def image_name(prompt: str, seed: int, identity_scale: float) -> str:
    return f"{slug(prompt)}-{hashlib.sha1(prompt.encode()).hexdigest()[:6]}_s{seed}_scale{float(identity_scale)!r}.png"


def parse_identity_scales(text: str) -> list[float]:
    """'0.6,0.8,1.0' -> [0.6, 0.8, 1.0]; a ValueError for a scale that is not a number, negative, not
    finite or repeated."""
    try:
        scales = [float(part) for part in text.split(",")]
    except ValueError:
        raise GenerateError(f"--identity-scale takes numbers separated by commas (such as 0.6,0.8,1.0), "
                            f"got {text!r}") from None
    for scale in scales:
        check_identity_scale(scale)
    if len(set(scales)) < len(scales):
        raise GenerateError(f"--identity-scale names a scale twice: {text}")
    return scales


def align_references(directory, detector=None) -> dict[Path, AlignedFace]:
    """{photo: its aligned face} for `reference_faces(directory)`; a GenerateError names every photo
    without a face."""
    aligned, missing = {}, []
    for path in reference_faces(directory):
        try:
            aligned[path] = align_face(str(path), detector=detector)
        except NoFaceError:
            missing.append(str(path))
    if missing:
        raise GenerateError(f"no face found in {', '.join(missing)}: use photos with a clear, roughly frontal face")
    return aligned


def _compared(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resume compares, a dict's entries as `key.entry` (weights.msid)."""
    compared = {}
    for key in GENERATOR_KEYS + SAMPLING_KEYS:
        value = settings.get(key)
        compared.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return compared


def check_resume(out, settings: dict[str, Any]) -> None:
    """A GenerateError naming what changed if `out` holds images generated with other settings. A sampling
    setting that is None (the base's default, known once the model has loaded) is not compared."""
    path = Path(out) / SETTINGS
    if not path.is_file():
        return
    before, now = _compared(json.loads(path.read_text())), _compared(settings)
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in dict.fromkeys([*before, *now])
               if before.get(k) != now.get(k) and not (k in BASE_DEFAULTS and now.get(k) is None)]
    if changed:
        raise GenerateError(f"{out} holds images generated with other settings ({'; '.join(changed)}); use "
                            "another --out, or the same settings to resume")


def _write_settings(out: Path, settings: dict[str, Any]) -> None:
    """settings.json: the first run's settings, with every identity scale of the runs so far."""
    check_resume(out, settings)
    path = out / SETTINGS
    before = json.loads(path.read_text()) if path.is_file() else settings
    scales = sorted({*identity_scales(before), *identity_scales(settings)})
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**before, "identity_scales": scales}, indent=2) + "\n")


def _done(out: Path) -> set:
    if not (out / MANIFEST).is_file():
        return set()
    return {e.key() for e in read_manifest(out)[1] if os.path.isfile(e.image)}


def generate(pipe, faces: Mapping[Path, AlignedFace], prompts: Sequence[str], seeds: Sequence[int], out,
             settings: dict[str, Any], batch_size: int = 8) -> int:
    """Generates the missing (face, prompt, seed, identity scale) images into `out`; returns how many it made.

    faces: `align_references`'s. settings: steps, guidance_scale, scheduler, negative_prompt, height,
    width (passed to `pipe.sample`), identity_scales (default [1.0]), system (the name reports use) and
    what names the generator (config, checkpoint, step, weights: compared on resuming, not used here)."""
    check_sampling(settings["steps"], settings["guidance_scale"], settings["scheduler"], batch_size)
    out = Path(out)
    _write_settings(out, settings)
    done = _done(out)
    todo = {(path, scale): [(i, s) for i, p in enumerate(prompts) for s in seeds
                            if (path.stem, p, s, scale) not in done]
            for path in faces for scale in identity_scales(settings)}
    total = sum(map(len, todo.values()))
    sample_args = {k: settings[k] for k in SAMPLING_KEYS}
    source = {k: settings.get(k) for k in GENERATOR_KEYS}
    recorded = dict(steps=settings["steps"], guidance=settings["guidance_scale"], scheduler=settings["scheduler"],
                    negative_prompt=settings["negative_prompt"], height=settings["height"], width=settings["width"])
    with tqdm(total=total, desc="generating", unit="image", dynamic_ncols=True) as bar:
        for (path, scale), pairs in todo.items():
            if not pairs:
                continue
            conditioning = pipe.encode_prompt(faces[path], list(prompts), identity_scale=scale)
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                rows, chunk_seeds = np.array([i for i, _ in chunk]), [s for _, s in chunk]
                images = pipe.sample({k: np.asarray(v)[rows] for k, v in conditioning.items()}, chunk_seeds, progress=False, batch_size=batch_size,
                                     **sample_args)
                entries = []
                for (i, seed), image in zip(chunk, images):
                    file = out / "images" / path.stem / image_name(prompts[i], seed, scale)
                    file.parent.mkdir(parents=True, exist_ok=True)
                    text = png_text(prompts[i], seed, {"face": str(path.resolve()), **recorded,
                                                       "identity_scale": scale}, source)
                    Image.fromarray(image).save(file.with_suffix(".tmp.png"), pnginfo=png_info(text))
                    os.replace(file.with_suffix(".tmp.png"), file)
                    entries.append(Entry(str(file), str(path.resolve()), prompts[i], int(seed), path.stem, scale))
                append_entries(out, entries)
                bar.update(len(chunk))
    return total
