"""Noise schedulers for sampling, as small immutable pytrees usable inside `jax.jit`.

Each has `create(scheduler_config, num_steps)` (timesteps as diffusers' `set_timesteps` makes them,
defaults as diffusers' class of the same name fills them in), `init_noise_sigma`,
`scale_model_input(i, x)`, `init_memory(x)` (what a multistep solver carries between steps; None
for the others) and `step(i, x, model_output, key, memory) -> (x, memory)` for step index i. Their
updates match the diffusers schedulers of the same name. The schedule is computed in float64 numpy
at create time; the pytree holds float32 (or int32 timestep) arrays.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from f2d_jax.models.stable_diffusion import UnsupportedConfigError, alphas_cumprod


def spaced_timesteps(config: Mapping[str, Any], num_steps: int, default_spacing: str = "leading",
                     drop_zero: bool = False) -> np.ndarray:
    """Descending (num_steps,) float64 training timesteps, by the config's `timestep_spacing`.

    "leading" and "trailing" give integers, "linspace" is left unrounded (Euler schedulers use it so).
    drop_zero: space num_steps + 1 points and drop the last one, as DPM-Solver does for "leading" and
    "linspace" (its "trailing" is the usual one).
    """
    total = int(config.get("num_train_timesteps", 1000))
    if not 1 <= num_steps <= total:
        raise ValueError(f"steps must be between 1 and {total}, got {num_steps}")
    spacing = config.get("timestep_spacing", default_spacing)
    points = num_steps + 1 if drop_zero and spacing != "trailing" else num_steps
    if spacing == "leading":
        timesteps = (np.arange(points) * (total // points))[::-1] + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        timesteps = np.round(np.arange(total, 0, -total / points)) - 1
    elif spacing == "linspace":
        timesteps = np.linspace(0, total - 1, points)[::-1]
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported (leading, trailing, linspace)")
    return timesteps[:num_steps].astype(np.float64)


_PREDICTIONS = ("epsilon", "v_prediction", "sample")  # what the model output is
_FINAL_SIGMAS = ("zero", "sigma_min")  # the noise level after the last step


def _option(config: Mapping[str, Any], key: str, default, supported: tuple, scheduler: str):
    """config[key] (or diffusers' default), which must be one of `supported`."""
    value = config.get(key, default)
    if value not in supported:
        raise UnsupportedConfigError(f"scheduler config: {key}={value!r} is not supported by {scheduler} "
                                     f"(supported: {', '.join(map(repr, supported))})")
    return value


def _check_defaults(config: Mapping[str, Any], scheduler: str, **defaults) -> None:
    """Options this implementation does not compute must keep diffusers' default."""
    for key, default in defaults.items():
        _option(config, key, default, (default,), scheduler)


def _sigmas(config: Mapping[str, Any], timesteps: np.ndarray, final: str = "zero") -> np.ndarray:
    """(n + 1,) float64 noise levels sqrt((1 - abar) / abar) interpolated at the timesteps, then the final one
    (0, or the smallest training sigma for final="sigma_min"); rounded to float32 as diffusers stores them."""
    abar = alphas_cumprod(config).astype(np.float64)
    train = np.sqrt((1 - abar) / abar)
    last = train[0] if final == "sigma_min" else 0.0
    sigmas = np.append(np.interp(timesteps, np.arange(len(train)), train), last)
    return sigmas.astype(np.float32).astype(np.float64)


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


def _euler_move(prediction_type: str, x, output, sigma, sigma_to):
    """One Euler step of the probability-flow ODE in sigma space (x = x0 + sigma * eps) from sigma to sigma_to."""
    if prediction_type == "epsilon":
        x0 = x - sigma * output
    elif prediction_type == "v_prediction":
        x0 = output * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1)
    else:  # "sample"
        x0 = output
    return x + (x - x0) / sigma * (sigma_to - sigma)


class _Memoryless:
    """Single-step schedulers: nothing is carried from one step to the next."""

    def init_memory(self, x):
        return None


class _SigmaSpace(_Memoryless):
    """Euler-type schedulers: latents live in sigma space, the model sees them scaled to unit variance."""

    def scale_model_input(self, i, x):
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5


