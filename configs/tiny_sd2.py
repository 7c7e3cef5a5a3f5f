"""The named config `tiny_sd2` (f2d_jax/configs/tiny_sd2.py), here for `--config configs/tiny_sd2.py`
in a checkout."""
from f2d_jax.configs.tiny_sd2 import get_config  # noqa: F401
