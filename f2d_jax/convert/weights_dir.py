"""A weights directory: Flax .msgpack per model plus a manifest with each model's configuration.

    DIR/f2d_weights.json   {"models": {"msid": {"config": {...}, "file": "msid.msgpack", ...}, ...}}
    DIR/msid.msgpack, DIR/mapping.msgpack, ...

What `python -m f2d_jax.convert import` writes and the rest of the package reads. The manifest
is written last, so a directory without one is incomplete, never mistaken for a finished one.
`load` and `load_*` take either such a directory or a single weight file (checkpoints.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from f2d_jax.convert import io
from f2d_jax.convert.checkpoints import SPECS, load_file
from f2d_jax.models import ExpressionEncoder, MappingNetwork, MSIDEncoder

MANIFEST = "f2d_weights.json"
FORMAT = "f2d-jax weights"


def module_config(module: nn.Module) -> dict[str, Any]:
    """A module's constructor arguments as JSON-friendly values."""
    config = {}
    for field in dataclasses.fields(module):
        if field.name in ("parent", "name"):
            continue
        value = getattr(module, field.name)
        config[field.name] = jnp.dtype(value).name if field.name == "dtype" else value
    return config


def module_from_config(name: str, config: Mapping[str, Any]) -> nn.Module:
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    if "dtype" in config:
        config["dtype"] = getattr(jnp, config["dtype"])  # "bfloat16" -> jnp.bfloat16
    return SPECS[name].model(**config)


def save_weights_dir(directory, models: Mapping[str, tuple[nn.Module, Any]],
                     sources: Mapping[str, str] | None = None) -> Path:
    """Write {name: (module, variables)} (names as in `f2d_jax.convert.SPECS`) to `directory`, keeping
    the models already there; one of the same name is replaced."""
    directory = Path(os.fspath(directory))
    unknown = sorted(models.keys() - SPECS.keys())
    if unknown:
        raise ValueError(f"unknown model {', '.join(unknown)}; expected one of {', '.join(SPECS)}")
    directory.mkdir(parents=True, exist_ok=True)
    stored = stored_models(directory)
    entries = {name: entry for name, entry in stored.items() if name not in models}
    if entries != stored:  # the replaced models leave the manifest before their files change
        _write_manifest(directory, entries)
    for name, (module, variables) in models.items():
        file = io.write_flax(variables, directory / f"{name}.msgpack")
        entries[name] = {"class": type(module).__name__, "config": module_config(module),
                         "file": file.name, "source": (sources or {}).get(name, "")}
    _write_manifest(directory, entries)
    return directory


def _write_manifest(directory: Path, entries: Mapping[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "version": 1, "models": dict(entries)}, indent=2) + "\n")
    tmp.replace(directory / MANIFEST)


def read_manifest(directory) -> dict[str, Any]:
    return io.read_manifest(Path(os.fspath(directory)) / MANIFEST, FORMAT,
                            f"{directory} is not an f2d-jax weights directory (no {MANIFEST}); create one with "
                            "`f2d-convert import`")


def stored_models(directory) -> dict[str, Any]:
    """The manifest entry of each model in `directory`; none where it has no manifest (yet)."""
    return read_manifest(directory)["models"] if (Path(os.fspath(directory)) / MANIFEST).is_file() else {}


def load_weights_dir(directory, names=None) -> dict[str, tuple[nn.Module, Any]]:
    """{name: (module, variables)} for the models in `directory` (all, or those in `names`)."""
    directory = Path(os.fspath(directory))
    entries = read_manifest(directory)["models"]
    missing = set(names or ()) - entries.keys()
    if missing:
        raise ValueError(f"{directory} holds {', '.join(sorted(entries)) or 'no models'}, not {', '.join(sorted(missing))}")
    models = {}
    for name, entry in entries.items():
        if names is not None and name not in names:
            continue
        module = module_from_config(name, entry["config"])
        models[name] = (module, load_file(name, directory / entry["file"], module))
    return models


def load(name: str, path, model: nn.Module | None = None) -> dict[str, Any]:
    """Flax variables for model `name` from .pt/.pth/.safetensors (official layout), .msgpack, or a
    weights directory written by `python -m f2d_jax.convert import` (f2d_weights.json)."""
    if not Path(path).is_dir():
        return load_file(name, path, model)
    stored, variables = load_weights_dir(path, [name])[name]
    if model is not None and model != stored:
        raise ValueError(f"{name} in {path} has the configuration {stored}, not the expected {model}")
    return variables


def load_msid(path, model: MSIDEncoder | None = None) -> dict[str, Any]:
    """MSIDEncoder variables ({"params", "batch_stats"}) from msid.pt / .safetensors / .msgpack."""
    return load("msid", path, model)


def load_mapping(path, model: MappingNetwork | None = None) -> dict[str, Any]:
    """MappingNetwork variables from mapping.pt / .safetensors / .msgpack."""
    return load("mapping", path, model)


def load_expression(path, model: ExpressionEncoder | None = None) -> dict[str, Any]:
    """ExpressionEncoder variables from Deep3DFaceRecon's checkpoint (its "net_recon" entry) or a bare state dict."""
    return load("expression", path, model)
