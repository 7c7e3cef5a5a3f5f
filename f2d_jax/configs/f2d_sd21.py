"""Face2Diffusion on Stable Diffusion 2.1 (768 px, v-prediction): one OpenCLIP ViT-H text encoder,
1024 wide, so the mapping network writes two 1024-wide tokens. For 2.1-base (512 px, epsilon) set
--config.weights.sd=stabilityai/stable-diffusion-2-1-base --config.data.resolution=512; the
prediction type is read from the directory's scheduler config.

Run with --config f2d_sd21 (or --config configs/f2d_sd21.py in a checkout)."""
from f2d_jax.configs import f2d_sd14


def get_config():
    config = f2d_sd14.get_config()
    config.weights.sd = "stabilityai/stable-diffusion-2-1"  # local diffusers directory or hub id
    config.model.mapping.token_dim = 1024                   # OpenCLIP ViT-H's width
    config.data.resolution = 768
    return config
