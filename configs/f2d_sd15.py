"""The named config `f2d_sd15` (f2d_jax/configs/f2d_sd15.py), here for `--config configs/f2d_sd15.py`
in a checkout."""
from f2d_jax.configs.f2d_sd15 import get_config  # noqa: F401
