"""Name and shape maps between PyTorch state dicts and Flax variable trees.

A PyTorch key such as ``blocks.3.attn.qkv.weight`` names a Flax leaf by a few mechanical rules:
``name.N`` becomes the Flax module ``name_N``; ``weight`` becomes ``kernel`` (transposed),
``scale`` or ``embedding`` depending on what the Flax module holds; BatchNorm buffers live in
the ``batch_stats`` collection; layers stacked by ``nn.scan`` take the index as their leading
axis. A `TorchLayout` adds the few model-specific prefix renames. Conversion is strict: any
missing key, unexpected key or shape mismatch raises `CheckpointMismatchError` listing them all.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_INDEXED = re.compile(r"^(.*)_(\d+)$")
_BATCH_STATS = {"running_mean": "mean", "running_var": "var"}
_COUNTER = "num_batches_tracked"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists missing keys, unexpected keys and bad shapes."""

    def __init__(self, what: str, missing=(), unexpected=(), mismatched=(), limit: int = 25):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"{what} does not match the model:"]
        for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                             ("shape mismatches", self.mismatched)):
            if items:
                shown = ", ".join(str(i) for i in items[:limit])
                more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
                lines.append(f"  {len(items)} {title}: {shown}{more}")
        super().__init__("\n".join(lines))


class NonFiniteWeightsError(ValueError):
    """Weights holding NaN or infinity: nothing computed from them would mean anything."""


def check_finite(tensors: Mapping[str, Any], what: str) -> None:
    """Raise NonFiniteWeightsError naming every tensor of {name: array} that holds NaN or infinity."""
    bad = [name for name, value in tensors.items()
           if np.issubdtype(np.asarray(value).dtype, np.inexact) and not np.isfinite(value).all()]
    if bad:
        more = f" ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise NonFiniteWeightsError(f"{what}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:10])}"
                                    f"{more}); these weights cannot be used: a run that diverged, or a damaged file")


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """How one model's PyTorch keys map onto its Flax tree, beyond the generic rules.

    renames: (torch prefix, flax prefix) pairs in dotted form; the flax prefix is final
      (its module names are not split again), the rest of the key follows the generic rules.
    stacked: flax module paths whose leaves are stacked over layers by ``nn.scan``; the
      PyTorch side has one ``path.N.*`` group per layer.
    ignore: regexes of PyTorch keys that carry nothing the Flax model needs (dropped on import).
    """

    renames: tuple[tuple[str, str], ...] = ()
    stacked: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()


def _split_prefix(key: str, prefix: str) -> str | None:
    """The rest of a dotted key after `prefix` on a component boundary, or None."""
    if key == prefix:
        return ""
    return key[len(prefix) + 1:] if key.startswith(prefix + ".") else None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _generic_to_torch(names) -> str:
    """``(layer1_0, conv1)`` -> ``layer1.0.conv1``."""
    out = []
    for name in names:
        match = _INDEXED.match(name)
        out.append(f"{match[1]}.{match[2]}" if match else name)
    return ".".join(out)


def _stacked_prefix(path: tuple[str, ...], layout: TorchLayout) -> int:
    """Length of the stacked module path that `path` starts with, or 0."""
    for stacked in layout.stacked:
        head = tuple(stacked.split("."))
        if path[:len(head)] == head:
            return len(head)
    return 0


def torch_module_to_flax(dotted: str, layout: TorchLayout) -> tuple[tuple[str, ...], int | None]:
    """A PyTorch module key -> (Flax module path, layer index for stacked modules else None)."""
    parts, rest = [], dotted
    for torch_prefix, flax_prefix in layout.renames:
        tail = _split_prefix(dotted, torch_prefix)
        if tail is not None:
            parts, rest = flax_prefix.split("."), tail
            break
    for part in rest.split(".") if rest else []:
        if part.isdigit() and parts:  # "name.N" -> module "name_N"
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    for stacked in layout.stacked:  # "layers_3.x" -> ("layers", "x"), layer 3
        head = stacked.split(".")
        match = _INDEXED.match(parts[len(head) - 1]) if len(parts) >= len(head) else None
        if parts[:len(head) - 1] == head[:-1] and match and match[1] == head[-1]:
            return tuple(head + parts[len(head):]), int(match[2])
    return tuple(parts), None


def flax_module_to_torch(path: tuple[str, ...], index: int | None, layout: TorchLayout) -> str:
    """The inverse of `torch_module_to_flax`."""
    def renamed(names):
        dotted = ".".join(names)
        for torch_prefix, flax_prefix in layout.renames:
            tail = _split_prefix(dotted, flax_prefix)
            if tail is not None:
                return _join(torch_prefix, _generic_to_torch(tail.split(".") if tail else []))
        return _generic_to_torch(names)

    n = _stacked_prefix(path, layout)
    if not n:
        return renamed(path)
    return _join(renamed(path[:n]), str(index), _generic_to_torch(path[n:]))


# --------------------------------------------------------------------------- leaf transforms

def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    if kernel.ndim == 4:  # Conv HWIO -> OIHW
        return kernel.transpose(3, 2, 0, 1)
    assert kernel.ndim == 2, kernel.shape
    return kernel.T  # Dense (in, out) -> Linear (out, in)


