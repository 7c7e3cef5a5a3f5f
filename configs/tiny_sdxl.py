"""The named config `tiny_sdxl` (f2d_jax/configs/tiny_sdxl.py), here for `--config configs/tiny_sdxl.py`
in a checkout."""
from f2d_jax.configs.tiny_sdxl import get_config  # noqa: F401
