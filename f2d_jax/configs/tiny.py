"""Tiny random-init models and synthetic data for CPU tests and the offline demo.

The structure of f2d_sd14 with every model shrunk; the text encoder keeps the real SD v1
vocabulary (49408 tokens) so the real tokenizer works. Empty weights: random init, and an
empty weights.sd means the tiny random Stable Diffusion (stable_diffusion.tiny_stable_diffusion).
"""
import ml_collections

from f2d_jax.configs import f2d_sd14
from f2d_jax.models.stable_diffusion import TINY_CONFIGS, clip_text_fields


def get_config():
    config = f2d_sd14.get_config()
    config.model.msid.update(width=32, depth=4, num_heads=2, tap_layers=(0, 1, 2, 3))
    config.model.mapping.update(identity_dim=4 * 32, hidden_dim=64, token_dim=32)
    config.model.expression.update(layers=(1, 1, 1, 1), width=8)
    # The text encoder of the tiny Stable Diffusion bundle.
    fields = clip_text_fields(TINY_CONFIGS["text_encoder"])
    config.model.text_encoder = ml_collections.ConfigDict({k: v for k, v in fields.items() if v is not None})
    config.weights.update(sd="", msid="", mapping="", expression="")
    config.model.tiny_base = "sd1"   # the structure of the tiny random SD (empty weights.sd): sd1, sd2 or sdxl

    config.data.update(resolution=64, holdout=2, synthetic_identities=8, synthetic_examples=256)
    config.train.update(steps=60, batch_size=8, compute_dtype="float32", remat_unet=False)
    config.optim.update(lr=1e-3, warmup_steps=10)
    config.checkpoint.update(every=20, keep=2)
    config.log.update(every=10, sample_every=30, sample_steps=4, sample_faces=2, sample_prompts=("a photo of f l",))
    return config