def _kernel_to_flax(weight: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO, (out, in) -> (in, out); any other rank is left for the shape check to report."""
    return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T


def _leaf_to_torch(collection: str, name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    if collection == "batch_stats":
        return {"mean": "running_mean", "var": "running_var"}[name], value
    if name == "kernel":
        return "weight", _kernel_to_torch(value)
    if name in ("scale", "embedding"):
        return "weight", value
    return name, value


def _leaf_to_flax(name: str, value: np.ndarray, module: Mapping[str, Any] | None) -> tuple[str, str, np.ndarray]:
    """(collection, flax leaf name, value) for a PyTorch leaf inside a Flax module."""
    if name in _BATCH_STATS:
        return "batch_stats", _BATCH_STATS[name], value
    if name == "weight" and module is not None:
        if "kernel" in module:
            return "params", "kernel", _kernel_to_flax(value)
        for flax_name in ("scale", "embedding"):
            if flax_name in module:
                return "params", flax_name, value
    return "params", name, value


# --------------------------------------------------------------------------- conversion

def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def to_torch(variables: Mapping[str, Any], layout: TorchLayout, batch_norm_counters: bool = True) -> dict[str, np.ndarray]:
    """Flax variables -> a PyTorch state dict (numpy arrays).

    BatchNorm modules also get a ``num_batches_tracked`` counter (0) so that a strict
    ``load_state_dict`` into the PyTorch module succeeds.
    """
    state: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, value in _flat(variables.get(collection, {})).items():
            module, leaf = path[:-1], path[-1]
            value = np.asarray(value)
            layers = [(i, value[i]) for i in range(value.shape[0])] if _stacked_prefix(module, layout) else [(None, value)]
            for index, layer_value in layers:
                torch_module = flax_module_to_torch(module, index, layout)
                assert torch_module_to_flax(torch_module, layout) == (module, index), (module, torch_module)
                torch_leaf, torch_value = _leaf_to_torch(collection, leaf, layer_value)
                state[_join(torch_module, torch_leaf)] = torch_value
                if collection == "batch_stats" and leaf == "mean" and batch_norm_counters:
                    state[_join(torch_module, _COUNTER)] = np.zeros((), np.int64)
    return state


def from_torch(state: Mapping[str, np.ndarray], target: Mapping[str, Any], layout: TorchLayout,
               what: str = "checkpoint") -> dict[str, Any]:
    """A PyTorch state dict -> Flax variables shaped like `target` (arrays or ShapeDtypeStructs).

    Raises CheckpointMismatchError listing every missing key, unexpected key and shape mismatch, and
    NonFiniteWeightsError naming the tensors that hold NaN or infinity. Values keep the checkpoint's
    dtype (cast afterwards if the model wants another).
    """
    check_finite(state, what)
    ignore = [re.compile(p) for p in (*layout.ignore, rf"(^|\.){_COUNTER}$")]
    targets = {c: _flat(target.get(c, {})) for c in ("params", "batch_stats")}
    modules: dict[tuple[str, ...], dict[str, Any]] = {}
    for flat in targets.values():
        for path, leaf in flat.items():
            modules.setdefault(path[:-1], {})[path[-1]] = leaf

    found: dict[tuple[str, ...], dict[int | None, np.ndarray]] = {}
    unexpected, mismatched = [], []
    for key, value in state.items():
        if any(p.search(key) for p in ignore):
            continue
        module_key, _, leaf = key.rpartition(".")
        module, index = torch_module_to_flax(module_key, layout)
        collection, flax_leaf, value = _leaf_to_flax(leaf, np.asarray(value), modules.get(module))
        expected = targets[collection].get((*module, flax_leaf))
        if expected is None:
            unexpected.append(key)
            continue
        shape = tuple(expected.shape[1:] if index is not None else expected.shape)
        if value.shape != shape:
            mismatched.append(f"{key} {tuple(np.shape(state[key]))} (model wants {_torch_shape(flax_leaf, shape)})")
            value = None  # present, but unusable: reported as a mismatch, not as missing
        found.setdefault((collection, *module, flax_leaf), {})[index] = value

    missing = []
    variables: dict[tuple[str, ...], np.ndarray] = {}
    for collection, flat in targets.items():
        for path, leaf in flat.items():
            full, parts = (collection, *path), found.get((collection, *path), {})
            indices = range(leaf.shape[0]) if _stacked_prefix(path[:-1], layout) else [None]
            absent = [i for i in indices if i not in parts]
            missing += [_torch_key(collection, path, i, layout) for i in absent]
            if not absent and not mismatched:
                variables[full] = parts[None] if indices == [None] else np.stack([parts[i] for i in indices])
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, sorted(missing), unexpected, mismatched)
    return traverse_util.unflatten_dict(variables)


def _torch_shape(flax_leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if flax_leaf == "kernel":
        return _kernel_to_torch(np.broadcast_to(np.zeros(()), flax_shape)).shape
    return flax_shape


def _torch_key(collection: str, path: tuple[str, ...], index: int | None, layout: TorchLayout) -> str:
    leaf = _leaf_to_torch(collection, path[-1], np.zeros((1, 1)))[0]
    return _join(flax_module_to_torch(path[:-1], index, layout), leaf)


def check_tree(variables: Mapping[str, Any], target: Mapping[str, Any], what: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError unless `variables` has exactly `target`'s leaves and shapes, and
    NonFiniteWeightsError if any holds NaN or infinity."""
    check_finite({"/".join(k): v for k, v in _flat(variables).items()}, what)
    got = {"/".join(k): tuple(np.shape(v)) for k, v in _flat(variables).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in _flat(target).items()}
    mismatched = [f"{k} {got[k]} (model wants {want[k]})" for k in got.keys() & want.keys() if got[k] != want[k]]
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, sorted(mismatched))


def cast_like(variables: Any, target: Any) -> Any:
    """`variables` as arrays of the dtypes of `target`'s leaves (arrays or ShapeDtypeStructs of the same tree)."""
    return jax.tree.map(lambda v, t: jnp.asarray(v, dtype=t.dtype), variables, target)
