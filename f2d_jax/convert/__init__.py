"""Weight interchange with the official PyTorch checkpoints, Hugging Face and diffusers."""
from f2d_jax.convert.checkpoints import save, save_expression, save_mapping, save_msid, torch_state_dict
from f2d_jax.convert.io import read_state_dict, write_state_dict
from f2d_jax.convert.layout import CheckpointMismatchError, TorchLayout, from_torch, to_torch
from f2d_jax.convert.weights_dir import load, load_expression, load_mapping, load_msid

__all__ = [
    "CheckpointMismatchError", "TorchLayout", "from_torch", "load", "load_expression", "load_mapping",
    "load_msid", "read_state_dict", "save", "save_expression", "save_mapping", "save_msid", "to_torch",
    "torch_state_dict", "write_state_dict",
]
