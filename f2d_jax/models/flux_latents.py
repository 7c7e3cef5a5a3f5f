"""FLUX.1's latents as its transformer sees them: 2x2 patches of the VAE's latent packed into tokens, their
position ids, and the VAE latent's normalization. Pure jnp functions computing what diffusers' FluxPipeline
computes (`_pack_latents`, `_unpack_latents`, `_prepare_latent_image_ids`, and the scaling around
`vae.encode` / `vae.decode`), with the same element order, so tokens and ids line up with the PyTorch model's.
"""
from __future__ import annotations

import jax.numpy as jnp


def pack_latents(latents):
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens: one per 2x2 patch, row-major over the patches,
    its features channel-major then the patch's row and column (c, dy, dx)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)   # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed, height: int, width: int, vae_scale_factor: int):
    """(B, N, 4C) tokens of a `height` x `width` image -> (B, C, H, W) latents, H and W the image's sides over
    `vae_scale_factor` rounded down to even numbers (diffusers': packing needs even latent sides)."""
    b, _, features = packed.shape
    h, w = 2 * (int(height) // (vae_scale_factor * 2)), 2 * (int(width) // (vae_scale_factor * 2))
    x = packed.reshape(b, h // 2, w // 2, features // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)   # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, features // 4, h, w)


def latent_image_ids(height: int, width: int):
    """(height/2 * width/2, 3) float32 position ids of the tokens `pack_latents` makes of (B, C, height, width)
    latents: (0, patch row, patch column), in the tokens' order."""
    rows, cols = jnp.meshgrid(jnp.arange(height // 2), jnp.arange(width // 2), indexing="ij")
    ids = jnp.stack([jnp.zeros_like(rows), rows, cols], axis=-1).astype(jnp.float32)
    return ids.reshape(-1, 3)


def to_latents(vae_sample, scaling_factor: float, shift_factor: float | None):
    """A VAE posterior sample (or its mean) -> the latents the transformer is trained on:
    (z - shift_factor) * scaling_factor (a null shift_factor, as SD's VAE config has, is 0)."""
    return (vae_sample - (shift_factor or 0.0)) * scaling_factor


def from_latents(latents, scaling_factor: float, shift_factor: float | None):
    """The inverse of `to_latents`, what the VAE decodes: latents / scaling_factor + shift_factor."""
    return latents / scaling_factor + (shift_factor or 0.0)
