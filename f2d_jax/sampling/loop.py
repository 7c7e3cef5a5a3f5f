"""The denoising loop with classifier-free guidance: `start` (the state before the first step),
`guided_step` (one step), `steps` (steps first..last - 1 in one `lax.fori_loop`) and `denoise` (all
of them); FLUX.1's flow-matching loop, `flow_denoise`; `decode_images`."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from f2d_jax.models.flux_latents import from_latents
from f2d_jax.models.stable_diffusion import unet_output
from f2d_jax.sampling import flow_match


def start(unet, scheduler, latents, context, uncond_context, key=None):
    """What the steps share and the state before the first one: (contexts, keys, (x, memory)).

    latents: (B, C, h, w) initial noise; context / uncond_context: the prompt's and the unconditional
    (e.g. empty-prompt) conditionings, {"context": (B, 77, D)} and for SDXL "text_embeds" and "time_ids"
    (stable_diffusion.unet_output), concatenated into `contexts` (2B rows). key: the noise of the
    ancestral schedulers: one key per image, (B,), so that an image does not depend on the batch it is
    in, or one key for the batch (split into one per image); `keys` is (B,).
    """
    contexts = jax.tree.map(lambda u, c: jnp.concatenate([u, c]).astype(unet.dtype), uncond_context, context)
    keys = key if key is not None else jax.random.key(0)
    keys = jax.random.split(keys, latents.shape[0]) if keys.ndim == 0 else keys
    x = latents * scheduler.init_noise_sigma
    return contexts, keys, (x, scheduler.init_memory(x))


def guided_step(unet, unet_params, scheduler, contexts, guidance, keys, i, x, memory):
    """Step i: (x, memory) -> (x, memory), with eps = eps_uncond + guidance * (eps_cond - eps_uncond).
    contexts and keys as `start` makes them; image b's noise at step i is drawn from fold_in(keys[b], i)."""
    model_input = scheduler.scale_model_input(i, x)
    t = jnp.broadcast_to(scheduler.timesteps[i], (2 * x.shape[0],))
    out = unet_output(unet, unet_params, jnp.concatenate([model_input, model_input]), t,
                      contexts).astype(jnp.float32)
    uncond, cond = jnp.split(out, 2)
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
    return scheduler.step(i, x, uncond + guidance * (cond - uncond), step_keys, memory)


def steps(unet, unet_params, scheduler, contexts, guidance, keys, first, last, x, memory):
    """Steps first .. last - 1 (traced bounds: one program serves every range) of `guided_step`."""
    def body(i, state):
        return guided_step(unet, unet_params, scheduler, contexts, guidance, keys, i, *state)

    return jax.lax.fori_loop(first, last, body, (x, memory))


def denoise(unet, unet_params, scheduler, latents, context, uncond_context, guidance: float, key=None):
    """(B, C, h, w) initial noise -> denoised latents, every step in one `lax.fori_loop` (arguments as
    `start` and `guided_step` take them)."""
    contexts, keys, state = start(unet, scheduler, latents, context, uncond_context, key)
    return steps(unet, unet_params, scheduler, contexts, guidance, keys, 0, scheduler.timesteps.shape[0], *state)[0]


def flux_start(flux, sigmas, latents, context, uncond_context, key=None):
    """FLUX.1's `start`, for the same calls: (contexts in the transformer's dtype, keys, (x, ())). The contexts
    are the conditioning, or with an `uncond_context` (not None) both, [uncond; cond], for true classifier-free
    guidance. The flow-matching Euler steps draw no noise and keep no memory."""
    del sigmas
    keys = key if key is not None else jax.random.key(0)
    keys = jax.random.split(keys, latents.shape[0]) if keys.ndim == 0 else keys
    contexts = context if uncond_context is None else \
        jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond_context, context)
    contexts = jax.tree.map(lambda x: x.astype(flux.transformer.dtype), contexts)
    return contexts, keys, (latents.astype(jnp.float32), ())


def flux_steps(flux, params, sigmas, contexts, guidance, keys, first, last, x, memory):
    """FLUX.1's `steps`: Euler steps first .. last - 1 (traced bounds) of the flow from sigmas[first] to
    sigmas[last] (`flow_match.flow_schedule`'s), the velocity `flux.predict`'s under `contexts` with the guidance
    embedding guidance[0] (FLUX.1-dev; unused by schnell). When `contexts` holds twice x's rows ([uncond; cond],
    `flux_start`'s), the velocity is v_uncond + guidance[1] (v_cond - v_uncond), FluxPipeline's true
    classifier-free guidance (`guidance`: (2,) then, else a scalar or (1,))."""
    del keys
    guidance = jnp.reshape(jnp.asarray(guidance, jnp.float32), (-1,))
    true_cfg = jax.tree.leaves(contexts)[0].shape[0] != x.shape[0]

    def velocity(x, sigma):
        if not true_cfg:
            return flux.predict(params, x, sigma, contexts, guidance[0])
        both = flux.predict(params, jnp.concatenate([x, x]), sigma, contexts, guidance[0]).astype(jnp.float32)
        uncond, cond = jnp.split(both, 2)
        return uncond + guidance[-1] * (cond - uncond)

    return flow_match.sample(velocity, x, sigmas, first, last), memory


def flow_denoise(flux, params, noise, conditioning, sigmas, guidance=None):
    """FLUX.1: (B, C, h, w) noise -> latents, every step of `sigmas` in one `lax.fori_loop`."""
    return flux_steps(flux, params, sigmas, conditioning, guidance, None, 0, sigmas.shape[0] - 1, noise, ())[0]


def decode_images(vae, vae_params, latents, scaling_factor: float):
    """(B, C, h, w) latents -> ((B, H, W, 3) uint8 images, (B,) whether the latents and the decoded image are
    finite: NaN or infinity would come out as a black or white picture). The VAE decodes
    latents / scaling_factor + its shift_factor (FLUX.1's; none for SD)."""
    images = vae.apply(vae_params, from_latents(latents, scaling_factor, vae.shift_factor).astype(vae.dtype),
                       method=vae.decode)
    images = jnp.transpose(images.astype(jnp.float32), (0, 2, 3, 1))
    finite = jnp.isfinite(latents).all(axis=(1, 2, 3)) & jnp.isfinite(images).all(axis=(1, 2, 3))
    return jnp.round(jnp.clip((images + 1) * 127.5, 0, 255)).astype(jnp.uint8), finite
