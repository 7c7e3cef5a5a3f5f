"""Noise schedulers for sampling, as small immutable pytrees usable inside `jax.jit`.

Each has `create(scheduler_config, num_steps)` (timesteps as diffusers' `set_timesteps` makes
them), `init_noise_sigma`, `scale_model_input(i, x)` and `step(i, x, model_output, key)` for
step index i. Their updates match the diffusers schedulers of the same name.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.models.stable_diffusion import alphas_cumprod


def spaced_timesteps(config: Mapping[str, Any], num_steps: int) -> np.ndarray:
    """Descending (num_steps,) training timesteps, by the config's `timestep_spacing`."""
    total = int(config.get("num_train_timesteps", 1000))
    if not 1 <= num_steps <= total:
        raise ValueError(f"steps must be between 1 and {total}, got {num_steps}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "leading":
        return (np.arange(num_steps) * (total // num_steps))[::-1] + int(config.get("steps_offset", 0))
    if spacing == "trailing":
        return np.round(np.arange(total, 0, -total / num_steps)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.linspace(0, total - 1, num_steps).round()[::-1].astype(np.int64)
    raise ValueError(f"timestep_spacing={spacing!r} is not supported (leading, trailing, linspace)")


def _predicted_sample_and_noise(prediction_type: str, x, output, alpha):
    """(x0, eps) from the model output at cumulative alpha `alpha`."""
    if prediction_type == "epsilon":
        return (x - jnp.sqrt(1 - alpha) * output) / jnp.sqrt(alpha), output
    if prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha) * x - jnp.sqrt(1 - alpha) * output
        return x0, jnp.sqrt(alpha) * output + jnp.sqrt(1 - alpha) * x
    if prediction_type == "sample":
        return output, (x - jnp.sqrt(alpha) * output) / jnp.sqrt(1 - alpha)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported")


@flax.struct.dataclass
class DDIM:
    """Deterministic DDIM (eta = 0), as diffusers' DDIMScheduler."""

    timesteps: jax.Array        # (n,) int32, descending
    alphas: jax.Array           # (n,) cumulative alpha at each timestep
    alphas_prev: jax.Array      # (n,) cumulative alpha at the next (smaller) timestep
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    clip_sample: float | None = flax.struct.field(pytree_node=False, default=None)
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, config: Mapping[str, Any], num_steps: int) -> DDIM:
        abar = alphas_cumprod(config).astype(np.float64)
        timesteps = spaced_timesteps(config, num_steps)
        prev = timesteps - int(config.get("num_train_timesteps", 1000)) // num_steps
        final = 1.0 if config.get("set_alpha_to_one", True) else abar[0]
        alphas_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
        clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None
        return cls(jnp.asarray(timesteps, jnp.int32), jnp.asarray(abar[timesteps], jnp.float32),
                   jnp.asarray(alphas_prev, jnp.float32), config.get("prediction_type", "epsilon"), clip)

    def scale_model_input(self, i, x):
        return x

    def step(self, i, x, model_output, key=None):
        alpha, alpha_prev = self.alphas[i], self.alphas_prev[i]
        x0, eps = _predicted_sample_and_noise(self.prediction_type, x, model_output, alpha)
        if self.clip_sample is not None:
            x0 = jnp.clip(x0, -self.clip_sample, self.clip_sample)
        return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * eps


SCHEDULERS = {"ddim": DDIM}
