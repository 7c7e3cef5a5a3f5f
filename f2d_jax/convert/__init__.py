"""Weight interchange with the official PyTorch checkpoints, Hugging Face and diffusers.

The names below are looked up in their module on first use, so that `f2d_jax.convert.io` (reading
and writing weight files) imports neither JAX nor Flax, e.g. for the PyTorch side (f2d_jax.torch).
"""
import importlib

_HOMES = {
    "checkpoints": ("save", "save_expression", "save_mapping", "save_msid", "torch_state_dict"),
    "io": ("read_state_dict", "write_state_dict"),
    "layout": ("CheckpointMismatchError", "NonFiniteWeightsError", "TorchLayout", "from_torch", "to_torch"),
    "weights_dir": ("load", "load_expression", "load_mapping", "load_msid"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _HOMES:  # a submodule not imported yet, e.g. `convert.checkpoints`
        return importlib.import_module(f"{__name__}.{name}")
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
