"""One MSID pretraining step (ArcFace over an identity-sharded classifier), and the embedding
function of verification, as pure functions.

The state's params are {"msid": {"params", "batch_stats"}, "classifier": (C, D)}. The tap
BatchNorms train on batch statistics and update their running statistics (momentum 0.9, as
PyTorch's 0.1); the optimizer leaves the running statistics alone (`with_frozen_stats`).
Randomness (the flips, Partial FC's class sample) comes from fold_in(key(seed), step).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh

from f2d_jax.arcface import sharded_margin_loss
from f2d_jax.sharding import AXES
from f2d_jax.train.state import TrainState, apply_if_finite


@dataclasses.dataclass(frozen=True)
class ArcFaceConfig:
    seed: int
    margins: tuple[float, float, float]
    scale: float
    sample_rate: float
    flip: bool


def with_frozen_stats(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on every leaf except BatchNorm running statistics ("batch_stats"), which get no update."""
    def labels(params):
        flat = traverse_util.flatten_dict(params)
        return traverse_util.unflatten_dict({k: "stats" if "batch_stats" in k else "train" for k in flat})
    return optax.multi_transform({"train": tx, "stats": optax.set_to_zero()}, labels)


def to_unit_range(images):
    """uint8 RGB -> float32 in [-1, 1] (MSID's input range)."""
    return images.astype(jnp.float32) / 127.5 - 1.0


def random_flip(key, images):
    """Mirror each image (B, H, W, C) left-right with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def train_step(state: TrainState, batch, *, model, mesh: Mesh, tx: optax.GradientTransformation,
               schedule: optax.Schedule, cfg: ArcFaceConfig):
    """(state, {"image": (B, 112, 112, 3) uint8, "label": (B,) int32}) -> (new state, metrics)."""
    flip_key, sample_key = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), state.step))
    images = to_unit_range(batch["image"])
    if cfg.flip:
        images = random_flip(flip_key, images)

    def loss_fn(params):
        embeddings, updates = model.apply(params["msid"], images, train=True, mutable=["batch_stats"])
        loss, accuracy = sharded_margin_loss(
            embeddings.astype(jnp.float32), batch["label"], params["classifier"], mesh, cfg.margins, cfg.scale,
            class_axis=AXES, batch_axis=AXES, sample_rate=cfg.sample_rate, key=sample_key, with_accuracy=True)
        return loss, (accuracy, updates["batch_stats"])

    (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = apply_if_finite(state, grads, finite, tx, lambda params: {
        **params, "msid": {**params["msid"], "batch_stats": batch_stats}})   # the running statistics
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "lr": schedule(state.step),
               "finite": finite}
    return new_state, metrics


def embed(variables: Any, images, *, model):
    """Verification embeddings: MSID features (running statistics) of each uint8 image plus those of
    its mirror image, as insightface's evaluation does; float32 (B, D)."""
    x = to_unit_range(images)
    return (model.apply(variables, x) + model.apply(variables, x[:, :, ::-1])).astype(jnp.float32)
