"""The tiny config on the SDXL structure (two text encoders, 32 and 48 wide, the UNet's added text and
time embeddings): random-init, for CPU tests and demos. The mapping network writes 32 + 48 wide tokens.

Run with --config tiny_sdxl (or --config configs/tiny_sdxl.py in a checkout)."""
from f2d_jax.configs import tiny


def get_config():
    config = tiny.get_config()
    config.model.tiny_base = "sdxl"
    config.model.mapping.token_dim = 32 + 48
    return config
