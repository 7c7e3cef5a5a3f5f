"""f2d-jax: Face2Diffusion (CVPR 2024) in JAX/Flax. The package's metadata is in pyproject.toml."""
from setuptools import setup

setup()
