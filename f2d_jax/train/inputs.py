"""What the training loop reads: the training examples, a few held-out faces, and the
on-device encoding of raw examples into the features the step consumes.

The step consumes features: identity (B, F), expression (B, 64), latent_moments
(B, h, w, 8) and mask (B, h, w, 1) at latent resolution. Synthetic data and datasets prepared
with --cache-features hold them already; other prepared datasets hold images and crops, which
`encode_raw` turns into features on the devices (frozen MSID, expression encoder and VAE).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.bundle import Models
from f2d_jax.data import compatibility_problems, latent_mask, open_prepared, read_info
from f2d_jax.data.features import image_input, vae_moments
from f2d_jax.data.synthetic import SyntheticFaces
from f2d_jax.faces import expression_input, msid_input

FEATURES = ("identity", "expression", "latent_moments", "mask")
RAW = ("image", "face", "expression_face", "mask")


@dataclasses.dataclass
class TrainingData:
    source: Any                          # len() and get(indices) -> {field: (n, ...) array}
    holdout: dict[str, np.ndarray]       # held-out examples, same fields
    encoded: bool                        # features (True) or raw images and crops (False)
    transform: Callable[[dict], dict] = lambda batch: batch   # numpy batch -> batch


def latent_shape(resolution: int, sd) -> tuple[int, int, int]:
    """(h, w, C) of the base's latents of resolution x resolution images."""
    return (resolution // sd.vae_scale_factor,) * 2 + (sd.latent_channels,)


def training_data(config: Mapping[str, Any], models: Models) -> TrainingData:
    data = config["data"]
    if not data["dir"]:
        sizes = dict(identity_dim=models.encoders.mapping.identity_dim,
                     expression_dim=models.encoders.mapping.expression_dim,
                     latent_shape=latent_shape(data["resolution"], models.sd), seed=config["seed"])
        train = SyntheticFaces(data["synthetic_examples"], data["synthetic_identities"], **sizes,
                               shuffle_identity=data["synthetic_shuffle_identity"])
        holdout = SyntheticFaces(max(data["holdout"], 1), max(data["holdout"], 1), **sizes,
                                 first_identity=data["synthetic_identities"])
        return TrainingData(train, holdout.get(range(len(holdout))), encoded=True)
    return prepared_data(config, models)


def prepared_data(config: Mapping[str, Any], models: Models) -> TrainingData:
    """A dataset made by `python -m f2d_jax.data.prepare` (features cached or not)."""
    directory = config["data"]["dir"]
    info = read_info(directory)
    problems = compatibility_problems(info, config)
    if problems:
        raise ValueError(f"the dataset in {directory} does not fit the config: {'; '.join(problems)}. Change the "
                         "config to match, or prepare the dataset again with this config")
    encoded = bool(info["features_cached"])
    fields = FEATURES if encoded else RAW
    transform = (lambda batch: {**batch, "mask": latent_mask(batch["mask"])}) if encoded else (lambda batch: batch)
    train = open_prepared(directory, "train", fields)
    held = open_prepared(directory, "holdout" if info["splits"].get("holdout") else "train", fields)
    holdout = transform(held.get(range(min(len(held), max(config["log"]["sample_faces"], 1)))))
    return TrainingData(train, holdout, encoded, transform)


def prepared_has_features(directory) -> bool:
    return bool(read_info(directory)["features_cached"])


def encode_raw(models: Models, variables: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Raw uint8 images and crops -> the step's features, with the frozen encoders (jit it)."""
    encoders, vae = models.encoders, models.sd.vae
    return {
        "identity": encoders.identity_features(variables, msid_input(batch["face"])),
        "expression": encoders.expression_codes(variables, expression_input(batch["expression_face"])),
        "latent_moments": vae_moments(vae, variables["vae"], image_input(batch["image"]).astype(vae.dtype)
                                      ).astype(jnp.float32),
        "mask": latent_mask(batch["mask"]),
    }
