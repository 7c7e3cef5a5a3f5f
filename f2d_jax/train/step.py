"""One Face2Diffusion training step: CGDR with expression guidance, as a pure function.

    z0 = s * sample(VAE moments);  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
    tokens = mapping(identity, expression or null_exp)          # trains
    eps*   = UNet(z_t, t, CLIP(prompt with tokens at "f l"))     # gradient to the mapping net
    eps_c  = UNet(z_t, t, CLIP("a photo of a person"))           # forward only, constant
    (SDXL: both text encoders, and the training size as the UNet's time ids, for both predictions)
    L      = mean(M (eps* - eps)^2) + lambda mean((1 - M)(eps* - eps_c)^2)

(in v-space for v-prediction models: the target is sqrt(abar_t) eps - sqrt(1 - abar_t) z0).

FLUX.1 (flow matching): z0 = s * (sample - shift); sigma from the logit-normal with FLUX's resolution shift
(`flow_match.training_sigmas`); z_sigma = (1 - sigma) z0 + sigma eps; the transformer predicts the velocity
eps - z0 under T5's states and CLIP's pooled vector, both with the tokens written at "f" and "l"; the same CGDR
loss on velocities, the class prompt's velocity the target outside the mask.

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
from f2d_jax.models.flux_latents import to_latents
from f2d_jax.objectives import cgdr_loss
from f2d_jax.params import merge
from f2d_jax.sampling.flow_match import noised, training_sigmas
from f2d_jax.train.state import TrainState, apply_if_finite

BATCH_FIELDS = ("identity", "expression", "latent_moments", "mask")


@flax.struct.dataclass
class Constants:
    """Step inputs that never change (replicated): captions, class embedding, noise schedule."""

    prompt_ids: Any               # (P, 77) int32, the training captions (FLUX: {encoder: ids})
    prompt_positions: Any         # (P,) int32, where "f" is in each (FLUX: {encoder: positions})
    class_conditioning: dict      # CLIP("a photo of a person"): {"context": (1, 77, D)[, SDXL's "text_embeds"]}
    alphas_cumprod: jax.Array | None   # (T,) float32; None for flow matching (FLUX)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    seed: int
    cgdr_lambda: float
    p_uncond: float
    remat_unet: bool
    vae_scaling_factor: float
    prediction_type: str = "epsilon"   # the UNet's output: "epsilon" or "v_prediction" (SD 2.x); "flow" (FLUX)
    vae_shift_factor: float = 0.0
    guidance: float = 1.0              # FLUX.1-dev's guidance embedding while training


def latents_from_moments(moments, key, scaling_factor: float, shift_factor: float = 0.0):
    """(B, h, w, 2C) VAE posterior (mean | logvar) -> (B, C, h, w) scaled latent sample (the denoiser's layout):
    scaling_factor * (sample - shift_factor)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return to_latents(jnp.transpose(sample, (0, 3, 1, 2)), scaling_factor, shift_factor)


def prediction_target(prediction_type: str, z0, eps, abar):
    """What the UNet learns to output for z_t = sqrt(abar) z0 + sqrt(1 - abar) eps: the noise (epsilon
    models) or the velocity sqrt(abar) eps - sqrt(1 - abar) z0 (v-prediction, SD 2.1)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return jnp.sqrt(abar) * eps - jnp.sqrt(1 - abar) * z0
    raise ValueError(f"prediction_type={prediction_type!r}: training supports epsilon and v_prediction")


def noised_latents(batch: Mapping[str, jax.Array], keys, alphas_cumprod, cfg: StepConfig, scheduler_config=None):
    """A batch's denoising problem, drawn with keys[0], keys[1], keys[2] (latent sample, timesteps, noise):
    (z_t (B, C, h, w), t (B,), the denoiser's target, the head mask (B, 1, h, w)). Flow matching ("flow"): t is
    sigma in (0, 1), drawn as FLUX trains (`training_sigmas` with `scheduler_config`'s shift)."""
    z0 = latents_from_moments(batch["latent_moments"], keys[0], cfg.vae_scaling_factor, cfg.vae_shift_factor)
    eps = jax.random.normal(keys[2], z0.shape)
    mask = jnp.transpose(batch["mask"], (0, 3, 1, 2))
    if cfg.prediction_type == "flow":
        sigma = training_sigmas(keys[1], z0.shape[0], (z0.shape[2] // 2) * (z0.shape[3] // 2), scheduler_config)
        z_t, velocity = noised(z0, eps, sigma)
        return z_t, sigma, velocity, mask
    t = jax.random.randint(keys[1], (z0.shape[0],), 0, alphas_cumprod.shape[0])
    abar = alphas_cumprod[t][:, None, None, None]
    z_t = jnp.sqrt(abar) * z0 + jnp.sqrt(1 - abar) * eps
    return z_t, t, prediction_target(cfg.prediction_type, z0, eps, abar), mask


def train_step(state: TrainState, frozen: Mapping[str, Any], batch: Mapping[str, jax.Array], constants: Constants,
               *, models: Models, tx: optax.GradientTransformation, schedule: optax.Schedule, cfg: StepConfig):
    """(state, frozen params, batch, constants) -> (new state, metrics)."""
    keys = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), state.step), 6)
    b = batch["identity"].shape[0]
    sd = models.sd
    z_t, t, target, mask = noised_latents(batch, keys, constants.alphas_cumprod, cfg, sd.scheduler_config)
    keep_expression = jax.random.bernoulli(keys[3], 1 - cfg.p_uncond, (b,))
    caption = jax.random.randint(keys[4], (b,), 0, jax.tree.leaves(constants.prompt_ids)[0].shape[0])

    def predict(params, conditioning, model=sd):
        return model.predict(params[sd.denoiser], z_t, t, conditioning, cfg.guidance)
    predict_with_grad = functools.partial(predict, model=sd.with_remat()) if cfg.remat_unet else predict

    all_params = merge(state.params, frozen)
    class_conditioning = jax.tree.map(lambda x: jnp.broadcast_to(x, (b, *x.shape[1:])), constants.class_conditioning)
    eps_class = jax.lax.stop_gradient(predict(all_params, class_conditioning))  # no backward pass

    def loss_fn(trainable):
        params = merge(trainable, frozen)
        encoders = models.encoders
        tokens = encoders.identity_tokens(params, batch["identity"], batch["expression"], keep_expression,
                                          train=True, rng=keys[5])
        ids, positions = (jax.tree.map(lambda x: x[caption], c) for c in (constants.prompt_ids,
                                                                          constants.prompt_positions))
        conditioning = encoders.prompt_embeddings(params, ids, positions, tokens)
        return cgdr_loss(predict_with_grad(params, conditioning), target, eps_class, mask, cfg.cgdr_lambda)

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = apply_if_finite(state, grads, finite, tx)
    metrics = {"loss": loss, **parts, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite}
    return new_state, metrics
