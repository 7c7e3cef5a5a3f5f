"""f2d-jax: Face2Diffusion (CVPR 2024) in JAX/Flax."""
import os

# transformers and diffusers import TensorFlow whenever it is installed (the `data` extra needs it
# to write datasets), which costs seconds per process; nothing here uses their TensorFlow side.
os.environ.setdefault("USE_TF", "0")
# Without torch, transformers 5 advises at import that only its tokenizers can be used: what the JAX path uses.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"


class InputWarning(UserWarning):
    """An input used otherwise than it may look: a prompt cut at 77 tokens, several faces in a photo, an
    identity scale above 1, ... (the web app shows these in the page)."""
