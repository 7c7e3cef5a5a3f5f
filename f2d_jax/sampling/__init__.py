"""Sampling: schedulers, the jitted classifier-free-guidance denoising loop and the F2DPipeline API."""
from f2d_jax.sampling.loop import decode_images, denoise
from f2d_jax.sampling.pipeline import (DEFAULT_BATCH_SIZE, MAX_SEED, F2DPipeline, NonFiniteImagesError, WeightsError,
                                       as_seeds, check_identity_scale, check_sampling, check_size, check_true_cfg,
                                       seed_range, with_weights)
from f2d_jax.sampling.schedulers import (DDIM, SCHEDULERS, DPMSolverMultistep, Euler, EulerAncestral,
                                         make_scheduler)

__all__ = ["DDIM", "DEFAULT_BATCH_SIZE", "DPMSolverMultistep", "Euler", "EulerAncestral", "F2DPipeline", "MAX_SEED",
           "NonFiniteImagesError", "SCHEDULERS", "WeightsError", "as_seeds", "check_identity_scale", "check_sampling",
           "check_size", "check_true_cfg", "decode_images", "denoise", "make_scheduler", "seed_range", "with_weights"]
