"""The named config `f2d_flux` (f2d_jax/configs/f2d_flux.py), here for `--config configs/f2d_flux.py`
in a checkout."""
from f2d_jax.configs.f2d_flux import get_config  # noqa: F401
