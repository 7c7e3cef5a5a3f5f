"""MSID pretraining: the multi-scale identity encoder trained as a face recognizer (ArcFace)."""
from f2d_jax.pretrain.loop import train_msid

__all__ = ["train_msid"]
