"""MSID pretraining on CPU: a tiny MSID (configs/tiny.py's sizes) learns 16 synthetic identities
in about a minute, with verification on held-out synthetic pairs."""
from f2d_jax.configs import msid_arcface


def get_config():
    config = msid_arcface.get_config()
    config.model.msid.update(width=32, depth=4, num_heads=2, tap_layers=(0, 1, 2, 3))
    config.arcface.update(num_identities=16, scale=32.0, margins=(1.0, 0.2, 0.0))
    config.data.update(synthetic_identities=16, synthetic_examples=4096, synthetic_pairs=200)
    config.train.update(steps=60, batch_size=32, compute_dtype="float32")
    config.optim.update(lr=2e-3, warmup_steps=10, weight_decay=0.05)
    config.checkpoint.update(every=20, keep=2)
    config.log.update(every=10, verify_every=20, verify_batch_size=40)
    return config
