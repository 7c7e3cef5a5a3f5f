"""MSID pretraining on CPU: a tiny MSID (configs/tiny.py's sizes) learns 16 synthetic identities

The named config `msid_tiny` (f2d_jax/configs/msid_tiny.py), here for `--config configs/msid_tiny.py` in a checkout."""
from f2d_jax.configs.msid_tiny import get_config  # noqa: F401
