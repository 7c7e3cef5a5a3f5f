"""Training metrics: a JSON-lines file and TensorBoard event files in the workdir, images as PNG.

Only process 0 writes. MFU is the step's FLOPs per device (its traced matrix multiplications and
convolutions, every loop iteration counted: f2d_jax/compiled.py) per second over the device's dense bf16
peak (the datasheet's, or a measured one where given); unknown devices (CPU) report none.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from PIL import Image

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = {
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12, "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12, "TPU v3": 123e12,
}


def peak_flops(device) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if device.device_kind.startswith(k)), None)


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
