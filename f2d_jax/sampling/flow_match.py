"""FLUX.1's flow-matching sampler and training noise, as pure functions.

The model predicts the velocity v = noise - x0 of the straight path x_sigma = (1 - sigma) x0 + sigma noise,
sigma from 1 (noise) to 0 (image). `flow_schedule` gives the sigmas diffusers' FlowMatchEulerDiscreteScheduler
sets when FluxPipeline calls it (N evenly spaced values from 1 to 1/N, shifted toward the noise by the image's
token count, and a final 0), computed in float32 numpy as diffusers computes them, so they are equal to the
last bit; `sample` runs the Euler steps x + (sigma_next - sigma) v under `jax.lax.fori_loop`.
`training_sigmas` and `noised` are the training side: sigmas drawn with the same shift, the noised latents
and the velocity target.

The scheduler configs are diffusers' scheduler_config.json entries (`models.bases.FLUX_DEV_SCHEDULER`,
`FLUX_SCHNELL_SCHEDULER` as published); settings that would change the schedule and are not computed here
raise UnsupportedConfigError.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.models.bases import FLUX_DEV_SCHEDULER
from f2d_jax.models.sd_config import UnsupportedConfigError


# FlowMatchEulerDiscreteScheduler options with the value computed here.
_COMPUTED = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
             "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}
_TIME_SHIFTS = ("exponential", "linear")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """mu, the log of the resolution shift: linear in the token count, base_shift at base_seq_len tokens and
    max_shift at max_seq_len (256 tokens: a 256x256 image's; 4096: 1024x1024)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def _check(config: Mapping[str, Any]) -> None:
    for key, computed in _COMPUTED.items():
        if (config.get(key) or computed) != computed:
            raise UnsupportedConfigError(f"scheduler config: {key}={config[key]!r} is not supported: the flow "
                                         f"matching sampler computes {key}={computed!r}")
    if config.get("time_shift_type", "exponential") not in _TIME_SHIFTS:
        raise UnsupportedConfigError(f"scheduler config: time_shift_type={config['time_shift_type']!r} is not "
                                     f"supported (use one of {', '.join(_TIME_SHIFTS)})")


def shift_sigmas(sigmas, image_seq_len: int, config: Mapping[str, Any] = FLUX_DEV_SCHEDULER):
    """Sigmas in (0, 1] shifted as the config says (toward 1, the noise, for FLUX's): with use_dynamic_shifting by mu =
    `calculate_shift(image_seq_len, ...)` of the config's fields, e^mu / (e^mu + 1/sigma - 1) ("exponential"
    time_shift_type) or mu / (mu + 1/sigma - 1) ("linear"); else by the fixed `shift`,
    shift sigma / (1 + (shift - 1) sigma). numpy or jnp arrays, in their dtype."""
    _check(config)
    if not config.get("use_dynamic_shifting", False):
        shift = config.get("shift", 1.0)
        return shift * sigmas / (1 + (shift - 1) * sigmas)
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scale = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    return scale / (scale + (1 / sigmas - 1))


def flow_schedule(num_steps: int, image_seq_len: int,
                  config: Mapping[str, Any] = FLUX_DEV_SCHEDULER) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (N,), sigmas (N + 1,)) float32 for N steps over images of `image_seq_len` tokens (packed latent
    patches: (H/16) * (W/16) for an H x W image): sigmas N evenly from 1 to 1/N, shifted (`shift_sigmas`), then 0;
    timesteps = 1000 sigma, as diffusers' scheduler sets them when FluxPipeline passes these sigmas and mu."""
    sigmas = shift_sigmas(np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32), image_seq_len, config)
    timesteps = sigmas * np.float32(config.get("num_train_timesteps", 1000))
    return timesteps, np.append(sigmas, np.float32(0.0))


def euler_step(x, velocity, sigma, sigma_next):
    """x + (sigma_next - sigma) v in float32 (as diffusers' step), returned in x's dtype."""
    return (x.astype(jnp.float32) + (sigma_next - sigma) * velocity).astype(x.dtype)


def sample(velocity_fn: Callable[[Any, Any], Any], x, sigmas, first=0, last=None):
    """Euler steps from noise `x` at sigmas[0] down to sigmas[-1] (0): len(sigmas) - 1 calls of
    `velocity_fn(x, t)`, t the step's sigma as a float32 scalar (what FluxPipeline gives its transformer:
    timestep / 1000; broadcast it to the batch where the model wants (B,)); or steps first .. last - 1 alone.
    Traceable: `sigmas`, `first` and `last` may be arguments of a jitted caller."""
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(i, x):
        return euler_step(x, velocity_fn(x, sigmas[i]), sigmas[i], sigmas[i + 1])

    return jax.lax.fori_loop(first, sigmas.shape[0] - 1 if last is None else last, step, x)


def training_sigmas(key, batch: int, image_seq_len: int, config: Mapping[str, Any] = FLUX_DEV_SCHEDULER):
    """(batch,) float32 training sigmas in (0, 1): logit-normal u = sigmoid(n), n ~ N(0, 1), then the
    sampler's shift for the same token count (`shift_sigmas`).

    Why shifted: at inference `flow_schedule` moves the sigmas toward the noise by that shift, more for larger
    images (whose downsampled versions keep more of the image at a given sigma); drawing the training sigmas
    through the same map trains the model where sampling spends its steps. The logit-normal weights the middle
    of the path, where the velocity is hardest to predict, over the two ends."""
    u = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    return shift_sigmas(u, image_seq_len, config)


def noised(x0, noise, sigma):
    """(x_sigma, target): the point sigma noise + (1 - sigma) x0 of the straight path (as diffusers'
    scale_noise) and the velocity the model learns to predict there, noise - x0. `sigma` is a scalar or
    (B,), broadcast over x0's trailing axes."""
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
    return sigma * noise + (1.0 - sigma) * x0, noise - x0
