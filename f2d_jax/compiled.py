"""Programs compiled for a target (f2d_jax/targets.py) and what the compiler says of them: the bytes each
device holds (XLA's buffer assignment: arguments, outputs, temporaries), whether that fits the chip, the
FLOPs each device computes per step, the compile time; and the largest batch per device that fits.

A command's `--target` builds its real programs from abstract parameters (nothing is allocated, no
weights are read) over a mesh of the target's devices, compiles each, and prints a table (`--json`:
the same figures for scripts). Every figure is "compiled for, not run on".
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from f2d_jax import targets

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class TargetProgram:
    """One program as a command runs it: a jitted function and its arguments (ShapeDtypeStructs with
    shardings over `mesh`, of the target's devices)."""
    name: str
    jitted: Any
    args: tuple
    batch_per_device: int
    mesh: Any


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (None if unavailable)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def matmul_flops(fn, *args) -> float:
    """FLOPs of the matrix multiplications and convolutions of one call of `fn(*args)` (arrays or
    ShapeDtypeStructs; traced, not compiled): 2 x the multiply-adds of every dot_general and
    conv_general_dilated, a scan's body counted once per iteration (XLA's cost analysis counts a
    loop's body once, so it misses all but one of a scanned stack of layers), a cond's costliest
    branch, a while loop's body once, a Pallas kernel's body once per grid step, cuDNN's fused attention
    as its matmuls (forward 2, backward 5). Elementwise operations are not counted."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def compile_counted(jitted, *args, devices: int = 1):
    """Ahead-of-time compile `jitted` for `args` (ShapeDtypeStructs with shardings) from one trace:
    (the compiled function, its per-device FLOPs as `matmul_flops` counts them over `devices`)."""
    traced = jitted.trace(*args)
    return traced.lower().compile(), traced_flops(traced) / devices


def traced_flops(traced) -> float:
    """`matmul_flops` of a traced (`jax.jit(f).trace(...)`) program."""
    return _jaxpr_flops(traced.jaxpr.jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contracting])
        elif name == "conv_general_dilated":
            kernel, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            per_output = np.prod([kernel[i] for i in spec[1:]])   # input features (per group) x window
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
        elif name in _CUDNN_ATTENTION:  # (B, T, N, H) queries, (B, S, N, H) keys: 2 B N T S H per matmul
            (b, t, n, h), s = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape[1]
            total += _CUDNN_ATTENTION[name] * 2.0 * b * n * t * s * h
        inner = [_jaxpr_flops(getattr(j, "jaxpr", j)) for value in eqn.params.values()
                 for j in (value if isinstance(value, (tuple, list)) else (value,))
                 if isinstance(j, (Jaxpr, ClosedJaxpr))]
        if name == "cond":
            total += max(inner, default=0.0)
        elif name == "pallas_call":
            total += sum(inner) * np.prod(eqn.params["grid_mapping"].grid)
        else:
            total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


_CUDNN_ATTENTION = {"dot_product_attention_fwd": 2, "dot_product_attention_bwd": 5}  # matmuls of each


def memory(compiled) -> dict[str, int] | None:
    """XLA's buffer assignment per device: arguments, outputs (less those aliasing donated arguments) and
    temporaries (activations and workspace); None where the backend gives none."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if m is None:
        return None
    return dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
                temporaries=m.temp_size_in_bytes)


# The fused attention kernels' custom calls in a compiled program: Mosaic (Pallas on TPU), cuDNN's attention.
KERNEL_CALLS = ('custom_call_target="tpu_custom_call"', 'custom_call_target="__cudnn$fmha')


def kernel_calls(compiled) -> int:
    """The number of fused attention kernel calls in a compiled program's text (0 where it has none)."""
    text = compiled.as_text() if compiled is not None else ""
    return sum(text.count(call) for call in KERNEL_CALLS)


# Without a device XLA:GPU cannot time its choices, and its default Triton tiling of matrix products finds none
# for some shapes (CLIP's (18 x 77, 768) products at 18 prompts per GPU): the products go to cuBLAS instead.
COMPILER_OPTIONS = {"gpu": {"xla_gpu_enable_triton_gemm": False}}
FAILED = "the compiler failed: "  # a row's note when the compiler gave up (not for memory)


def compile_program(program: TargetProgram, target: targets.Target) -> dict[str, Any]:
    """Trace, lower and compile `program` (for its mesh's devices): its figures as a dict, `compiled`
    holding the compiled program."""
    start = time.perf_counter()
    traced = program.jitted.trace(*program.args)
    flops = traced_flops(traced) / program.mesh.size
    lowered = traced.lower()
    try:
        compiled = lowered.compile(COMPILER_OPTIONS.get(target.platform))
        sizes, note = memory(compiled) or dict(arguments=0, outputs=0, temporaries=0), ""
    except jax.errors.JaxRuntimeError as e:  # libtpu refuses a program larger than the chip: its answer
        compiled, note = None, str(e).split("RESOURCE_EXHAUSTED: ", 1)[-1].splitlines()[0]
        note = re.sub(r"^E\d+: \w+: ", "", note)  # libtpu's error code ("E1000: CompileTimeHbmOom: ") before its answer
        if "RESOURCE_EXHAUSTED" not in str(e):  # e.g. XLA:GPU finds no GEMM tiling at some huge shape
            note = FAILED + note
        needed = re.search(r"temporaries \(([\d.]+)([KMGT])\)", note)
        sizes = dict(arguments=per_device_bytes(program.args), outputs=per_device_bytes(lowered.out_info),
                     temporaries=int(float(needed.group(1)) * 2 ** (10 * "KMGT".index(needed.group(2)) + 10))
                     if needed else 0)
    total = sum(sizes.values())
    return dict(program=program.name, target=target.name, devices=program.mesh.size,
                batch_per_device=program.batch_per_device, **sizes, total=total, memory=target.usable_memory,
                chip_memory=target.chip.memory, fits=compiled is not None and total <= target.usable_memory,
                flops=flops, kernels=kernel_calls(compiled), compile_s=round(time.perf_counter() - start, 1),
                note=note, compiled=compiled)


