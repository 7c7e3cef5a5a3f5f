"""Sampling: schedulers, the jitted classifier-free-guidance denoising loop and the F2DPipeline API."""
from f2d_jax.sampling.loop import decode_images, denoise
from f2d_jax.sampling.pipeline import F2DPipeline, WeightsError, check_size
from f2d_jax.sampling.schedulers import (DDIM, SCHEDULERS, DPMSolverMultistep, Euler, EulerAncestral,
                                         make_scheduler)

__all__ = ["DDIM", "DPMSolverMultistep", "Euler", "EulerAncestral", "F2DPipeline", "SCHEDULERS", "WeightsError",
           "check_size", "decode_images", "denoise", "make_scheduler"]
