"""The denoising loop with classifier-free guidance, one `lax.fori_loop` under `jit`."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def denoise(unet, unet_params, scheduler, latents, context, uncond_context, guidance: float, key=None,
            callback=None):
    """(B, C, h, w) initial noise -> denoised latents.

    context / uncond_context: (B, 77, D) prompt and unconditional (e.g. empty-prompt) embeddings;
    eps = eps_uncond + guidance * (eps_cond - eps_uncond) at every step. key: the noise of the
    ancestral schedulers: one key per image, (B,), so that an image does not depend on the batch it is
    in, or one key for the batch. callback: called with the step index inside the loop
    (e.g. a `jax.debug.callback` for a progress bar).
    """
    contexts = jnp.concatenate([uncond_context, context]).astype(unet.dtype)
    keys = key if key is not None else jax.random.key(0)
    keys = jax.random.split(keys, latents.shape[0]) if keys.ndim == 0 else keys

    def body(i, carry):
        x, memory = carry
        if callback is not None:
            callback(i)
        model_input = scheduler.scale_model_input(i, x)
        t = jnp.broadcast_to(scheduler.timesteps[i], (2 * x.shape[0],))
        out = unet.apply(unet_params, jnp.concatenate([model_input, model_input]).astype(unet.dtype), t,
                         contexts).sample.astype(jnp.float32)
        uncond, cond = jnp.split(out, 2)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
        return scheduler.step(i, x, uncond + guidance * (cond - uncond), step_keys, memory)

    x = latents * scheduler.init_noise_sigma
    return jax.lax.fori_loop(0, scheduler.timesteps.shape[0], body, (x, scheduler.init_memory(x)))[0]


def decode_images(vae, vae_params, latents, scaling_factor: float):
    """(B, C, h, w) latents -> (B, H, W, 3) uint8 images."""
    images = vae.apply(vae_params, (latents / scaling_factor).astype(vae.dtype), method=vae.decode).sample
    images = jnp.transpose(images.astype(jnp.float32), (0, 2, 3, 1))
    return jnp.round(jnp.clip((images + 1) * 127.5, 0, 255)).astype(jnp.uint8)
