"""Sampling: schedulers and the jitted classifier-free-guidance denoising loop."""
from f2d_jax.sampling.loop import decode_images, denoise
from f2d_jax.sampling.schedulers import DDIM, SCHEDULERS

__all__ = ["DDIM", "SCHEDULERS", "decode_images", "denoise"]
