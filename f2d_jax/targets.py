"""Compile targets: the accelerators a program can be compiled for on any host, a CPU laptop included.

    v5e-8, v5e-256, v6e-64      TPU v5e / v6e slices, by chips
    v4-8, v5p-128               TPU v4 / v5p slices, by TensorCores as Cloud TPU names them (v4-8: 4 chips)
    2xv5e-256                   slices joined over the data-centre network: a "Nx" prefix
    h100, h100x8, 2xh100x8      NVIDIA H100s: GPUs per host ("x8"), hosts by a "Nx" prefix; h200, a100 alike

`devices(target)` gives the target's JAX devices from the chips' own compilers, with no chip present:
libtpu (the `tpu` extra) and XLA's GPU compiler (jax-cuda12-plugin, the `gpu` extra). A `jax.jit` over a
mesh of them lowers and compiles for the target; `memory_analysis()` of the result says what each
device holds. The programs decide their kernels and dtypes from the devices they are compiled for
(`platform()`: the mesh's they are traced on, `on_mesh`), never from the host.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from importlib import resources

import jax

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One kind of accelerator: what a device holds and computes (datasheet figures)."""
    platform: str          # "tpu" or "gpu"
    device_kind: str       # as JAX names the devices
    memory: int            # bytes of device memory
    peak_flops: float      # dense bfloat16 FLOP/s per device
    sizes: tuple[int, ...]  # the slice sizes (TPU: chips) or GPUs per host (GPU) one may name
    topology: str = ""     # TPU: libtpu's name of the generation ("v5e", "v5", ...); GPU: the spec file
    dims: int = 2          # TPU: the torus' dimensions
    cores_per_chip: int = 1  # TPU: TensorCores a name counts per chip (v4 and v5p: 2, one megacore device)
    usable: float = 1.0    # the share of the memory a program may take (GPU: JAX preallocates 75%)


_POWERS = tuple(2 ** i for i in range(13))
CHIPS = {
    "v4": Chip("tpu", "TPU v4", 32 * GiB, 275e12, _POWERS[2:12], "v4", 3, 2),
    "v5e": Chip("tpu", "TPU v5 lite", 16 * GiB, 197e12, (1, 4, 8, 16, 32, 64, 128, 256), "v5e"),
    "v5p": Chip("tpu", "TPU v5", 95 * GiB, 459e12, _POWERS[2:13], "v5", 3, 2),
    "v6e": Chip("tpu", "TPU v6 lite", 32 * GiB, 918e12, (1, 4, 8, 16, 32, 64, 128, 256), "v6e"),
    "h100": Chip("gpu", "NVIDIA H100 80GB HBM3", 85_045_477_376, 989e12, (1, 2, 4, 8), "h100.txtpb", usable=0.75),
    "h200": Chip("gpu", "NVIDIA H200", 150_754_820_096, 989e12, (1, 2, 4, 8), "h200.txtpb", usable=0.75),
    "a100": Chip("gpu", "NVIDIA A100-SXM4-80GB", 85_167_243_264, 312e12, (1, 2, 4, 8), "a100.txtpb",
                 usable=0.75),
}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: Chip
    per_group: int   # TPU: devices per slice; GPU: GPUs per host
    groups: int      # TPU: slices; GPU: hosts

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def num_devices(self) -> int:
        return self.per_group * self.groups

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """TPU: the chips a host holds, as libtpu lays them out (a v5e-8 or v6e-8 host: 2x4; else 2x2)."""
        if self.per_group == 1:
            return (1, 1, 1)
        return (2, 4, 1) if self.per_group == 8 and self.chip.dims == 2 else (2, 2, 1)

    @property
    def devices_per_host(self) -> int:
        if self.platform == "gpu":
            return self.per_group
        x, y, z = self.host_bounds
        return x * y * z

    @property
    def usable_memory(self) -> int:
        return int(self.chip.memory * self.chip.usable)


_NAME = re.compile(r"^(?:(\d+)x)?(v4|v5e|v5p|v6e)-(\d+)$|^(?:(\d+)x)?(h100|h200|a100)(?:x(\d+))?$")