def _sigma_schedule(config: Mapping[str, Any], num_steps: int, final: str = "zero"):
    """(timesteps (n,) float32, sigmas (n + 1,) float64, init_noise_sigma) as diffusers' Euler schedulers."""
    spacing = config.get("timestep_spacing", "linspace")
    timesteps = spaced_timesteps(config, num_steps, "linspace").astype(np.float32)
    sigmas = _sigmas(config, timesteps, final)
    # diffusers: the largest sigma for "linspace"/"trailing", the variance of x_T otherwise.
    init_noise_sigma = sigmas.max() if spacing in ("linspace", "trailing") else np.sqrt(sigmas.max() ** 2 + 1)
    return timesteps, sigmas, float(np.float32(init_noise_sigma))


@flax.struct.dataclass
class EulerAncestral(_SigmaSpace):
    """Euler-ancestral, as diffusers' EulerAncestralDiscreteScheduler (the official Face2Diffusion sampler)."""

    timesteps: jax.Array        # (n,) float32, descending
    sigmas: jax.Array           # (n + 1,) noise levels, the last one 0
    sigmas_down: jax.Array      # (n,) where the deterministic part of each step lands
    sigmas_up: jax.Array        # (n,) scale of the fresh noise added after it
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, config: Mapping[str, Any], num_steps: int) -> EulerAncestral:
        prediction_type = _option(config, "prediction_type", "epsilon", ("epsilon", "v_prediction"), cls.__name__)
        timesteps, sigmas, init_noise_sigma = _sigma_schedule(config, num_steps)
        sigma, sigma_to = sigmas[:-1], sigmas[1:]
        sigmas_up = np.sqrt(sigma_to ** 2 * (sigma ** 2 - sigma_to ** 2) / sigma ** 2)
        sigmas_down = np.sqrt(sigma_to ** 2 - sigmas_up ** 2)
        return cls(*(jnp.asarray(a, jnp.float32) for a in (timesteps, sigmas, sigmas_down, sigmas_up)),
                   prediction_type, init_noise_sigma)

    def step_with_noise(self, i, x, model_output, noise):
        """The update with the given (B, C, h, w) standard normal noise."""
        x = _euler_move(self.prediction_type, x, model_output, self.sigmas[i], self.sigmas_down[i])
        return x + noise * self.sigmas_up[i]

    def step(self, i, x, model_output, key, memory):
        """key: one PRNG key per image, (B,)."""
        noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(key)
        return self.step_with_noise(i, x, model_output, noise), memory


@flax.struct.dataclass
class Euler(_SigmaSpace):
    """Deterministic Euler (s_churn = 0), as diffusers' EulerDiscreteScheduler."""

    timesteps: jax.Array        # (n,) float32, descending
    sigmas: jax.Array           # (n + 1,) noise levels, the last one 0 (or sigma_min)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, config: Mapping[str, Any], num_steps: int) -> Euler:
        prediction_type = _option(config, "prediction_type", "epsilon", _PREDICTIONS, cls.__name__)
        final = _option(config, "final_sigmas_type", "zero", _FINAL_SIGMAS, cls.__name__)
        _check_defaults(config, cls.__name__, interpolation_type="linear", use_karras_sigmas=False,
                        use_exponential_sigmas=False, use_beta_sigmas=False, timestep_type="discrete")
        timesteps, sigmas, init_noise_sigma = _sigma_schedule(config, num_steps, final)
        return cls(jnp.asarray(timesteps, jnp.float32), jnp.asarray(sigmas, jnp.float32), prediction_type,
                   init_noise_sigma)

    def step(self, i, x, model_output, key, memory):
        return _euler_move(self.prediction_type, x, model_output, self.sigmas[i], self.sigmas[i + 1]), memory


