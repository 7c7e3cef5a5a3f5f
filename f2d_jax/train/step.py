"""One Face2Diffusion training step: CGDR with expression guidance, as a pure function.

    z0 = s * sample(VAE moments);  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    tokens = mapping(identity, expression or null_exp)          # trains
    eps*   = UNet(z_t, t, CLIP(prompt with tokens at "f l"))     # gradient to the mapping net
    eps_c  = UNet(z_t, t, CLIP("a photo of a person"))           # forward only, constant
    (SDXL: both text encoders, and the training size as the UNet's time ids, for both predictions)
    L      = mean(M (eps* - eps)^2) + lambda mean((1 - M)(eps* - eps_c)^2)

(in v-space for v-prediction models: the target is sqrt(abar_t) eps - sqrt(1 - abar_t) z0).

All randomness comes from fold_in(key(seed), step), so a step is a function of (state, batch).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from f2d_jax.bundle import Models
from f2d_jax.models.stable_diffusion import unet_output
from f2d_jax.objectives import cgdr_loss
from f2d_jax.params import merge
from f2d_jax.train.state import TrainState, apply_if_finite

BATCH_FIELDS = ("identity", "expression", "latent_moments", "mask")


@flax.struct.dataclass
class Constants:
    """Step inputs that never change (replicated): captions, class embedding, noise schedule."""

    prompt_ids: jax.Array         # (P, 77) int32, the training captions
    prompt_positions: jax.Array   # (P,) int32, where "f" is in each
    class_conditioning: dict      # CLIP("a photo of a person"): {"context": (1, 77, D)[, SDXL's "text_embeds"]}
    alphas_cumprod: jax.Array     # (T,) float32


@dataclasses.dataclass(frozen=True)
class StepConfig:
    seed: int
    cgdr_lambda: float
    p_uncond: float
    remat_unet: bool
    vae_scaling_factor: float
    prediction_type: str = "epsilon"   # the UNet's output: "epsilon" or "v_prediction" (SD 2.x)


def latents_from_moments(moments, key, scaling_factor: float):
    """(B, h, w, 2C) VAE posterior (mean | logvar) -> (B, C, h, w) scaled latent sample (the UNet's layout)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return scaling_factor * jnp.transpose(sample, (0, 3, 1, 2))


def prediction_target(prediction_type: str, z0, eps, abar):
    """What the UNet learns to output for z_t = sqrt(abar) z0 + sqrt(1 - abar) eps: the noise (epsilon
    models) or the velocity sqrt(abar) eps - sqrt(1 - abar) z0 (v-prediction, SD 2.1)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * z0
    raise ValueError(f"prediction_type={prediction_type!r}: training supports epsilon and v_prediction")


def noised_latents(batch: Mapping[str, jax.Array], keys, alphas_cumprod, cfg: StepConfig):
    """A batch's denoising problem, drawn with keys[0], keys[1], keys[2] (latent sample, timesteps, noise):
    (z_t (B, C, h, w), t (B,), the UNet's target, the head mask (B, 1, h, w))."""
    z0 = latents_from_moments(batch["latent_moments"], keys[0], cfg.vae_scaling_factor)
    t = jax.random.randint(keys[1], (z0.shape[0],), 0, alphas_cumprod.shape[0])
    eps = jax.random.normal(keys[2], z0.shape)
    abar = alphas_cumprod[t][:, None, None, None]
    z_t = jnp.sqrt(abar) * z0 + jnp.sqrt(1 - abar) * eps
    return z_t, t, prediction_target(cfg.prediction_type, z0, eps, abar), jnp.transpose(batch["mask"], (0, 3, 1, 2))


def train_step(state: TrainState, frozen: Mapping[str, Any], batch: Mapping[str, jax.Array], constants: Constants,
               *, models: Models, tx: optax.GradientTransformation, schedule: optax.Schedule, cfg: StepConfig):
    """(state, frozen params, batch, constants) -> (new state, metrics)."""
    keys = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), state.step), 6)
    b = batch["identity"].shape[0]
    z_t, t, target, mask = noised_latents(batch, keys, constants.alphas_cumprod, cfg)
    keep_expression = jax.random.bernoulli(keys[3], 1 - cfg.p_uncond, (b,))
    caption = jax.random.randint(keys[4], (b,), 0, constants.prompt_ids.shape[0])

    sd = models.sd
    size = [n * sd.vae_scale_factor for n in z_t.shape[2:]]

    def predict(params, conditioning, unet=sd.unet):
        return unet_output(unet, params, z_t, t, sd.with_size(conditioning, *size))
    predict_with_grad = functools.partial(predict, unet=sd.unet.clone(remat=True)) if cfg.remat_unet else predict

    all_params = merge(state.params, frozen)
    class_conditioning = jax.tree.map(lambda x: jnp.broadcast_to(x, (b, *x.shape[1:])), constants.class_conditioning)
    eps_class = jax.lax.stop_gradient(predict(all_params["unet"], class_conditioning))  # no backward pass

    def loss_fn(trainable):
        params = merge(trainable, frozen)
        encoders = models.encoders
        tokens = encoders.identity_tokens(params, batch["identity"], batch["expression"], keep_expression,
                                          train=True, rng=keys[5])
        conditioning = encoders.prompt_embeddings(params, constants.prompt_ids[caption],
                                                  constants.prompt_positions[caption], tokens)
        return cgdr_loss(predict_with_grad(params["unet"], conditioning), target, eps_class, mask, cfg.cgdr_lambda)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = apply_if_finite(state, grads, finite, tx)
    metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite}
    return new_state, metrics
