#!/usr/bin/env python
"""benchmarks/accelerator.sh's helper: the chip's measured matmul peak, and one table of the results.

    python benchmarks/accelerator.py peak FILE [--size 8192] [--chain 16] [--repeats 10] [--dtype bfloat16]
    python benchmarks/accelerator.py table DIR

`peak` times a jitted chain of --chain (size x size) @ (size x size) products on JAX's first device
and writes the best call's FLOP/s to FILE (JSON) as the measured peak, with the datasheet's
(f2d_jax.train.metrics.PEAK_FLOPS) beside it.

`table` merges DIR/raw/*.json (peak.json and the benchmarks' --json files, named
<benchmark>[-<variant>][.<part>].json, e.g. train_step-sdxl.ours.json) into DIR/results.json, prints one
table, a row per benchmark (and per variant run, after its benchmark's), and writes
it to DIR/table.md: ours' images/s per device, PyTorch's (eager and torch.compile), ours / PyTorch,
MFU (XLA's FLOPs of ours' compiled step per second over the measured peak; in brackets over the
datasheet's) and the peak memory per device of ours and of PyTorch eager.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import TORCH_DTYPES, fmt, fmt_bytes, per_device, table_text, timed

BENCHMARKS = ("train_step", "sample", "msid_step")
HEADER = ("benchmark", "ours img/s/device", "PyTorch eager img/s", "PyTorch torch.compile img/s", "ours / eager",
          "ours / torch.compile", "MFU (measured peak)", "peak memory/device: ours", "PyTorch eager")
SHORT_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}  # float16 -> fp16


# ============================================================================ peak

def measure_peak(size: int, chain: int, repeats: int, dtype: str) -> dict:
    """FLOP/s of the best of `repeats` calls of a jitted chain of `chain` square matmuls of `size`."""
    import jax
    import jax.numpy as jnp

    from f2d_jax.compiled import compiled_flops
    from f2d_jax.train.metrics import peak_flops

    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (size, size), dtype)
    w = (jax.random.normal(k2, (size, size)) / size ** 0.5).astype(dtype)  # keeps x's scale along the chain

    def products(x, w):
        for _ in range(chain):
            x = x @ w
        return x

    compiled = jax.jit(products).lower(x, w).compile()
    _, times = timed(lambda: compiled(x, w), jax.block_until_ready, 1, repeats)
    device = jax.local_devices()[0]
    flops = 2 * size ** 3 * chain
    return dict(device=device.device_kind, platform=device.platform, dtype=jnp.dtype(dtype).name, size=size,
                chain=chain, repeats=repeats, seconds=min(times), flops=flops, xla_flops=compiled_flops(compiled),
                peak_flops=flops / min(times), datasheet_flops=peak_flops(device), versions=f"jax {jax.__version__}")


# ============================================================================ table

def merge(raw: Path) -> dict[str, dict]:
    """{file stem: its JSON} of raw/*.json."""
    return {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in sorted(raw.glob("*.json"))}


def pick(results: list[dict], framework: str, compiled: bool | None = None) -> dict | None:
    """The first measured (timed) result of `framework`, PyTorch's eager or compiled one by `compiled`
    (a result without "compiled" is eager)."""
    return next((r for r in results if r.get("framework") == framework and "seconds" in r
                 and (compiled is None or r.get("compiled", False) == compiled)), None)


def peak_memory(r: dict | None) -> str:
    """Peak memory per device of one measurement, and where it was read (device, or the process's RSS)."""
    if r is None:
        return "-"
    if r.get("peak_bytes") is not None:  # msid_step
        return f"{fmt_bytes(r['peak_bytes'])} (device)"
    if "memory" in r:  # train_step, sample
        return f"{fmt_bytes(r['memory'])} ({'RSS' if 'RSS' in r['memory_kind'] else 'device'})"
    return f"{fmt_bytes(r.get('max_rss'))} (RSS)"


def mfu_cell(r: dict, measured: float | None) -> str:
    """Ours' MFU over the measured peak (the datasheet's in brackets); "-" without XLA's FLOP count."""
    from f2d_jax.train.metrics import mfu

    if not r.get("flops"):
        return "-"
    cells = [f"{100 * mfu(r['flops'], r['seconds'], None, peak):.1f}%" if peak else "n/a"
             for peak in (measured, r.get("peak_flops"))]
    return f"{cells[0]} (datasheet {cells[1]})"


def label(bench: str, runs: list[dict], results: list[dict]) -> str:
    """The row's name: the script, its preset and sizes (from the first results that give them)."""
    preset, steps = (next((run[key] for run in runs if key in run), None) for key in ("preset", "steps"))
    batch, identities = (next((r[key] for r in results if key in r), None) for key in ("batch", "identities"))
    parts = [f"{bench.split('-')[0]}.py {preset or '?'}"]
    if batch is not None:
        parts.append(f"batch {batch}")
    if steps is not None:  # sample
        parts.append(f"{steps} steps")
    if identities is not None:
        parts.append(f"{identities:,} identities")
    return ", ".join(parts)


def row(bench: str, runs: list[dict], measured: float | None) -> tuple[tuple[str, ...], list[str]]:
    """One benchmark's table row from its runs' JSONs, and its notes (what was not measured, and why)."""
    if not runs:
        return (bench, "no result (see accelerator.log)", *("-",) * (len(HEADER) - 2)), []
    results = [r for run in runs for r in run["results"]]
    notes = [f"{bench}: {s}" for run in runs for s in run.get("skipped", [])]
    notes += [f"{bench}: ours not run: {r['not_run']}" for r in results if "not_run" in r]
    ours, eager, compiled = pick(results, "jax"), pick(results, "torch", False), pick(results, "torch", True)
    theirs = []
    for r in (eager, compiled):
        theirs.append(fmt(r and per_device(r), ".2f", "not measured") +
                      (f" ({SHORT_DTYPES.get(r['dtype'], r['dtype'])})" if r else ""))
    ratios = [fmt(ours and r and per_device(ours) / per_device(r), ".2f", "-") for r in (eager, compiled)]
    cells = (label(bench, runs, results), fmt(ours and per_device(ours), ".2f", "not measured"), *theirs, *ratios,
             mfu_cell(ours, measured) if ours else "-", peak_memory(ours), peak_memory(eager))
    return cells, notes


def report(results: dict[str, dict]) -> str:
    """The measured peak, the table and its notes, from merge()'s dict."""
    peak = results.get("peak")
    if peak:
        datasheet = peak["datasheet_flops"]
        head = (f"measured {peak['dtype']} matmul peak on {peak['device']}: {peak['peak_flops'] / 1e12:.4g} TFLOP/s "
                f"({peak['size']}^3 products chained x{peak['chain']}, best of {peak['repeats']}; datasheet: "
                f"{f'{datasheet / 1e12:.4g} TFLOP/s' if datasheet else 'none for this device'})")
    else:
        head = "measured matmul peak: no result (see accelerator.log)"
    rows, notes = [], []
    runs = {k.split(".")[0] for k in results if k != "peak"}
    for bench in [b for base in BENCHMARKS for b in (base, *sorted(r for r in runs if r.startswith(f"{base}-")))]:
        cells, more = row(bench, [v for k, v in results.items() if k.split(".")[0] == bench],
                          peak and peak["peak_flops"])
        rows.append(cells)
        notes += more
    return "\n".join([head, "", table_text(HEADER, rows), *([""] + notes if notes else [])]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    peak = commands.add_parser("peak", help="measure the matmul peak into FILE")
    peak.add_argument("file", type=Path)
    peak.add_argument("--size", type=int, default=8192)
    peak.add_argument("--chain", type=int, default=16, help="products per call")
    peak.add_argument("--repeats", type=int, default=10, help="timed calls after one warm-up")
    peak.add_argument("--dtype", default="bfloat16")
    table = commands.add_parser("table", help="merge DIR/raw/*.json into DIR/results.json; the table to DIR/table.md")
    table.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "peak":
        args.file.write_text(json.dumps(measure_peak(args.size, args.chain, args.repeats, args.dtype), indent=2))
        return 0
    results = merge(args.dir / "raw")
    (args.dir / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (args.dir / "table.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
