"""Sampling: the schedulers step by step against diffusers', and the jitted guidance loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, \
    EulerDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete

from f2d_jax.models.bases import SD14_SCHEDULER
from f2d_jax.models.stable_diffusion import UnsupportedConfigError, tiny_stable_diffusion
from f2d_jax.sampling import DDIM, SCHEDULERS, decode_images, denoise, make_scheduler

THEIRS = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler, "ddim": DDIMScheduler,
          "dpm++2m": DPMSolverMultistepScheduler}
SPACINGS = [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}]
CASES = [("euler_a", c) for c in SPACINGS + [{"prediction_type": "v_prediction"}]] + \
    [("euler", c) for c in SPACINGS + [{"prediction_type": "v_prediction"}, {"prediction_type": "sample"},
                                       {"final_sigmas_type": "sigma_min"}]] + \
    [("ddim", c) for c in SPACINGS + [{"prediction_type": "v_prediction", "set_alpha_to_one": True},
                                      {"clip_sample": True}]] + \
    [("dpm++2m", c) for c in SPACINGS + [{"prediction_type": "v_prediction"}, {"final_sigmas_type": "sigma_min"},
                                         {"lower_order_final": False}, {"solver_order": 1}]]


def _max_error(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - theirs.numpy()).max())


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("name, changes", CASES)
def test_scheduler_matches_diffusers(name, changes, steps, parity, monkeypatch):
    config = {**SD14_SCHEDULER, **changes}
    theirs = THEIRS[name].from_config(config)
    theirs.set_timesteps(steps)
    ours = make_scheduler(name, config, steps)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), theirs.timesteps.numpy())
    np.testing.assert_allclose(ours.init_noise_sigma, float(theirs.init_noise_sigma), rtol=1e-6)
    # Euler-A: diffusers draws the same noise as ours (jax.random.normal of each image's key).
    noise = {}
    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", lambda *args, **kwargs: noise["step"])
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 4, 8, 8)) * ours.init_noise_sigma).astype(np.float32)
    ours_x, theirs_x, memory, error = jnp.asarray(x), torch.from_numpy(x), ours.init_memory(jnp.asarray(x)), 0.0
    keys = jax.random.split(jax.random.key(0), (steps, x.shape[0]))
    for i, t in enumerate(theirs.timesteps):
        error = max(error, _max_error(ours.scale_model_input(i, ours_x), theirs.scale_model_input(theirs_x, t)))
        output = rng.standard_normal(x.shape).astype(np.float32)
        noise["step"] = torch.from_numpy(np.asarray(jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys[i])))
        ours_x, memory = ours.step(i, ours_x, jnp.asarray(output), keys[i], memory)
        theirs_x = theirs.step(torch.from_numpy(output), t, theirs_x).prev_sample
        error = max(error, _max_error(ours_x, theirs_x))
    parity(f"{type(ours).__name__}, {steps} steps {changes or 'SD v1.4 config'}", error, 1e-4)


@pytest.mark.parametrize("name, config, message", [
    ("heun", {}, "unknown scheduler 'heun': choose one of euler_a, euler, ddim, dpm\\+\\+2m"),
    ("euler_a", {"prediction_type": "sample"}, "prediction_type='sample' is not supported by EulerAncestral "
                                               "\\(supported: 'epsilon', 'v_prediction'\\)"),
    ("euler", {"use_karras_sigmas": True}, "use_karras_sigmas=True is not supported by Euler"),
    ("dpm++2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver\\+\\+' is not supported by "
                                                       "DPMSolverMultistep \\(supported: 'dpmsolver\\+\\+'\\)"),
    ("dpm++2m", {"solver_order": 3}, "solver_order=3 is not supported by DPMSolverMultistep"),
])
def test_bad_scheduler_settings_are_clear_errors(name, config, message):
    error = UnsupportedConfigError if config else ValueError
    with pytest.raises(error, match=message):
        make_scheduler(name, {**SD14_SCHEDULER, **config}, 10)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers_reject_bad_steps_and_spacing(name):
    with pytest.raises(ValueError, match="steps must be between 1 and 1000, got 0"):
        make_scheduler(name, SD14_SCHEDULER, 0)
    with pytest.raises(ValueError, match="timestep_spacing='karras' is not supported"):
        make_scheduler(name, {**SD14_SCHEDULER, "timestep_spacing": "karras"}, 10)


@pytest.fixture(scope="module")
def tiny_sd():
    return tiny_stable_diffusion(jax.random.key(0))


@pytest.mark.slow
def test_guided_denoising_loop_runs_under_jit(tiny_sd):
    sd, params = tiny_sd
    scheduler = DDIM.create(sd.scheduler_config, 3)
    context = jax.random.normal(jax.random.key(1), (2, 77, 32))

    @jax.jit
    def generate(params, noise, context, uncond):
        latents = denoise(sd.unet, params["unet"], scheduler, noise, context, uncond, 7.0)
        return latents, decode_images(sd.vae, params["vae"], latents, sd.vae_scaling_factor)[0]

    noise = jax.random.normal(jax.random.key(2), (2, 4, 8, 8))
    latents, images = generate(params, noise, context, jnp.zeros_like(context))
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 64, 64, 3) and images.dtype == jnp.uint8
    # Guidance 1 with equal contexts is plain DDIM on the conditional prediction.
    same = denoise(sd.unet, params["unet"], scheduler, noise, context, context, 1.0)
    assert not np.allclose(same, latents)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.slow
def test_every_scheduler_runs_in_the_jitted_loop(tiny_sd, name):
    sd, params = tiny_sd
    context = jax.random.normal(jax.random.key(1), (2, 77, 32))
    noise = jax.random.normal(jax.random.key(2), (2, 4, 8, 8))
    generate = jax.jit(lambda scheduler, key: denoise(sd.unet, params["unet"], scheduler, noise, context,
                                                      jnp.zeros_like(context), 7.0, key))
    scheduler = make_scheduler(name, sd.scheduler_config, 3)
    a, again, b = (generate(scheduler, jax.random.key(k)) for k in (0, 0, 1))
    assert a.shape == (2, 4, 8, 8) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, again)
    assert (not np.allclose(a, b)) if name == "euler_a" else np.array_equal(a, b)  # only Euler-A draws noise