@flax.struct.dataclass
class DDIM(_Memoryless):
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
        timesteps = np.round(spaced_timesteps(config, num_steps, "leading")).astype(np.int64)
        prev = timesteps - int(config.get("num_train_timesteps", 1000)) // num_steps
        final = 1.0 if config.get("set_alpha_to_one", True) else abar[0]
        alphas_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
        clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None
        return cls(jnp.asarray(timesteps, jnp.int32), jnp.asarray(abar[timesteps], jnp.float32),
                   jnp.asarray(alphas_prev, jnp.float32), config.get("prediction_type", "epsilon"), clip)

    def scale_model_input(self, i, x):
        return x

    def step(self, i, x, model_output, key, memory):
        alpha, alpha_prev = self.alphas[i], self.alphas_prev[i]
        x0, eps = _predicted_sample_and_noise(self.prediction_type, x, model_output, alpha)
        if self.clip_sample is not None:
            x0 = jnp.clip(x0, -self.clip_sample, self.clip_sample)
        return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * eps, memory


@flax.struct.dataclass
class DPMSolverMultistep:
    """DPM-Solver++(2M), as diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++" and
    solver_type="midpoint": x_next = ratio * x + weight * x0 + difference_weight * (x0 - previous x0).
    The memory is the previous step's x0 prediction (B, C, h, w)."""

    timesteps: jax.Array          # (n,) int32, descending
    alphas: jax.Array             # (n,) cumulative alpha (alpha_t^2) at each step's noise level
    ratios: jax.Array             # (n,) sigma_next / sigma (variance-preserving sigmas)
    weights: jax.Array            # (n,) alpha_next * (1 - exp(-h)), h the log-SNR step
    difference_weights: jax.Array  # (n,) weight / (2 r), r = previous / current log-SNR step; 0 at first order
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    init_noise_sigma: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, config: Mapping[str, Any], num_steps: int) -> DPMSolverMultistep:
        prediction_type = _option(config, "prediction_type", "epsilon", _PREDICTIONS, cls.__name__)
        order = _option(config, "solver_order", 2, (1, 2), cls.__name__)
        final = _option(config, "final_sigmas_type", "zero", _FINAL_SIGMAS, cls.__name__)
        _check_defaults(config, cls.__name__, algorithm_type="dpmsolver++", solver_type="midpoint", thresholding=False,
                        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                        use_lu_lambdas=False, use_flow_sigmas=False, lambda_min_clipped=-float("inf"),
                        variance_type=None)
        timesteps = np.round(spaced_timesteps(config, num_steps, "linspace", drop_zero=True)).astype(np.int64)
        sigmas = _sigmas(config, timesteps, final)  # (n + 1,) sqrt((1 - abar) / abar): exp(-log-SNR / 2)
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        sigma_prev = np.append(np.nan, sigmas[:-2])
        alpha_next = 1 / np.sqrt(sigma_next ** 2 + 1)
        weights = alpha_next * (1 - sigma_next / sigma)
        # First order at the first step, and at the last one where diffusers lowers the order there.
        step = np.arange(num_steps)
        lower_final = (config.get("euler_at_final", False) or final == "zero"
                       or (config.get("lower_order_final", True) and num_steps < 15))
        second = (order == 2) & (step > 0) & ~((step == num_steps - 1) & lower_final)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.log(sigma_prev / sigma) / np.log(sigma / sigma_next)
            difference_weights = np.where(second, weights / (2 * r), 0.0)
        ratios = sigma_next * alpha_next / (sigma / np.sqrt(sigma ** 2 + 1))
        return cls(jnp.asarray(timesteps, jnp.int32),
                   *(jnp.asarray(a, jnp.float32) for a in (1 / (sigma ** 2 + 1), ratios, weights, difference_weights)),
                   prediction_type)

    def scale_model_input(self, i, x):
        return x

    def init_memory(self, x):
        return jnp.zeros_like(x)

    def step(self, i, x, model_output, key, memory):
        x0, _ = _predicted_sample_and_noise(self.prediction_type, x, model_output, self.alphas[i])
        return self.ratios[i] * x + self.weights[i] * x0 + self.difference_weights[i] * (x0 - memory), x0


SCHEDULERS = {"euler_a": EulerAncestral, "euler": Euler, "ddim": DDIM, "dpm++2m": DPMSolverMultistep}


def make_scheduler(name: str, scheduler_config: Mapping[str, Any], num_steps: int):
    """The scheduler called `name` (a key of SCHEDULERS) for num_steps steps."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].create(scheduler_config, num_steps)
