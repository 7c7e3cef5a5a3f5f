#!/usr/bin/env python
"""Where our training step's and sampler's time goes: attention, convolutions, norms, other matmuls, other.

    python benchmarks/op_profile.py train                          # the cpu preset's training step
    python benchmarks/op_profile.py sample                         # the cpu preset's sampling (2 images, 30 steps)
    python benchmarks/op_profile.py train --attention reference    # the same with the plain softmax attention

It runs the JAX side of benchmarks/train_step.py or benchmarks/sample.py in this process under JAX's
profiler, with XLA's optimized HLO dumped, and adds up the duration of every executed XLA op (each
thunk of XLA:CPU, each kernel on accelerators) by what the op computes, read from the op's HLO:
- attention: everything inside an attention layer (its projections and the attention itself:
  modules named attn1 / attn2 (UNet), self_attn (CLIP), attn (MSID));
- convolutions: convolution ops, and fusions built around one;
- norms: ops of GroupNorm / LayerNorm modules (names containing "norm");
- other matmuls: the remaining dot ops (feed-forward and projection layers);
- other: the rest (activations, residual adds, the optimizer, the sampler's arithmetic).
Ops can overlap on several threads, so the shares are of the summed op time, not of wall time.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

CATEGORIES = ("attention", "convolutions", "norms", "other matmuls", "other")
_ATTENTION = re.compile(r"/(attn1|attn2|attn|self_attn)/")
_NORM = re.compile(r"/[^/]*norm[^/]*/", re.IGNORECASE)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w-]+)\(")
_CONTAINERS = {"while", "conditional", "call"}  # their time is their body's ops, counted on their own


def categorize(opcode: str, op_name: str, called: str, computations: dict[str, str]) -> str:
    body = computations.get(called, "") if called else ""
    if _ATTENTION.search(f"/{op_name}/"):
        return "attention"
    if opcode == "convolution" or " convolution(" in body:
        return "convolutions"
    if _NORM.search(f"/{op_name}/"):
        return "norms"
    if opcode == "dot" or " dot(" in body:
        return "other matmuls"
    return "other"


def read_dumps(directory: Path) -> dict[tuple[str, str], str]:
    """{(module name, instruction): category} from XLA's optimized HLO text dumps."""
    categories = {}
    for path in directory.glob("*after_optimizations.txt"):
        module = path.name.split(".")[1]  # module_0012.jit_step.cpu_after_optimizations.txt
        text = path.read_text()
        computations, current = {}, None
        for line in text.splitlines():  # computation name -> its body (to see what a fusion contains)
            header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(", line)
            if header:
                current = header.group(1)
                computations[current] = ""
            elif current:
                computations[current] += line + "\n"
        for line in text.splitlines():
            match = _INSTRUCTION.match(line)
            if match:
                name, opcode = match.groups()
                called, op_name = re.search(r"calls=%?([\w.\-]+)", line), re.search(r'op_name="([^"]*)"', line)
                categories[(module, name)] = None if opcode in _CONTAINERS else categorize(
                    opcode, op_name.group(1) if op_name else "", called and called.group(1), computations)
    return categories


def op_times(trace_dir: Path) -> collections.Counter:
    """{(module, op): total microseconds} of the executed XLA ops in the profile."""
    times = collections.Counter()
    for path in trace_dir.glob("**/*.trace.json.gz"):
        for event in json.loads(gzip.open(path).read())["traceEvents"]:
            args = event.get("args") or {}
            if event.get("ph") == "X" and "hlo_op" in args:
                times[(args.get("hlo_module", ""), args["hlo_op"])] += event.get("dur", 0)
    return times


def breakdown(times: collections.Counter, categories: dict) -> dict[str, float]:
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for key, micros in times.items():
        category = categories.get(key, "other")
        if category is not None:
            totals[category] += micros / 1e6
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("train", "sample"), help="the training step or the sampler")
    parser.add_argument("--preset", default="cpu", help="the benchmark's preset (default: %(default)s)")
    parser.add_argument("--attention", default="auto", help="model.attention (default: %(default)s)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="f2d-profile-"))
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={work / 'hlo'} --xla_dump_hlo_as_text").strip()
    sys.path.insert(0, str(Path(__file__).parent))
    import jax

    if args.what == "train":
        import train_step as benchmark
        command = ["--steps", "3", "--warmup", "1"]
    else:
        import sample as benchmark
        command = ["--repeats", "1"]
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # XLA's ops only: Python events would crowd them out of the trace
    with jax.profiler.trace(str(work / "trace"), profiler_options=options):
        benchmark.main(["--worker", "jax", "--preset", args.preset, "--attention", args.attention, *command])
    totals = breakdown(op_times(work / "trace"), read_dumps(work / "hlo"))
    whole = sum(totals.values())
    print(f"\n{args.what}, preset {args.preset}, attention {args.attention}: summed XLA op time {whole:.2f} s "
          f"(profile and HLO in {work})")
    print("| part | op time s | share |\n|---|---|---|")
    for name, seconds in totals.items():
        print(f"| {name} | {seconds:.2f} | {100 * seconds / whole:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
