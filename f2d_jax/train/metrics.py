"""Training metrics: a JSON-lines file and TensorBoard event files in the workdir, images as PNG.

Only process 0 writes. MFU is the step's FLOPs per device (its traced matrix multiplications and
convolutions, every loop iteration counted) per second over the device's dense bf16 peak (the datasheet's, or a measured one where given);
unknown devices (CPU) report none.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr
from PIL import Image

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12, "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12, "TPU v3": 123e12,
}


def peak_flops(device) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if device.device_kind.startswith(k)), None)


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
    branch, a while loop's body once. Elementwise operations are not counted."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def compile_counted(jitted, *args, devices: int = 1):
    """Ahead-of-time compile `jitted` for `args` (ShapeDtypeStructs with shardings) from one trace:
    (the compiled function, its per-device FLOPs as `matmul_flops` counts them over `devices`)."""
    traced = jitted.trace(*args)
    return traced.lower().compile(), _jaxpr_flops(traced.jaxpr.jaxpr) / devices


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
        inner = [_jaxpr_flops(getattr(j, "jaxpr", j)) for value in eqn.params.values()
                 for j in (value if isinstance(value, (tuple, list)) else (value,))
                 if isinstance(j, (Jaxpr, ClosedJaxpr))]
        if name == "cond":
            total += max(inner, default=0.0)
        else:
            total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


class MetricWriter:
    """Appends to workdir/metrics.jsonl, first dropping the lines past `start_step` (a run resumed
    from that checkpoint logs those steps again), and to TensorBoard."""

    def __init__(self, workdir, enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self._tensorboard = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            path = self.workdir / "metrics.jsonl"
            if path.is_file():
                _keep_until(path, start_step)
            self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter
            self._tensorboard = SummaryWriter(str(self.workdir / "tensorboard"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()

    def image(self, step: int, name: str, image: np.ndarray) -> Path | None:
        """Save (H, W, 3) uint8 as workdir/samples/<name>_<step>.png and to TensorBoard."""
        if not self.enabled:
            return None
        path = self.workdir / "samples" / f"{name}_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        self._tensorboard.add_image(name, image, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def _keep_until(path: Path, step: int) -> None:
    """Rewrite the JSON-lines file `path` without its records of steps after `step` (and without a
    line cut short by a crash)."""
    def logged(line: str) -> int | None:
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (n := logged(line)) is not None and n <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def grid(images: np.ndarray, rows: int) -> np.ndarray:
    """(N, H, W, 3) -> one (rows * H, cols * W, 3) image."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    canvas = np.zeros((rows * cols, h, w, c), images.dtype)
    canvas[:n] = images
    return canvas.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def mfu(flops_per_step: float | None, seconds_per_step: float, device, peak: float | None = None) -> float | None:
    """Model FLOPs utilization of one device: its share of the step's FLOPs (the compiled SPMD
    program is per device) per second over its peak: `peak` FLOP/s where given (a measured one),
    else the datasheet's for `device`."""
    peak = peak if peak is not None else peak_flops(device)
    if not flops_per_step or peak is None:
        return None
    return flops_per_step / seconds_per_step / peak


def is_primary() -> bool:
    return jax.process_index() == 0
