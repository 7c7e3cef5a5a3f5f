"""The named config `f2d_sdxl` (f2d_jax/configs/f2d_sdxl.py), here for `--config configs/f2d_sdxl.py`
in a checkout."""
from f2d_jax.configs.f2d_sdxl import get_config  # noqa: F401