def per_device_bytes(tree) -> int:
    """The bytes one device holds of a tree of ShapeDtypeStructs (or lowered outputs) by their shardings."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape))
               * x.dtype.itemsize for x in jax.tree.leaves(tree))  # x.dtype: a PRNG key's too


def compile_all(target: targets.Target, build: Callable[[Sequence, int], list[TargetProgram]], batch_per_device: int,
                fit: bool = False, log=lambda msg: print(msg, file=sys.stderr)) -> list[dict[str, Any]]:
    """The figures of `build(devices, batch_per_device)`'s programs compiled for `target`. With `fit`, those
    of every batch per device tried on the way to the largest at which every program fits (`largest`: True on
    its rows): from `batch_per_device`, the next batch predicted from the memory of the two nearest ones
    (memory grows about linearly with the batch), checked by compiling, until the largest that fits and the
    smallest that does not are neighbours."""
    found = targets.devices(target)

    def at(batch: int) -> list[dict[str, Any]]:
        rows = []
        for program in build(found, batch):
            log(f"compiling {program.name} for {target.name} (batch {batch} per device) ...")
            rows.append(compile_program(program, target))
        return rows

    if not fit:
        return at(batch_per_device)
    tried: dict[int, list[dict[str, Any]]] = {}
    batch = batch_per_device
    while batch is not None:
        tried[batch] = at(batch)
        log(f"batch {batch} per device: {'fits' if _fits(tried[batch]) else 'does not fit'}")
        batch = next_batch({b: (_fits(rows), _over(rows)) for b, rows in tried.items()})
    largest = max((b for b, rows in tried.items() if _fits(rows)), default=None)
    return [{**row, "largest": b == largest} for b in sorted(tried) for row in tried[b]]


def _fits(rows) -> bool:
    return all(row["fits"] for row in rows)


def _over(rows) -> float | None:
    """The bytes the programs need over the memory (negative: room left); None where the compiler failed."""
    if any(row["note"].startswith(FAILED) for row in rows):
        return None
    return max(row["total"] - row["memory"] for row in rows)


def next_batch(tried: dict[int, tuple[bool, float]]) -> int | None:
    """The next batch to compile in the search for the largest that fits, given {batch: (fits, bytes over the
    memory: negative where it fits; None where the compiler failed)}; None when it is found (or not even batch 1
    fits)."""
    fitting = [b for b, (ok, _) in tried.items() if ok]
    failing = [b for b, (ok, _) in tried.items() if not ok]
    lo, hi = max(fitting, default=0), min(failing, default=None)
    if hi is not None and hi - lo <= 1 or hi == 1:
        return None
    near = sorted(tried, key=lambda b: (abs(b - lo), b))[:2] if hi is None else [b for b in (lo, hi) if b in tried]
    memories = [tried[b][1] for b in near]
    if len(near) == 2 and None not in memories and memories[0] != memories[1]:  # the line through the two nearest
        (b1, m1), (b2, m2) = ((b, tried[b][1]) for b in near)
        guess = b1 - m1 * (b2 - b1) / (m2 - m1)  # where it crosses the memory
        guess = int(guess) if guess >= lo + 1 else lo + 1
    else:
        guess = 2 * lo if lo else max(1, hi // 2)
    upper = hi - 1 if hi is not None else 64 * max(lo, 1)
    if hi is not None and hi - lo > 3:  # a step at least a quarter of the gap in: where memory is not a line
        quarter = -(-(hi - lo) // 4)   # (the line stays on one side), still few compiles
        guess = min(max(guess, lo + quarter), hi - quarter)
    guess = min(max(guess, lo + 1), upper)
    if guess in tried:  # no progress from the line: halve the gap
        guess = (lo + hi) // 2 if hi is not None else 2 * lo
    return guess


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The figures as a markdown table, a row per program."""
    head = ["program", "target", "devices", "batch/device", "arguments", "outputs", "temporaries", "total/device",
            "usable memory", "fits", "TFLOP/device/step", "attention kernel calls", "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["program"], r["target"], str(r["devices"]),
            f"{r['batch_per_device']}" + (" (largest that fits)" if r.get("largest") else ""), _gib(r["arguments"]),
            _gib(r["outputs"]), _gib(r["temporaries"]), _gib(r["total"]),
            f"{_gib(r['memory'])}" + (f" (of {_gib(r['chip_memory'])})" if r["memory"] != r["chip_memory"] else ""),
            "yes" if r["fits"] else "NO", f"{r['flops'] / 1e12:.3f}", str(r.get("kernels", "-")),
            f"{r['compile_s']:.1f}"]) + " |")
    return "\n".join(lines)


def report(rows: Sequence[dict[str, Any]], json_path=None) -> int:
    """Print the table (and write the JSON at `json_path`); exit status 0 when every program fits (after a
    fit search: when some batch fits), 1 if not."""
    print("compiled for, not run on:")
    print(table(rows))
    for r in rows:
        if r["note"]:
            print(f"{r['program']}, batch {r['batch_per_device']} per device: {r['note']}")
    if json_path:
        Path(json_path).write_text(json.dumps([{k: v for k, v in r.items() if k != "compiled"} for r in rows],
                                              indent=1) + "\n")
    searched = any("largest" in r for r in rows)
    return 0 if (any(r["largest"] for r in rows) if searched else all(r["fits"] for r in rows)) else 1
