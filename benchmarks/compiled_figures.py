#!/usr/bin/env python
"""The "Compiled for accelerators" tables of docs/performance.md from the `--json` files of `--target` runs.

    f2d-train --config f2d_sd14 --target v5e-8 --json figures/sd14_train_v5e8_b8.json
    f2d-sample --config f2d_sd14 --target h100 --batch-size 8 --json figures/sd14_sample_h100.json
    python benchmarks/compiled_figures.py figures/*.json [--steps 30]

Prints two markdown tables. The first: each program's memory per device as the chip's compiler assigned it
(compiled for, not run on), and the batch per device at which it would fill the usable memory if its
temporaries grew in proportion to the batch (an estimate: check it with --fit). The second, a prediction at
each figure's largest batch that fits: images/s per device at 40% and at 60% of the chip's datasheet dense
bfloat16 peak, from the FLOPs traced in each program (matrix products, convolutions and attention kernels,
every loop iteration counted: f2d_jax.compiled.matmul_flops). A training step's images are its batch; a
sampled image costs --steps denoising steps (the UNet on the image and its unconditional twin) and its decode.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from f2d_jax import targets
from f2d_jax.compiled import GiB


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _fitting(rows: list[dict]) -> list[int]:
    """The batches at which every program of a figure fits, in order."""
    batches = sorted({r["batch_per_device"] for r in rows})
    return [b for b in batches if all(r["fits"] for r in rows if r["batch_per_device"] == b)]


def _brief(rows: list[dict]) -> list[dict]:
    """A --fit search's rows at its first batch, the largest that fits and the smallest above it that does not."""
    batches = sorted({r["batch_per_device"] for r in rows})
    fitting = _fitting(rows)
    keep = {batches[0], *fitting[-1:], *[b for b in batches if fitting and b > fitting[-1]][:1]}
    return [r for r in rows if r["batch_per_device"] in keep]


def memory_table(figures: dict[str, list[dict]], every: bool = False) -> str:
    head = ["figure", "program", "target", "batch/device", "arguments GiB", "temporaries GiB", "total GiB/device",
            "usable GiB", "fits", "largest batch/device, estimated", "TFLOP/device/call", "attention kernel calls",
            "compile s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in figures.items():
        searched = any("largest" in r for r in rows)  # a --fit search's rows
        for r in _brief(rows) if searched and not every else rows:
            fits = "yes" if r["fits"] else "no" + (f" ({r['note']})" if r["note"] else "")
            lines.append(f"| {name} | {r['program']} | {r['target']} | {r['batch_per_device']}"
                         f"{' (largest)' if r.get('largest') else ''} | {_gib(r['arguments'])} | "
                         f"{_gib(r['temporaries'])} | {_gib(r['total'])} | {_gib(r['memory'])} | {fits} | "
                         f"{largest_estimate(r)} | "
                         f"{r['flops'] / 1e12:.2f} | {r.get('kernels', '-')} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def largest_estimate(row: dict) -> int:
    """The batch per device at which the program would fill the usable memory if its temporaries grew in
    proportion to the batch (they hold a part that does not grow, so this is a lower estimate): a figure to
    check by compiling at it (--fit), not a compiled one."""
    room = row["memory"] - row["arguments"] - row["outputs"]
    per_image = row["temporaries"] / row["batch_per_device"]
    return max(0, int(room // per_image)) if per_image else 0


def flops_per_image(rows: list[dict], steps: int) -> tuple[str, float] | None:
    """(what one image is, FLOPs per image per device) of a figure's programs at one batch, or None."""
    by_name = {r["program"]: r for r in rows}
    if "train step" in by_name:
        r = by_name["train step"]
        return "training image", r["flops"] / r["batch_per_device"]
    if "denoising step" in by_name and "decode" in by_name:
        step, decode = by_name["denoising step"], by_name["decode"]
        return f"sampled image ({steps} steps)", (steps * step["flops"] + decode["flops"]) / step["batch_per_device"]
    if "MSID ArcFace step" in by_name:
        r = by_name["MSID ArcFace step"]
        return "MSID image", r["flops"] / r["batch_per_device"]
    return None


def prediction_table(figures: dict[str, list[dict]], steps: int) -> str:
    lines = ["| figure | target | batch/device | per | GFLOP per image | images/s/device at 40% of peak | at 60% |",
             "|" + "---|" * 7]
    for name, rows in figures.items():
        for batch in _fitting(rows)[-1:]:  # the largest batch that fits
            at = [r for r in rows if r["batch_per_device"] == batch]
            found = flops_per_image(at, steps)
            if found is None:
                continue
            what, flops = found
            peak = targets.parse(at[0]["target"]).chip.peak_flops
            lines.append(f"| {name} | {at[0]['target']} | {batch} | {what} | {flops / 1e9:,.0f} | "
                         f"{0.4 * peak / flops:,.1f} | {0.6 * peak / flops:,.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="--json files of f2d-train/f2d-sample --target")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per sampled image (default 30)")
    parser.add_argument("--every-batch", action="store_true", help="every batch a --fit search compiled (default: "
                        "its first, the largest that fits and the next that does not)")
    args = parser.parse_args(argv)
    figures = {path.stem: json.loads(path.read_text()) for path in sorted(args.files)}
    print("Compiled for, not run on: memory per device\n")
    print(memory_table(figures, args.every_batch))
    print("\nPredicted, not measured: images/s per device from the traced FLOPs\n")
    print(prediction_table(figures, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
