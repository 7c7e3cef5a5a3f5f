"""The manifest of a folder of generated images, written by `generate` and read by `score`.

    DIR/manifest.jsonl   one JSON object per image:
                         {"image": "images/obama/03_s0.png",   # relative to DIR (or absolute)
                          "face": "/data/faces/obama.jpg",     # the reference photo (absolute or relative to DIR)
                          "prompt": "f l looking shocked",     # with the identifier "f l"
                          "seed": 0,                           # optional
                          "face_id": "obama",                  # optional, default: the reference file's stem
                          "identity_scale": 0.6}               # optional, default 1 (generate's --identity-scale)
    DIR/settings.json    optional: how the images were made ({"system": name, "identity_scales": [...], ...})

Any system's outputs can be scored: write one line per image with at least image, face and prompt.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
REQUIRED = ("image", "face", "prompt")
DEFAULT_IDENTITY_SCALE = 1.0  # what the images of a folder without identity scales were made with


_text = (lambda v: isinstance(v, str) and bool(v), "a non-empty string")
# What each key of a line holds (seed may be null; identity_scale as generate's --identity-scale).
FIELDS = {"image": _text, "face": _text, "prompt": (lambda v: isinstance(v, str), "a string"),
          "face_id": (lambda v: isinstance(v, str), "a string"),
          "seed": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "a whole number or null"),
          "identity_scale": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             and v >= 0, "a finite number of at least 0")}


class ManifestError(ValueError):
    """A generated-images folder without a usable manifest."""


@dataclasses.dataclass(frozen=True)
class Entry:
    image: str
    face: str
    prompt: str
    seed: int | None = None
    face_id: str = ""
    identity_scale: float = DEFAULT_IDENTITY_SCALE

    def __post_init__(self):
        if not self.face_id:
            object.__setattr__(self, "face_id", Path(self.face).stem)

    def key(self) -> tuple[str, str, int | None, float]:
        return self.face_id, self.prompt, self.seed, self.identity_scale


def _resolve(directory: Path, path: str) -> str:
    return str(path if os.path.isabs(path) else directory / path)


def read_manifest(directory) -> tuple[dict[str, Any], list[Entry]]:
    """(settings, entries) of a generated-images folder, paths resolved against it."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}: `f2d-eval generate` writes it; for other "
                            f"systems' images write one JSON line per image with the keys {', '.join(REQUIRED)} "
                            "(see f2d_jax/eval/manifest.py)")
    entries = {}  # by image path: a line for an image made again replaces the earlier one
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path} line {number} is not JSON: {e}") from e
        missing = [k for k in REQUIRED if k not in row] if isinstance(row, dict) else list(REQUIRED)
        if missing:
            raise ManifestError(f"{path} line {number} lacks {', '.join(missing)} (each line needs "
                                f"{', '.join(REQUIRED)})")
        wrong = [f"{key}={row[key]!r} ({what})" for key, (ok, what) in FIELDS.items()
                 if key in row and not ok(row[key])]
        if wrong:
            raise ManifestError(f"{path} line {number}: {'; '.join(wrong)}")
        entry = Entry(_resolve(directory, row["image"]), _resolve(directory, row["face"]), row["prompt"],
                      row.get("seed"), row.get("face_id", ""),
                      float(row.get("identity_scale", DEFAULT_IDENTITY_SCALE)))
        entries[entry.image] = entry
    if not entries:
        raise ManifestError(f"{path} lists no images")
    settings_path = directory / SETTINGS
    try:
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ManifestError(f"{settings_path} is not JSON: {e}") from None
    if not isinstance(settings, dict):
        raise ManifestError(f"{settings_path} holds {type(settings).__name__}, not a JSON object of settings")
    return settings, list(entries.values())


def identity_scales(settings: dict[str, Any]) -> list[float]:
    """The identity scales a folder's settings name (a folder made before the sweeps: the default)."""
    return [float(s) for s in settings.get("identity_scales", [DEFAULT_IDENTITY_SCALE])]


def append_entries(directory, entries: Iterable[Entry]) -> None:
    """Adds lines for images already written (so an interrupted run lists only finished images)."""
    directory = Path(directory)
    with open(directory / MANIFEST, "a") as f:
        for entry in entries:
            row = dataclasses.asdict(entry)
            row["image"] = os.path.relpath(entry.image, directory)
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
