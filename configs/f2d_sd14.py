"""Face2Diffusion as in the paper: SD v1.4, the official MSID and mapping sizes, CGDR training.

The named config `f2d_sd14` (f2d_jax/configs/f2d_sd14.py), here for `--config configs/f2d_sd14.py` in a checkout."""
from f2d_jax.configs.f2d_sd14 import get_config  # noqa: F401
