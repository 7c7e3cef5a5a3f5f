"""Device mesh and shardings: the mesh from config, batch sharding, and parameter rules.

Parameters are replicated, or FSDP-sharded: each leaf of at least `min_size` values is split
along its largest axis that the "fsdp" mesh axis divides (GSPMD inserts the all-gathers).
The batch is split over both mesh axes.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(config: Mapping[str, Any], devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all); one size may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(config[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices cannot be split into {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"there are {len(devices)}")
    # Devices in process order, so each host's devices hold a contiguous block of the batch.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2 ** 16) -> P:
    """Shard the largest axis divisible by `fsdp` (leaves under `min_size` values stay whole)."""
    if fsdp == 1 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            return P(*[None] * axis, "fsdp")
    return P()


def param_shardings(tree: Any, mesh: Mesh, rule: str) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) under `rule`."""
    if rule == "replicate":
        return jax.tree.map(lambda _: replicated(mesh), tree)
    if rule == "fsdp":
        return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape["fsdp"])), tree)
    raise ValueError(f"unknown sharding rule {rule!r}; use 'replicate' or 'fsdp'")
