"""The tiny config on the SD 2 structure (GELU text encoder padding with "!", linear projections in
the UNet's transformers, v-prediction): random-init, for CPU tests and demos.

Run with --config tiny_sd2 (or --config configs/tiny_sd2.py in a checkout)."""
from f2d_jax.configs import tiny
from f2d_jax.models.stable_diffusion import TINY_SD2_CONFIGS, clip_text_fields


def get_config():
    config = tiny.get_config()
    config.model.tiny_base = "sd2"
    config.model.text_encoder.update(clip_text_fields(TINY_SD2_CONFIGS["text_encoder"]))
    return config
