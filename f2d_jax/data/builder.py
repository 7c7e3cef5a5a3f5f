"""The tfds builder that writes prepared datasets: `f2d_faces` 1.0.0, array_record files.

Writing needs TensorFlow (tfds' example serialization); reading does not (see `read.py`).
Images reach the builder already PNG-encoded, so tfds stores the bytes as they are.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "f2d_faces"
VERSION = "1.0.0"
INSTALL_HINT = "pip install 'f2d-jax[data]'"
FILE_FORMAT = "array_record"


class MissingTensorFlowError(ImportError):
    """TensorFlow, needed to write a dataset, is not installed."""


def require_tensorflow() -> None:
    """Raises MissingTensorFlowError (an ImportError naming the install command) when TensorFlow
    cannot be imported."""
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        raise MissingTensorFlowError(
            f"writing a dataset needs TensorFlow, which is not installed; run: {INSTALL_HINT}") from e


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """The shapes of a prepared dataset. Without cached features, identity_dim and latent_shape are None."""

    resolution: int
    identity_dim: Optional[int] = None
    expression_dim: Optional[int] = None
    latent_shape: Optional[tuple[int, int, int]] = None

    @property
    def cached(self) -> bool:
        return self.identity_dim is not None


def features_dict(spec: DatasetSpec) -> tfds.features.FeaturesDict:
    r = spec.resolution
    features: dict[str, Any] = {
        "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png",
                                     doc="FFHQ-style aligned training image"),
        "mask": tfds.features.Image(shape=(r, r, 1), encoding_format="png", doc="head mask, 255 = head"),
        "face": tfds.features.Image(shape=(112, 112, 3), encoding_format="png", doc="ArcFace crop (MSID input)"),
        "expression_face": tfds.features.Image(shape=(224, 224, 3), encoding_format="png",
                                               doc="Deep3DFaceRecon crop (expression encoder input)"),
        "landmarks": tfds.features.Tensor(shape=(68, 2), dtype=np.float32,
                                          doc="68 landmarks (x, y) in training-image pixels"),
        "name": tfds.features.Text(doc="photo path relative to the images folder; '#flip' marks mirrors"),
    }
    if spec.cached:
        features["identity"] = tfds.features.Tensor(shape=(spec.identity_dim,), dtype=np.float32,
                                                    doc="MSID features of `face`")
        features["expression"] = tfds.features.Tensor(shape=(spec.expression_dim,), dtype=np.float32,
                                                      doc="expression code of `expression_face`")
        features["latent_moments"] = tfds.features.Tensor(shape=tuple(spec.latent_shape), dtype=np.float32,
                                                          doc="SD VAE posterior mean and logvar of `image`")
    return tfds.features.FeaturesDict(features)


SplitGenerators = Mapping[str, Callable[[], Iterable[tuple[str, dict[str, Any]]]]]


class F2DFaces(tfds.core.GeneratorBasedBuilder):
    """Aligned face photos for Face2Diffusion training (written by python -m f2d_jax.data.prepare)."""

    name = NAME
    # tfds derives this from the package's resources, which for an editable install needs the
    # `importlib_resources` backport; this module's own file is what it is looking for.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Aligned images, head masks, ArcFace and Deep3DFaceRecon crops, landmarks; "
                              "optionally cached MSID / expression / VAE features."}

    def __init__(self, *, spec: DatasetSpec, splits: SplitGenerators, **kwargs):
        self._spec = spec
        self._splits = dict(splits)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=features_dict(self._spec),
            disable_shuffling=True,   # examples keep the photos' sorted order; loaders shuffle
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(make) for name, make in self._splits.items()}

    def _generate_examples(self, make):
        yield from make()


def write_dataset(data_dir: str | os.PathLike, spec: DatasetSpec, splits: SplitGenerators, *,
                  download_dir: str | os.PathLike, progress: bool = False) -> Path:
    """Writes the splits (name -> callable yielding (key, example)) to `data_dir`/f2d_faces/1.0.0.

    tfds writes into an `incomplete.*` folder and renames it when every split is written, so an
    interrupted write never leaves a folder that looks finished. Returns the dataset folder.
    tfds' own messages on stdout are dropped, and its progress bars shown only with `progress`.
    """
    require_tensorflow()
    builder = F2DFaces(spec=spec, splits=splits, data_dir=os.fspath(data_dir), file_format=FILE_FORMAT)
    return prepare_builder(builder, download_dir=download_dir, progress=progress)


def prepare_builder(builder: tfds.core.DatasetBuilder, *, download_dir: str | os.PathLike,
                    progress: bool = False) -> Path:
    """Runs `builder`'s download_and_prepare (no statistics, tfds' stdout dropped, its progress bars
    only with `progress`); returns the dataset folder. Needs TensorFlow."""
    require_tensorflow()
    from tensorflow_datasets.core.utils import tqdm_utils

    bars = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(progress and bars)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(
                download_dir=os.fspath(download_dir),
                download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    finally:
        tfds.display_progress_bar(bars)
    return Path(builder.data_dir)
