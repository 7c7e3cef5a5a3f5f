"""`score`: identity fidelity and text fidelity of a folder of generated images (any system's), per image
and aggregated per prompt, per face, per identity scale and overall.

    identity   cosine between the reference face and the largest face found in the image, per recognizer;
               an image without a detectable face is a failure: it counts as 0 in `mean` and is left out
               of `detected_mean`, and the failure rate is reported
    text       CLIP score of the image and the prompt with "f l" replaced by "a person"
    hmean/gmean  harmonic / geometric mean of text and the primary recognizer's identity (negatives as 0)
    diversity  spread of the generated faces over seeds: the mean pairwise distance between their 68
               landmarks (centred, in units of the eye distance; pose and expression, no identity
               embedding), averaged over (face, prompt, identity scale) groups
"""
from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from f2d_jax.eval.manifest import Entry
from f2d_jax.eval.prompts import neutral_prompt
from f2d_jax.eval.recognizers import cosine
from f2d_jax.faces import AlignedFace, NoFaceError, align_face, load_image


class ScoreError(ValueError):
    """Generated images or references that cannot be scored."""


def _detect(image: np.ndarray, detector) -> AlignedFace | None:
    with warnings.catch_warnings():  # several faces: the largest is the one scored
        warnings.simplefilter("ignore")
        try:
            return align_face(image, detector=detector)
        except NoFaceError:
            return None


def normalized_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """(68, 2) landmarks centred on their mean, in units of the distance between the eye centres."""
    eyes = np.linalg.norm(landmarks[36:42].mean(0) - landmarks[42:48].mean(0))
    return (landmarks - landmarks.mean(0)) / max(eyes, 1e-6)


def landmark_spread(landmarks: Sequence[np.ndarray]) -> float | None:
    """Mean over pairs of the mean point distance between normalized landmark sets (None for < 2 faces)."""
    shapes = [normalized_landmarks(lm) for lm in landmarks]
    pairs = [np.linalg.norm(a - b, axis=-1).mean() for a, b in itertools.combinations(shapes, 2)]
    return float(np.mean(pairs)) if pairs else None


def hmean(a: float, b: float) -> float:
    a, b = max(a, 0.0), max(b, 0.0)
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def gmean(a: float, b: float) -> float:
    return float(np.sqrt(max(a, 0.0) * max(b, 0.0)))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _group(record: Mapping[str, Any]) -> tuple[str, str, float]:
    """The images whose landmark spread is a diversity: one face, prompt and identity scale, over seeds."""
    return record["face_id"], record["prompt"], record["identity_scale"]


def summarize(records: Sequence[Mapping[str, Any]], recognizers: Sequence[str], primary: str,
              spreads: Mapping[tuple[str, str], float | None]) -> dict[str, Any]:
    """The aggregate of per-image records (and the landmark spreads of their (face, prompt) groups)."""
    found = [r["face_found"] for r in records]
    identity = {name: {"mean": float(np.mean([r["identity"][name] or 0.0 for r in records])),
                       "detected_mean": _mean(r["identity"][name] for r in records)} for name in recognizers}
    text = float(np.mean([r["clip_score"] for r in records]))
    main = identity[primary]["mean"] if primary else 0.0
    groups = {_group(r) for r in records}
    return {"images": len(records), "faces": len({r["face_id"] for r in records}),
            "prompts": len({r["prompt"] for r in records}), "no_face_rate": 1.0 - float(np.mean(found)),
            "clip_score": text, "identity": identity, "hmean": hmean(main, text), "gmean": gmean(main, text),
            "diversity": _mean(spreads[g] for g in groups)}


def score_images(entries: Sequence[Entry], clip, recognizers: Mapping[str, Callable], primary: str | None = None,
                 detector=None, batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Scores every image of `entries`; returns {"overall", "per_prompt", "per_face", "per_scale", "images",
    ...} ("per_scale": by identity scale).

    recognizers: name -> recognizer (see recognizers.py); primary: the one hmean/gmean use (default: the
    first). detector: the landmark detector (default dlib's)."""
    names = list(recognizers)
    primary = primary or (names[0] if names else "")
    if primary and primary not in recognizers:
        raise ScoreError(f"primary recognizer {primary!r} is not among those scored ({', '.join(names)})")
    references = {}
    for path in sorted({e.face for e in entries}):
        try:
            image = load_image(path)[0]  # read once: detection and the recognizers use it
            face = align_face(image, detector=detector)
        except NoFaceError as e:
            raise ScoreError(f"no face found in the reference photo {path}") from e
        except (FileNotFoundError, ValueError) as e:
            raise ScoreError(f"reference face {path}: {e}") from e
        references[path] = {n: recognizers[n]([face], [image])[0] for n in names}
    records, landmarks = [], defaultdict(list)
    for start in tqdm(range(0, len(entries), batch_size), desc="scoring", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        chunk = entries[start:start + batch_size]
        try:
            images = [load_image(e.image)[0] for e in chunk]
        except (FileNotFoundError, ValueError) as e:
            raise ScoreError(f"the manifest lists an image that cannot be read: {e}") from e
        faces = [_detect(image, detector) for image in images]
        texts = clip.scores(images, [neutral_prompt(e.prompt) for e in chunk])
        detected = [i for i, f in enumerate(faces) if f is not None]
        identity = {n: dict(zip(detected, cosine(recognizers[n]([faces[i] for i in detected],
                                                                [images[i] for i in detected]),
                                                 np.stack([references[chunk[i].face][n] for i in detected]))))
                    if detected else {} for n in names}
        for i, entry in enumerate(chunk):
            records.append({"image": entry.image, "face": entry.face, "face_id": entry.face_id,
                            "prompt": entry.prompt, "seed": entry.seed, "identity_scale": entry.identity_scale,
                            "face_found": faces[i] is not None,
                            "identity": {n: float(identity[n][i]) if i in identity[n] else None for n in names},
                            "clip_score": float(texts[i])})
            if faces[i] is not None:
                landmarks[_group(records[-1])].append(faces[i].landmarks)
    groups = {_group(r) for r in records}
    spreads = {g: landmark_spread(landmarks[g]) for g in groups}
    by = lambda key: {value: summarize([r for r in records if r[key] == value], names, primary, spreads)  # noqa: E731
                      for value in dict.fromkeys(r[key] for r in records)}
    return {"recognizers": names, "primary": primary, "clip_model": clip.name,
            "overall": summarize(records, names, primary, spreads), "per_prompt": by("prompt"),
            "per_face": by("face_id"), "per_scale": by("identity_scale"), "images": records}
