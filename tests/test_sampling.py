"""Sampling: the DDIM scheduler against diffusers', and the jitted guidance loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from f2d_jax.models.stable_diffusion import SD14_SCHEDULER, tiny_stable_diffusion
from f2d_jax.sampling import DDIM, decode_images, denoise


@pytest.mark.parametrize("changes", [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"},
                                     {"prediction_type": "v_prediction", "set_alpha_to_one": True},
                                     {"clip_sample": True}])
def test_ddim_matches_diffusers(changes, parity):
    config = {**SD14_SCHEDULER, **changes}
    theirs = DDIMScheduler.from_config(config)
    theirs.set_timesteps(10)
    ours = DDIM.create(config, 10)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), theirs.timesteps.numpy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ours_x, theirs_x, error = jnp.asarray(x), torch.from_numpy(x), 0.0
    for i, t in enumerate(theirs.timesteps):
        output = rng.standard_normal(x.shape).astype(np.float32)
        ours_x = ours.step(i, ours_x, jnp.asarray(output))
        theirs_x = theirs.step(torch.from_numpy(output), t, theirs_x).prev_sample
        error = max(error, float(np.abs(np.asarray(ours_x) - theirs_x.numpy()).max()))
    parity(f"DDIM, 10 steps {changes or 'SD v1.4 config'}", error, 1e-4)


def test_ddim_rejects_bad_settings():
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        DDIM.create(SD14_SCHEDULER, 0)
    with pytest.raises(ValueError, match="timestep_spacing='karras' is not supported"):
        DDIM.create({**SD14_SCHEDULER, "timestep_spacing": "karras"}, 10)


def test_guided_denoising_loop_runs_under_jit():
    sd, params = tiny_stable_diffusion(jax.random.key(0))
    scheduler = DDIM.create(sd.scheduler_config, 3)
    context = jax.random.normal(jax.random.key(1), (2, 77, 32))

    @jax.jit
    def generate(params, noise, context, uncond):
        latents = denoise(sd.unet, params["unet"], scheduler, noise, context, uncond, 7.0)
        return latents, decode_images(sd.vae, params["vae"], latents, sd.vae_scaling_factor)

    noise = jax.random.normal(jax.random.key(2), (2, 4, 8, 8))
    latents, images = generate(params, noise, context, jnp.zeros_like(context))
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 64, 64, 3) and images.dtype == jnp.uint8
    # Guidance 1 with equal contexts is plain DDIM on the conditional prediction.
    same = denoise(sd.unet, params["unet"], scheduler, noise, context, context, 1.0)
    assert not np.allclose(same, latents)
