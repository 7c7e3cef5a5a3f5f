"""Reading a prepared dataset: random access to stacked numpy batches, without TensorFlow.

    data = open_prepared("data/ffhq", split="train", fields=("identity", "expression", "latent_moments", "mask"))
    len(data), data.info["resolution"]
    batch = data.get([3, 17, 42])        # {"identity": (3, F), ..., "mask": (3, R, R, 1)}

A dataset is finished when DATA_DIR/f2d_faces.json exists: prepare writes it only after tfds
has renamed its finished folder into place. Image fields that are not requested are not
decoded (reading cached features never decodes the PNGs).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from f2d_jax.data.masks import latent_mask  # noqa: F401  (part of the reading API)

INFO_FILE = "f2d_faces.json"
FORMAT = 1
IMAGE_FIELDS = ("image", "mask", "face", "expression_face")
BASE_FIELDS = (*IMAGE_FIELDS, "landmarks", "name")
FEATURE_FIELDS = ("identity", "expression", "latent_moments")
EXPRESSION_DIM = 64   # Deep3DFaceRecon's expression coefficients
_PREPARE = "f2d-prepare"


def feature_description(config) -> dict[str, Any]:
    """What identifies cached features made with `config`: the encoders' sizes and weight
    sources (and the seed when some models are random-init). Stored in the dataset's JSON."""
    weights = {name: str(config.weights[name]) for name in ("sd", "msid", "expression")}
    description = {"msid": _jsonable(config.model.msid.to_dict()),
                   "expression": _jsonable(config.model.expression.to_dict()),
                   "weights": weights}
    if not all(weights.values()):
        description["seed"] = int(config.seed)
    return description


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def read_info(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a finished dataset; FileNotFoundError when there is none (never prepared,
    or its preparation has not finished)."""
    data_dir = Path(data_dir)
    path = data_dir / INFO_FILE
    if not path.is_file():
        if not data_dir.is_dir():
            raise FileNotFoundError(f"no prepared dataset at {data_dir}: the folder does not exist; "
                                    f"make one with {_PREPARE} --images DIR --out {data_dir}")
        raise FileNotFoundError(
            f"no finished dataset at {data_dir}: {INFO_FILE} is missing, so its preparation never ran or did not "
            f"finish; run {_PREPARE} with the same arguments to resume it")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileNotFoundError(f"{path} is not valid JSON ({e}); prepare the dataset again with --overwrite") from e
    if info.get("format") != FORMAT:
        raise ValueError(f"{path} has format {info.get('format')!r}; this version of f2d_jax reads format {FORMAT}")
    return info


def compatibility_problems(info: dict[str, Any], config) -> list[str]:
    """Why a dataset does not fit `config` (empty list: it fits): resolution, mask source and,
    when features are cached, the encoders' sizes and weights."""
    problems = []
    if info["resolution"] != config.data.resolution:
        problems.append(f"resolution: dataset {info['resolution']}, config.data.resolution {config.data.resolution}")
    if info["mask_source"] != config.data.mask_source:
        problems.append(f"mask source: dataset {info['mask_source']!r}, config.data.mask_source "
                        f"{config.data.mask_source!r}")
    if info.get("features_cached"):
        want, have = feature_description(config), info["features"]
        for key in sorted(set(want) | set(have)):
            if want.get(key) != have.get(key):
                problems.append(f"cached features {key}: dataset {have.get(key)!r}, config {want.get(key)!r}")
    return problems


def read_records(source, indices, split: str) -> list:
    """The records at `indices` (a sequence of ints) of a tfds data source (one split, named `split`
    in the IndexError an index out of range gets)."""
    indices = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
    n = len(source)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise IndexError(f"indices {bad[:5]} out of range for {n} {split} examples")
    return source.__getitems__(indices) if indices else []


class PreparedData:
    """One split of a prepared dataset: `len()`, `get(indices)` and the dataset's `info`.

    `fields` (default: all stored fields) are the arrays `get` returns. Batches are stacked:
    images uint8 (B, H, W, C) (masks (B, R, R, 1)), landmarks (B, 68, 2) float32, names a
    (B,) str array, cached features float32.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", fields: Optional[Sequence[str]] = None):
        import tensorflow_datasets as tfds

        self.data_dir = Path(data_dir)
        self.info = read_info(self.data_dir)
        folder = self.data_dir / self.info["tfds_dir"]
        if not (folder / "dataset_info.json").is_file():
            raise FileNotFoundError(f"{self.data_dir / INFO_FILE} names {folder}, which holds no finished "
                                    f"tfds dataset; prepare the dataset again with --overwrite")
        available = tuple(self.info["fields"])
        self.fields = available if fields is None else tuple(fields)
        unknown = [f for f in self.fields if f not in available]
        if unknown:
            hint = (" (features were not cached: prepare with --cache-features)"
                    if set(unknown) & set(FEATURE_FIELDS) and not self.info["features_cached"] else "")
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; this dataset has {', '.join(available)}{hint}")
        if split not in self.info["splits"]:
            raise ValueError(f"no split {split!r} in {self.data_dir}; it has {', '.join(self.info['splits'])}")
        self.split = split
        builder = tfds.builder_from_directory(os.fspath(folder))
        decoders = {name: tfds.decode.SkipDecoding() for name in IMAGE_FIELDS if name not in self.fields}
        self._source = builder.as_data_source(split, decoders=decoders or None)
        if len(self._source) != self.info["splits"][split]:
            raise FileNotFoundError(f"{folder} has {len(self._source)} {split} examples but {INFO_FILE} says "
                                    f"{self.info['splits'][split]}; prepare the dataset again with --overwrite")

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"PreparedData({os.fspath(self.data_dir)!r}, split={self.split!r}, {len(self)} examples)"

    def get(self, indices) -> dict[str, np.ndarray]:
        """The examples at `indices` (a sequence of ints), stacked per requested field."""
        records = read_records(self._source, indices, self.split)
        out = {}
        for field in self.fields:
            values = [r[field] for r in records]
            if field == "name":
                out[field] = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=str)
            elif values:
                out[field] = np.stack(values)
            else:
                out[field] = np.zeros((0, *self._shape(field)), self._dtype(field))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One example (unbatched)."""
        return {k: v[0] for k, v in self.get([index]).items()}

    def _shape(self, field: str) -> tuple[int, ...]:
        r = self.info["resolution"]
        return {"image": (r, r, 3), "mask": (r, r, 1), "face": (112, 112, 3), "expression_face": (224, 224, 3),
                "landmarks": (68, 2), "identity": (self.info["identity_dim"],),
                "expression": (self.info["expression_dim"],),
                "latent_moments": tuple(self.info["latent_shape"] or ())}[field]

    @staticmethod
    def _dtype(field: str):
        return np.uint8 if field in IMAGE_FIELDS else np.float32


def open_prepared(data_dir: str | os.PathLike, split: str = "train",
                  fields: Optional[Sequence[str]] = None) -> PreparedData:
    """A split of the dataset prepared in `data_dir` (see `PreparedData`).

    FileNotFoundError when there is no finished dataset there; ValueError for an unknown split
    or field.
    """
    return PreparedData(data_dir, split, fields)
