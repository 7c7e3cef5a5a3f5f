"""The frozen encoders' outputs cached in a prepared dataset, computed in JAX.

- `identity` (F,): MSID features of the 112x112 ArcFace crop (F = taps x width);
- `expression` (64,): the Deep3DFaceRecon expression code of the 224x224 crop;
- `latent_moments` (R/8, R/8, 8): the SD VAE posterior's mean and log-variance (concatenated on the
  last axis) of the training image mapped to [-1, 1]; z0 = scaling_factor * (mean + exp(logvar / 2) * n).

Batches are sharded over a 1-D mesh of the local devices (axis "data"); the parameters are
replicated. Each model is one jitted function, compiled once for a fixed (padded) batch size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from f2d_jax.data.read import EXPRESSION_DIM, FEATURE_FIELDS, feature_description
from f2d_jax.encoders import Encoders
from f2d_jax.faces import expression_input, msid_input


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureModels:
    """The three frozen encoders and their variables, plus what describes them in a dataset."""

    encoders: Encoders
    variables: dict[str, Any]        # {"msid", "expression"} Flax variables
    vae: Any                         # f2d_jax.models.vae.AutoencoderKL
    vae_params: Any                  # its {"params": ...}
    description: dict[str, Any]      # model sizes and weight sources, JSON-able

    @property
    def identity_dim(self) -> int:
        return self.encoders.msid.features

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """Shape of `latent_moments` for `resolution` x `resolution` images."""
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(f"the resolution ({resolution}) must be a multiple of the VAE's factor {factor}")
        return (resolution // factor, resolution // factor, 2 * self.vae.latent_channels)


_loaded: dict[str, FeatureModels] = {}   # the last models loaded, by what they were loaded from


def load_feature_models(config, *, log: Callable[[str], None] | None = None) -> FeatureModels:
    """The MSID and expression encoders and the SD VAE of `config`.

    Empty `config.weights` entries mean random initialization (seeded by `config.seed`; for an
    empty `weights.sd`, the tiny random Stable Diffusion): a warning says so, as the features are
    then meaningless outside tests. The last models loaded are kept for the process, so a
    second call with the same model sizes, weight paths and seed returns them without reloading.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    weights = config.weights
    if not weights.sd:
        log("warning: config.weights.sd is empty: latent_moments come from the tiny random-init "
            "Stable Diffusion VAE (for tests only)")
    missing = [name for name in ("msid", "expression") if not weights[name]]
    if missing:
        log(f"warning: config.weights.{' and config.weights.'.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} empty: "
            f"{' and '.join(missing)} features come from random-init models (seed {config.seed}; "
            "for tests only)")
    key = json.dumps([config.model.to_dict(), {k: str(config.weights[k]) for k in ("sd", "msid", "expression")},
                      int(config.seed)], sort_keys=True, default=str)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = _load_feature_models(config)
    return _loaded[key]


def _load_feature_models(config) -> FeatureModels:
    from f2d_jax.bundle import load_models

    models, variables = load_models(config, names=("msid", "expression"), log=lambda message: None)
    return FeatureModels(models.encoders, {name: variables[name] for name in ("msid", "expression")},
                         models.sd.vae, variables["vae"], feature_description(config))


def vae_moments(vae, vae_params, images):
    """(B, R, R, 3) images in [-1, 1] -> (B, R/8, R/8, 8): the posterior's mean and logvar.

    The VAE takes NCHW input and returns a channels-last posterior.
    """
    posterior = vae.apply(vae_params, jnp.transpose(images, (0, 3, 1, 2)), method=vae.encode)
    return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)


def image_input(images: np.ndarray) -> np.ndarray:
    """uint8 (..., R, R, 3) -> float32 in [-1, 1], the VAE's input (numpy or jax arrays)."""
    images = images if hasattr(images, "astype") else np.asarray(images)
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1)


class FeatureExtractor:
    """Computes the cached features for batches of examples, sharded over the local devices.

    `batch_size` is rounded up to a multiple of the device count; every call is padded to it, so
    each model compiles once. Matmuls run at `precision` (default "highest": the features are
    computed once and reused for the whole training).
    """

    def __init__(self, models: FeatureModels, batch_size: int = 32, *, devices=None,
                 precision: str | None = "highest"):
        devices = list(devices if devices is not None else jax.local_devices())
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.models = models
        self.mesh = Mesh(np.array(devices), ("data",))
        self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
        self.precision = precision
        data = NamedSharding(self.mesh, P("data"))
        self._data = data
        replicated = NamedSharding(self.mesh, P())
        self._variables = jax.device_put(models.variables, replicated)
        self._vae_params = jax.device_put(models.vae_params, replicated)
        encoders, vae = models.encoders, models.vae
        shardings = dict(in_shardings=(replicated, data), out_shardings=data)
        self._identity = jax.jit(encoders.identity_features, **shardings)
        self._expression = jax.jit(encoders.expression_codes, **shardings)
        self._latents = jax.jit(lambda params, x: vae_moments(vae, params, x), **shardings)

    def _dispatch(self, fn, params, inputs: np.ndarray) -> jax.Array:
        """Starts `fn` on `inputs` padded to the batch size (returns without waiting)."""
        padded = np.zeros((self.batch_size, *inputs.shape[1:]), inputs.dtype)
        padded[:len(inputs)] = inputs
        with jax.default_matmul_precision(self.precision) if self.precision else contextlib.nullcontext():
            return fn(params, jax.device_put(padded, self._data))

    def batches(self, n: int) -> int:
        """Number of device batches for `n` examples."""
        return -(-n // self.batch_size)

    def __call__(self, faces: np.ndarray, expression_faces: np.ndarray, images: np.ndarray,
                 progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """uint8 crops (N, 112, 112, 3), (N, 224, 224, 3) and images (N, R, R, 3) ->
        {"identity" (N, F), "expression" (N, 64), "latent_moments" (N, R/8, R/8, 8)} float32."""
        n = len(faces)
        if not (len(expression_faces) == len(images) == n):
            raise ValueError(f"batch sizes differ: {n}, {len(expression_faces)}, {len(images)}")
        if n == 0:
            return self.empty(images.shape[1] if images.ndim == 4 else 0)
        out = {name: [] for name in FEATURE_FIELDS}
        for start in range(0, n, self.batch_size):
            end = min(n, start + self.batch_size)
            pending = {  # all three run before the first result is fetched
                "identity": self._dispatch(self._identity, self._variables, msid_input(faces[start:end])),
                "expression": self._dispatch(self._expression, self._variables,
                                             expression_input(expression_faces[start:end])),
                "latent_moments": self._dispatch(self._latents, self._vae_params, image_input(images[start:end])),
            }
            for name, array in pending.items():
                out[name].append(np.asarray(jax.device_get(array), dtype=np.float32)[:end - start])
            if progress is not None:
                progress(1)
        return {name: np.concatenate(parts) for name, parts in out.items()}

    def empty(self, resolution: int) -> dict[str, np.ndarray]:
        """The features of zero examples."""
        return {"identity": np.zeros((0, self.models.identity_dim), np.float32),
                "expression": np.zeros((0, EXPRESSION_DIM), np.float32),
                "latent_moments": np.zeros((0, *self.models.latent_shape(resolution)), np.float32)}
