"""The named config `f2d_sd21` (f2d_jax/configs/f2d_sd21.py), here for `--config configs/f2d_sd21.py`
in a checkout."""
from f2d_jax.configs.f2d_sd21 import get_config  # noqa: F401
