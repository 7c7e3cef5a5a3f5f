"""Tiny random-init models and synthetic data for CPU tests and the offline demo.

The named config `tiny` (f2d_jax/configs/tiny.py), here for `--config configs/tiny.py` in a checkout."""
from f2d_jax.configs.tiny import get_config  # noqa: F401
