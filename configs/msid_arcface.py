"""MSID pretraining at paper scale: msid_base_patch8_112 trained with ArcFace on MS1MV3.

The named config `msid_arcface` (f2d_jax/configs/msid_arcface.py), here for `--config configs/msid_arcface.py` in a checkout."""
from f2d_jax.configs.msid_arcface import get_config  # noqa: F401
