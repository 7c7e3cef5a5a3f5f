"""Face2Diffusion on Stable Diffusion v1.5: the SD v1 structure, so everything is f2d_sd14's but the weights.

Run with --config f2d_sd15 (or --config configs/f2d_sd15.py in a checkout)."""
from f2d_jax.configs import f2d_sd14


def get_config():
    config = f2d_sd14.get_config()
    config.weights.sd = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # local diffusers directory or hub id
    return config
