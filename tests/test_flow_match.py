"""FLUX.1's flow-matching sampler against diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline drives it
(the schedule for FLUX.1-dev at 256 and 1024 px and schnell, a whole Euler loop), and the training sigmas
and noised latents."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift

from f2d_jax.models.bases import FLUX_DEV_SCHEDULER, FLUX_SCHNELL_SCHEDULER
from f2d_jax.models.sd_config import UnsupportedConfigError
from f2d_jax.sampling import flow_match as fm


def _diffusers_scheduler(config: dict, num_steps: int, image_seq_len: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler with the timesteps FluxPipeline sets: sigmas from 1 to 1/N and mu of the token count."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items() if k != "_class_name"})
    mu = diffusers_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 6000])
def test_calculate_shift_is_diffusers(image_seq_len):
    assert fm.calculate_shift(image_seq_len) == diffusers_shift(image_seq_len)


@pytest.mark.parametrize("name, config, num_steps, image_seq_len", [
    ("FLUX.1-dev 256x256", FLUX_DEV_SCHEDULER, 28, 16 * 16),
    ("FLUX.1-dev 1024x1024", FLUX_DEV_SCHEDULER, 28, 64 * 64),
    ("FLUX.1-schnell 1024x1024", FLUX_SCHNELL_SCHEDULER, 4, 64 * 64),
    ("linear time shift 512x512", dict(FLUX_DEV_SCHEDULER, time_shift_type="linear"), 10, 32 * 32),
])
def test_schedule_matches_diffusers(name, config, num_steps, image_seq_len, parity):
    theirs = _diffusers_scheduler(config, num_steps, image_seq_len)
    timesteps, sigmas = fm.flow_schedule(num_steps, image_seq_len, config)
    assert timesteps.shape == (num_steps,) and sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0
    assert timesteps.dtype == sigmas.dtype == np.float32
    parity(f"flow-match sigmas ({name}, {num_steps} steps)", _max_err(sigmas, theirs.sigmas.numpy()), 1e-6)
    parity(f"flow-match timesteps ({name}, {num_steps} steps)", _max_err(timesteps, theirs.timesteps.numpy()), 1e-6)


def test_schedule_shift_by_resolution():
    """Dev shifts toward the noise, more for more tokens (at 256 tokens by e^0.5); schnell not at all."""
    plain = np.linspace(1.0, 1 / 28, 28)
    small, large = (fm.flow_schedule(28, n)[1][:-1] for n in (256, 4096))
    assert np.all(large[1:] > small[1:]) and np.all(small[1:] > plain[1:]) and large[0] == small[0] == 1
    np.testing.assert_allclose(small, np.exp(0.5) / (np.exp(0.5) + 1 / plain - 1), rtol=1e-6)
    np.testing.assert_allclose(fm.flow_schedule(4, 4096, FLUX_SCHNELL_SCHEDULER)[1], [1, 0.75, 0.5, 0.25, 0])


@pytest.mark.parametrize("config, num_steps", [(FLUX_DEV_SCHEDULER, 8), (FLUX_SCHNELL_SCHEDULER, 4)])
def test_sampling_loop_matches_diffusers(config, num_steps, parity):
    """Both loops with the same velocity, linear in the latents and the time it is given."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 64)).astype(np.float32)   # packed 8x8 latents of 16 channels
    mix = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    drift = rng.standard_normal((16, 64)).astype(np.float32)

    def velocity(latents, t, mix, drift):
        return latents @ mix - 0.5 * latents + t * drift

    scheduler = _diffusers_scheduler(config, num_steps, 16)
    scheduler.set_begin_index(0)
    theirs, seen = torch.from_numpy(x), []
    for t in scheduler.timesteps:
        seen.append(float(t / 1000))
        v = velocity(theirs, t / 1000, torch.from_numpy(mix), torch.from_numpy(drift))
        theirs = scheduler.step(v, t, theirs).prev_sample
    _, sigmas = fm.flow_schedule(num_steps, 16, config)
    calls = []

    def recorded(latents, t):
        calls.append(t.shape)
        return velocity(latents, t, mix, drift)

    ours = jax.jit(lambda x, s: fm.sample(recorded, x, s))(x, sigmas)
    assert calls == [()] and ours.shape == x.shape and ours.dtype == jnp.float32
    np.testing.assert_allclose(sigmas[:-1], seen, rtol=0, atol=1e-7)
    assert np.abs(theirs.numpy() - x).max() > 1
    parity(f"flow-match Euler loop ({num_steps} steps, linear velocity)", _max_err(ours, theirs.numpy()), 1e-5)