def known_targets() -> str:
    """The target names, as an error message lists them."""
    tpus = ", ".join(f"{n}-{{{','.join(str(s * c.cores_per_chip) for s in c.sizes)}}}" for n, c in CHIPS.items()
                     if c.platform == "tpu")
    gpus = ", ".join(f"{n}[x{{{','.join(map(str, c.sizes))}}}]" for n, c in CHIPS.items() if c.platform == "gpu")
    return f"{tpus}; {gpus}; an 'Nx' prefix for N slices or hosts, e.g. 2xv5e-256, 2xh100x8"


def parse(name: str) -> Target:
    """The Target a name gives; a ValueError listing the known ones for any other."""
    match = _NAME.match(name.strip().lower())
    if not match:
        raise ValueError(f"unknown target {name!r}; known targets: {known_targets()}")
    tpu_groups, tpu, count, gpu_groups, gpu, per_host = match.groups()
    chip = CHIPS[tpu or gpu]
    groups = int(tpu_groups or gpu_groups or 1)
    size = int(count) // chip.cores_per_chip if tpu else int(per_host or 1)
    if size not in chip.sizes or groups < 1 or (tpu and int(count) % chip.cores_per_chip):
        raise ValueError(f"unknown target {name!r}: {tpu or gpu} comes as "
                         + (f"{tpu}-{{{', '.join(str(s * chip.cores_per_chip) for s in chip.sizes)}}}" if tpu else
                            f"{gpu}x{{{', '.join(map(str, chip.sizes))}}} (GPUs per host)")
                         + f"; known targets: {known_targets()}")
    return Target(name, chip, size, groups)


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The slice's shape as Cloud TPU lays it out: v5e-8 2x4, v5e-256 16x16, v4-8 2x2x1, v5p-128 4x4x4 (the
    smallest side doubled until the chips are there, the last of equals first)."""
    shape = [2, 2, 1] if dims == 3 else [1, 1]
    while math.prod(shape) < chips:
        smallest = max(i for i in range(dims) if shape[i] == min(shape))
        shape[smallest] *= 2
    return tuple(shape)


class CompilerMissing(ValueError):
    """The target's compiler is not installed; the message says what to install."""


def devices(target: Target) -> list[jax.Device]:
    """The target's devices, from its compiler (nothing runs on them); CompilerMissing says what to install."""
    from jax.experimental.topologies import get_topology_desc

    chip = target.chip
    if chip.platform == "tpu":
        if not _has_module("libtpu"):
            raise CompilerMissing(f"compiling for {target.name} needs libtpu: pip install 'f2d-jax[tpu]'")
        # What a TPU VM's metadata would tell libtpu; without them it warns at start-up (a real VM's stay).
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name.split("x", 1)[-1].replace("v5e", "v5litepod"))
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling needs no chip: processes may share
        shape = _torus(target.per_group, chip.dims)
        topology = get_topology_desc(
            platform="tpu", topology_name=f"{chip.topology}:{'x'.join(map(str, shape))}",
            chip_config_name="megacore" if chip.cores_per_chip > 1 else "default",
            chips_per_host_bounds=target.host_bounds, num_slices=target.groups)
    else:
        if not (_has_module("jax_plugins.xla_cuda12") and _has_module("nvidia.cudnn")):
            raise CompilerMissing(f"compiling for {target.name} needs XLA's GPU compiler and cuDNN: pip install "
                                  "'f2d-jax[gpu]'")
        spec = resources.files("f2d_jax").joinpath(f"assets/gpu_specs/{chip.topology}").read_text()
        topology = get_topology_desc(platform="cuda", target_config=spec,
                                     topology=f"1x{target.groups}x{target.per_group}")
    found = list(topology.devices)
    assert len(found) == target.num_devices, (target, len(found))
    return found


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


# ----------------------------------------------------------------------------- the platform programs are for


def platform(mesh=None) -> str:
    """The platform ("cpu", "gpu" or "tpu") of `mesh`'s devices; without one, of the abstract mesh a program
    is being traced with (`on_mesh`: the devices it is compiled for, a target's or the run's own), else the
    default backend's."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh.abstract_mesh
    name = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    return {"cuda": "gpu", "rocm": "gpu"}.get(name, name)


def on_mesh(fn, mesh):
    """`fn` traced with `mesh` as JAX's abstract mesh: `platform()` is its devices', and the kernels that must
    be partitioned by hand (Pallas attention's shard_map) find it. Jit this, not `fn`."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    named = fn
    while isinstance(named, functools.partial):
        named = named.func
    traced.__name__ = traced.__qualname__ = getattr(named, "__name__", "traced")  # jit_<name> in logs and caches
    return traced
