"""The named config `tiny_flux` (f2d_jax/configs/tiny_flux.py), here for `--config configs/tiny_flux.py`
in a checkout."""
from f2d_jax.configs.tiny_flux import get_config  # noqa: F401
