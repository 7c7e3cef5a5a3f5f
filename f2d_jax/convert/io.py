"""Reading and writing weight files: PyTorch .pt/.pth/.bin, .safetensors and Flax .msgpack.

State dicts travel as ``{key: numpy array}``. Only the .pt family needs torch (the `torch`
extra) and only .msgpack needs Flax; each is imported on first use, so the JAX path never loads
torch and the PyTorch side (f2d_jax.torch) never loads JAX.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
FLAX_SUFFIXES = (".msgpack",)
STATE_DICT_SUFFIXES = TORCH_SUFFIXES + SAFETENSORS_SUFFIXES


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading or writing PyTorch .pt files needs torch: pip install 'f2d-jax[torch]' "
                          "(or use the .safetensors form of the checkpoint)") from e
    return torch


def _existing(path) -> Path:
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    return path


def _unwrap(obj: Any, path: Path, key: str | None) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint object (`key` picks a nested one)."""
    if key is not None and isinstance(obj, Mapping) and key in obj:
        obj = obj[key]
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        hint = f" (looked for the entry {key!r})" if key else ""
        raise ValueError(f"{path} does not hold a state dict of tensors{hint}; top-level entries: {keys}")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path, key: str | None = None) -> dict[str, np.ndarray]:
    """A PyTorch state dict from .pt/.pth/.bin/.ckpt (torch) or .safetensors, as numpy arrays; from every shard
    of a sharded checkpoint given its index (`*.safetensors.index.json`, `*.bin.index.json`).

    `key` selects a nested state dict (e.g. "net_recon" in a Deep3DFaceRecon checkpoint).
    bfloat16 tensors become float32 (numpy has no bfloat16).
    """
    path = _existing(path)
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"{path} is not a sharded checkpoint's index (JSON with a weight_map)") from None
        return {k: v for shard in shards for k, v in read_state_dict(path.parent / shard, key).items()}
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return dict(_unwrap(_read_safetensors(path), path, key))
    if suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weight format {suffix!r}; expected a state dict "
                         f"({', '.join(STATE_DICT_SUFFIXES)})")
    torch = _torch()
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or non-PyTorch file
        if "Unsupported global" in str(e):
            raise ValueError(f"{path} pickles Python objects beside its tensors (a whole model or training state): "
                             "load it in PyTorch and torch.save its state_dict() instead") from None
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: it is damaged, truncated or of another "
                         f"format ({type(e).__name__})") from None
    state = _unwrap(obj, path, key)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy() for k, v in state.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    import ml_dtypes  # numpy learns bfloat16, which safetensors.numpy cannot read otherwise
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} could not be read as safetensors (empty, truncated or another format): {e}") from e
    return {k: v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v for k, v in state.items()}


def write_state_dict(state: Mapping[str, np.ndarray], path) -> Path:
    """Write a state dict as .pt (torch.save of tensors) or .safetensors, chosen by suffix."""
    path = Path(os.fspath(path)).expanduser()
    suffix = path.suffix.lower()
    arrays = {k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in state.items()}
    if suffix not in (*SAFETENSORS_SUFFIXES, ".pt", ".pth"):
        raise ValueError(f"{path}: write .pt, .pth or .safetensors, not {suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # the umask's permissions, as every other file (safetensors' save_file makes 0600)
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.numpy import save
            f.write(save(arrays))
        else:
            torch = _torch()
            torch.save({k: torch.tensor(v) for k, v in arrays.items()}, f)
    tmp.replace(path)  # never leave a half-written file under the final name
    return path


def read_flax(path, target: Any = None) -> Any:
    """Variables from a Flax .msgpack file (restored onto `target`'s structure when given)."""
    from flax import serialization

    data = _existing(path).read_bytes()
    try:
        return serialization.from_bytes(target, data) if target is not None else serialization.msgpack_restore(data)
    except Exception as e:
        raise ValueError(f"{path} could not be read as Flax msgpack weights: {e}") from e


def write_flax(variables: Any, path) -> Path:
    from flax import serialization

    path = Path(os.fspath(path)).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(serialization.to_bytes(variables))
    tmp.replace(path)  # never leave a half-written file under the final name
    return path


def read_manifest(path, kind: str, missing: str) -> dict[str, Any]:
    """The JSON manifest at `path` whose "format" is `kind`; FileNotFoundError(`missing`) where there is none."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        raise ValueError(f"{path} is not an {kind} manifest")
    return manifest