def test_euler_step_keeps_dtype():
    x = jnp.ones((2, 4), jnp.bfloat16)
    out = fm.euler_step(x, jnp.full((2, 4), 2.0, jnp.float32), 1.0, 0.75)
    assert out.dtype == jnp.bfloat16 and np.all(np.asarray(out, np.float32) == 0.5)


def test_training_sigmas():
    key = jax.random.key(0)
    u = jax.nn.sigmoid(jax.random.normal(key, (4096,)))
    small, large = (fm.training_sigmas(key, 4096, n) for n in (256, 4096))
    schnell = fm.training_sigmas(key, 4096, 4096, FLUX_SCHNELL_SCHEDULER)
    for sigmas in (small, large, schnell):
        assert sigmas.shape == (4096,) and sigmas.dtype == jnp.float32
        assert float(sigmas.min()) > 0 and float(sigmas.max()) < 1
    # The shift moves every sigma toward the noise, further for more tokens; schnell's are the logit-normal's.
    assert bool(jnp.all(large > small)) and bool(jnp.all(small > u))
    np.testing.assert_allclose(small, fm.shift_sigmas(u, 256), rtol=1e-6)
    np.testing.assert_array_equal(schnell, u)
    assert abs(float(u.mean()) - 0.5) < 0.02 and float(large.mean()) > float(small.mean()) > 0.55
    assert not np.array_equal(fm.training_sigmas(jax.random.key(1), 4096, 256), small)


def test_noised_matches_scale_noise(parity):
    """Per-sample sigmas as diffusers' scale_noise applies them; an Euler step from there to sigma 0 with
    the target velocity lands on x0."""
    scheduler = _diffusers_scheduler(FLUX_DEV_SCHEDULER, 28, 1024)
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((3, 16, 8, 8)).astype(np.float32) for _ in range(2))
    index = np.array([0, 9, 27])
    sigma = scheduler.sigmas.numpy()[index]
    theirs = scheduler.scale_noise(torch.from_numpy(x0), scheduler.timesteps[index], torch.from_numpy(noise))
    x_t, target = fm.noised(x0, noise, sigma)
    assert x_t.shape == target.shape == x0.shape
    parity("flow-match noised latents (per-sample sigma)", _max_err(x_t, theirs.numpy()), 1e-6)
    np.testing.assert_array_equal(target, noise - x0)
    back = fm.euler_step(x_t, target, sigma[:, None, None, None], 0.0)
    np.testing.assert_allclose(back, x0, atol=2e-6)
    np.testing.assert_allclose(fm.noised(x0, noise, 1.0)[0], noise)
    np.testing.assert_allclose(fm.noised(x0, noise, 0.0)[0], x0)


@pytest.mark.parametrize("changes, message", [
    ({"use_karras_sigmas": True}, "use_karras_sigmas=True is not supported"),
    ({"shift_terminal": 0.1}, "shift_terminal=0.1 is not supported"),
    ({"stochastic_sampling": True}, "stochastic_sampling=True is not supported"),
    ({"time_shift_type": "cosine"}, "time_shift_type='cosine' is not supported"),
])
def test_unsupported_scheduler_config(changes, message):
    with pytest.raises(UnsupportedConfigError, match=f"scheduler config: {message}"):
        fm.flow_schedule(4, 256, dict(FLUX_DEV_SCHEDULER, **changes))
