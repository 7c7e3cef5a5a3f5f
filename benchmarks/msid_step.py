#!/usr/bin/env python
"""MSID pretraining throughput and memory as the number of identities grows: our step against PyTorch.

    python benchmarks/msid_step.py                          # vit_b on an accelerator, the cpu preset otherwise
    python benchmarks/msid_step.py --identities 10000,1000000 --devices 4

One training step of MSID pretraining on random weights and data (nothing is downloaded):

    uint8 faces (B, 112, 112, 3) -> [-1, 1] -> random horizontal flip -> MSID (ViT, tap BatchNorms on
    batch statistics) -> embeddings (B, D) -> ArcFace (s = 64, m = 0.5) over a (C, D) classifier, C the
    number of identities -> cross-entropy -> global-norm clipping at 5 + AdamW on MSID and the classifier

Ours is exactly what `python train.py --config configs/msid_arcface.py` runs: the step of
f2d_jax.pretrain.loop.program (jitted, the state donated, compiled ahead of time), with the batch
split over every device and the classifier and its AdamW moments split by identity over every
device (C padded up to a multiple of the devices; nothing of size (B, C) or (C, D) is gathered).
On CPU the devices are simulated (--devices, XLA's forced host device count); on accelerators
they are the real local devices. PyTorch is the same step on ONE device with the whole classifier:
the plain-torch official MSID (f2d_jax.torch.MSID) in train mode, insightface's ArcFace head
(normalized embeddings and weight, cos = e W^T clamped to [-1, 1], the target's cos(arccos(cos) + m)
under no_grad, i.e. straight-through, as insightface's CombinedMarginLoss), cross-entropy,
clip_grad_norm_ and torch.optim.AdamW with our linear learning-rate warm-up; eager and, with
--torch-compile, under torch.compile; on CUDA with bf16 and fp16 autocast (+ GradScaler), the
margin and cross-entropy in float32 as insightface's. On CPU everything is float32.

Memory: for ours, XLA's buffer assignment of the compiled step per device (arguments = the state
and the batch, donated; temporaries = activations, gradients and workspace) and the classifier
with its two AdamW moments per device, read before anything is allocated; the step only runs when
its buffers fit (host MemAvailable on CPU, where all simulated devices share the host; the
device's bytes_limit on accelerators). The same check skips PyTorch where the unsharded
classifier, its gradient and moments (C x D x 4 x 4 bytes) do not fit one device.

Every measurement runs in its own child process (this script with --worker), one after the other.
Times are medians over --steps synchronized steps after --warmup steps. --batch is per device: ours
runs batch x devices, PyTorch batch on one device, and the ratio compares images/s per device. On
CPU, where ours runs on simulated devices of one host, PyTorch runs the same global batch and the
ratio compares the whole host's images/s.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from common import (ROOT, TORCH_DTYPES, add_comparison_arguments, apply_preset, available_host_bytes,
                    check_comparison_arguments, fmt, fmt_bytes, jax_peak_bytes, log, max_rss_bytes, per_device,
                    print_table, result_line, run_torch_variants, run_worker, timed, torch_timed, torch_train_step,
                    xla_step_memory)

PRESETS = {
    # configs/msid_arcface.py's own sizes: the official msid_base_patch8_112 (width 384, 12 x 12 heads,
    # patch 8, taps after blocks 2, 5, 8, 11: D = 1536).
    "vit_b": dict(msid={}, batch=128, warmup=3, steps=10),
    # The same structure, width 64, 4 blocks of 2 heads, every block tapped (D = 256): minutes on a 2-core CPU.
    "cpu": dict(msid=dict(width=64, depth=4, num_heads=2, tap_layers=(0, 1, 2, 3)), batch=4, warmup=1, steps=3),
}
CPU_DEVICES = 8   # simulated devices on CPU unless --devices says otherwise
FIT = 0.8         # the share of the available memory a measurement may plan to use


def msid_config(args):
    """configs/msid_arcface.py with the preset's MSID, --identities and the dtype."""
    from f2d_jax.config import load_config

    config = load_config(ROOT / "configs" / "msid_arcface.py")
    config.model.msid.update(PRESETS[args.preset]["msid"])
    config.model.attention = args.attention
    config.arcface.num_identities = args.identities
    config.train.compute_dtype = args.dtype
    return config


# ============================================================================ ours (JAX)

def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from f2d_jax.bundle import compute_dtype
    from f2d_jax.pretrain.loop import padded_classes, program
    from f2d_jax.sharding import batch_sharding, make_mesh
    from f2d_jax.compiled import compiled_flops
    from f2d_jax.train.metrics import mfu, peak_flops

    jax.config.update("jax_threefry_partitionable", True)  # as loop.py
    device = jax.local_devices()[0]
    if device.platform != "cpu" and args.devices is not None:
        log(f"[ours] note: --devices ignored on {device.platform}: the {jax.device_count()} real devices are used")
    config = msid_config(args)
    mesh = make_mesh(config.mesh)
    global_batch = config.train.batch_size = args.batch * mesh.size
    dtype = jnp.dtype(compute_dtype(config.train.compute_dtype)).name
    rows = padded_classes(args.identities, mesh.size) // mesh.size

    # ---- exactly train.py's step: f2d_jax.pretrain.loop.program, compiled on the abstract state
    log(f"[ours] {args.identities} identities: compiling the step ({dtype}, batch {global_batch} over "
        f"{mesh.size} {device.platform} device(s), {rows} classifier rows/device) ...")
    prog = program(config, mesh)
    sharding = batch_sharding(mesh)
    start = time.perf_counter()
    compiled, flops = prog.compile(global_batch, sharding, mesh.size)
    compile_s = time.perf_counter() - start
    if jax.config.jax_compilation_cache_dir:
        log(f"[ours] note: JAX's persistent compilation cache is on ({jax.config.jax_compilation_cache_dir}); "
            "the compile time may be a cache hit")
    xla = xla_step_memory(compiled)
    state_bytes, classifier_bytes = state_bytes_per_device(prog.abstract_state)
    result = dict(
        name="ours (JAX, jit AOT)", framework="jax", dtype=dtype, identities=args.identities,
        device=f"{jax.device_count()} x {device.device_kind}", platform=device.platform, devices=mesh.size,
        batch=global_batch, classifier_rows=rows, classifier_bytes=classifier_bytes, state_bytes=state_bytes,
        xla_memory=xla, compile_s=compile_s,
        versions=f"jax {jax.__version__}, flax {__import__('flax').__version__}")

    # ---- does the state (plus the step's buffers) fit? All simulated CPU devices share the host.
    need = sum(xla.values()) if xla else state_bytes
    if device.platform == "cpu":
        need, available, where = need * mesh.size, available_host_bytes(), "host memory"
    else:
        available, where = (device.memory_stats() or {}).get("bytes_limit"), "device memory"
    if available is not None and need > FIT * available:
        result["not_run"] = (f"state + step buffers {fmt_bytes(need)} > {FIT:.0%} of {fmt_bytes(available)} "
                             f"available {where}")
        return result

    # ---- run it: random faces and labels, the batch split over every device
    state = prog.init()
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "image": rng.integers(0, 256, (global_batch, 112, 112, 3), dtype=np.uint8),
        "label": rng.integers(0, args.identities, global_batch, dtype=np.int32)}, sharding)
    log(f"[ours] compiled in {compile_s:.1f} s; timing {args.warmup} warm-up + {args.steps} steps ...")
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    first, times = timed(step, jax.block_until_ready, args.warmup, args.steps)
    metrics = jax.device_get(step())
    seconds = statistics.median(times)
    # flops: per device. XLA's cost analysis counts a loop body once: MSID's 12 blocks are one scan, so
    # the MFU uses the traced count of matmuls and convolutions (every iteration); XLA's figure is kept.
    result.update(
        seconds=seconds, times=times, first_step_s=first, flops=flops, xla_flops=compiled_flops(compiled),
        peak_flops=peak_flops(device),
        mfu=mfu(flops, seconds, device), loss=float(metrics["loss"]), accuracy=float(metrics["accuracy"]),
        peak_bytes=jax_peak_bytes(), max_rss=max_rss_bytes())
    return result


def state_bytes_per_device(abstract_state) -> tuple[int, int]:
    """(the whole train state, the classifier with its optimizer moments) in bytes on one device."""
    import jax

    from f2d_jax.pretrain.loop import in_classifier

    total = classifier = 0
    for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        size = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        total += size
        if in_classifier(path):
            classifier += size
    return total, classifier


# ============================================================================ PyTorch

def torch_worker(args) -> dict:
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F

    from f2d_jax.torch import MSID  # the official structure, plain torch

    config = msid_config(args)
    m, ac, optim = config.model.msid, config.arcface, config.optim
    cuda = torch.cuda.is_available()
    if args.jax_platform not in (None, "cpu") and not cuda:
        return dict(skipped=f"JAX ran on {args.jax_platform} but this PyTorch has no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    dim = len(m.tap_layers) * m.width  # the embedding size D
    need = args.identities * dim * 4 * 4  # weight, gradient, AdamW's two moments (float32)
    available = torch.cuda.mem_get_info()[0] if cuda else available_host_bytes()
    if available is not None and need > FIT * available:
        return dict(skipped=f"needs {fmt_bytes(need)} for a full unsharded classifier (weight, gradient, AdamW "
                            f"moments) on one device, {FIT:.0%} of {fmt_bytes(available)} available")
    dtype = getattr(torch, TORCH_DTYPES[args.torch_dtype])

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    name = f"PyTorch {'torch.compile' if args.torch_compiled else 'eager'}" + \
        (f" + {args.torch_dtype} autocast" if dtype != torch.float32 else "")
    log(f"[{name}] {args.identities} identities: building MSID (D = {dim}) and the {args.identities} x {dim} "
        "classifier ...")
    torch.manual_seed(config.seed)
    msid = MSID(image_size=m.image_size, patch=m.patch_size, width=m.width, depth=m.depth, heads=m.num_heads,
                mlp_ratio=m.mlp_ratio, taps=m.tap_layers).to(device).train()
    weight = torch.nn.Parameter(ac.init_std * torch.randn(args.identities, dim, device=device))
    params = [*msid.parameters(), weight]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.b1, optim.b2), weight_decay=optim.weight_decay,
                            eps=1e-8)
    warmup = max(int(optim.warmup_steps), 0)  # ours: the same linear warm-up (then polynomial decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / warmup, 1.0) if warmup else 1.0)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    m1, m2, m3 = ac.margins
    if (m1, m3) != (1.0, 0.0):
        raise ValueError(f"only ArcFace margins (1, m, 0) are implemented here, got {tuple(ac.margins)}")

    rng = np.random.default_rng(0)
    b = args.batch if cuda else args.batch * (args.devices or CPU_DEVICES)  # CPU: ours' global batch, one host
    images = torch.from_numpy(rng.integers(0, 256, (b, 3, 112, 112), dtype=np.uint8)).to(device)
    labels = torch.from_numpy(rng.integers(0, args.identities, b)).to(device)

    def loss_fn(images, labels):
        x = images.float() / 127.5 - 1
        if config.data.flip:
            x = torch.where((torch.rand(b, device=device) < 0.5)[:, None, None, None], x.flip(3), x)
        with autocast():
            cos = F.linear(F.normalize(msid(x)), F.normalize(weight))
        cos = cos.float().clamp(-1, 1)
        with torch.no_grad():  # insightface's CombinedMarginLoss: the margin is a constant for the gradient
            target = cos.gather(1, labels[:, None])
            margin = torch.cos(torch.acos(target) + m2) - target
        return F.cross_entropy(ac.scale * cos.scatter_add(1, labels[:, None], margin), labels)

    forward = torch.compile(loss_fn) if args.torch_compiled else loss_fn
    step = torch_train_step(lambda: forward(images, labels), opt, params, optim.grad_clip, scaler, lr_schedule)
    log(f"[{name}] timing {args.warmup} warm-up + {args.steps} steps"
        + (" (torch.compile happens in the first)" if args.torch_compiled else "") + " ...")
    first, times = torch_timed(step, args.warmup, args.steps)
    loss = float(step().detach())
    seconds = statistics.median(times)
    return dict(
        name=name, framework="torch", dtype=str(dtype).removeprefix("torch."), compiled=args.torch_compiled,
        identities=args.identities,
        device=torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        platform=device.type, devices=1, batch=b, seconds=seconds, times=times, first_step_s=first,
        compile_s=(first - seconds) if args.torch_compiled and first else None, loss=loss,
        peak_bytes=torch.cuda.max_memory_allocated() if cuda else None, max_rss=max_rss_bytes(),
        versions=f"torch {torch.__version__}")


# ============================================================================ driver

def measure(kind: str, identities: int, args, extra: list[str], env: dict | None = None) -> dict:
    """One measurement of `identities` in a child process."""
    return run_worker(__file__, kind, args, ["--identities", str(identities), *extra], env,
                      ("batch", "steps", "warmup", "devices"))


def describe(r: dict) -> str:
    head = f"{r['identities']:>8d} identities, {r['name']} {r['dtype']}"
    parts = []
    if r["framework"] == "jax":
        xla = r["xla_memory"] or {}
        parts.append(f"{r['devices']} x {r['device'].split(' x ', 1)[-1]}, {r['classifier_rows']} classifier "
                     f"rows/device, classifier + AdamW {fmt_bytes(r['classifier_bytes'], 3)}/device, state "
                     f"{fmt_bytes(r['state_bytes'], 3)}/device, XLA buffers/device: arguments "
                     f"{fmt_bytes(xla.get('arguments'), 3)}, temporaries {fmt_bytes(xla.get('temporaries'), 3)}, "
                     f"outputs {fmt_bytes(xla.get('outputs'), 3)}; compile {r['compile_s']:.1f} s")
        if "not_run" in r:
            return f"{head}: not run ({r['not_run']}); " + ", ".join(parts)
    parts.insert(0, f"{r['batch'] / r['seconds']:.2f} images/s ({per_device(r):.2f}/device), {r['seconds']:.3f} "
                    f"s/step median [{min(r['times']):.3f}-{max(r['times']):.3f}], first step "
                    f"{fmt(r['first_step_s'], '.1f')} s")
    if r["framework"] == "jax":
        parts.append(f"{fmt(r['flops'] and r['flops'] / 1e12, '.3f')} TFLOP/step/device (traced matmuls + "
                     "convolutions), MFU "
                     f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''}, accuracy "
                     f"{r['accuracy']:.3f}")
    elif r["compile_s"] is not None:
        parts.append(f"torch.compile ~{r['compile_s']:.1f} s (first step - median)")
    if r["peak_bytes"] is not None:
        parts.append(f"peak memory {fmt_bytes(r['peak_bytes'])}/device")
    parts.append(f"process max RSS {fmt_bytes(r['max_rss'])}")
    parts.append(f"loss {r['loss']:.4g}")
    return f"{head}: " + ", ".join(parts)


def same_hardware(r: dict) -> float:
    """Our images/s on the hardware PyTorch's one device is: one real device, or the whole host for
    simulated CPU devices."""
    return r["batch"] / r["seconds"] if r["platform"] == "cpu" else per_device(r)


def identity_counts(text: str) -> list[int]:
    """--identities: a comma list of integers >= 2 (underscores allowed: 1_000_000)."""
    counts = [int(x) for x in text.split(",")]
    if any(n < 2 for n in counts):
        raise ValueError("counts must be at least 2")
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                        help="model sizes: vit_b (the official MSID, D = 1536, batch 128/device, bfloat16) or cpu "
                             "(width 64, 4 blocks of 2 heads, D = 256, batch 4/device, float32); auto: vit_b when "
                             "JAX sees an accelerator, else cpu")
    parser.add_argument("--identities", default="10000,100000,1000000",
                        help="comma list of classifier sizes (number of identities), one row each "
                             "(default: %(default)s)")
    add_comparison_arguments(parser, batch_help="per-device batch (default: the preset's, 128 or 4)",
                             steps_help="timed steps, median reported (default: 10 vit_b, 3 cpu)",
                             warmup_help="untimed steps first (default: 3 vit_b, 1 cpu)")
    parser.add_argument("--devices", type=int,
                        help=f"simulated devices for ours on CPU (XLA's forced host device count; default "
                             f"{CPU_DEVICES}); ignored on accelerators, which use every local device")
    args = parser.parse_args(argv)
    try:
        counts = identity_counts(args.identities)
    except ValueError as e:
        parser.error(f"--identities: a comma list of integers >= 2, got {args.identities!r} ({e})")
    check_comparison_arguments(parser, args)
    if args.devices is not None and args.devices < 1:
        parser.error("--devices must be at least 1")

    if args.worker:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if len(counts) != 1:
            parser.error("--worker measures one --identities count")
        args.identities = counts[0]
        apply_preset(args, PRESETS, "vit_b", args.worker)
        result = jax_worker(args) if args.worker == "jax" else torch_worker(args)
        result.update(preset=args.preset)
        print(result_line(result), flush=True)
        return 0

    # ---- the driver: per identity count, ours then PyTorch, each in a child process
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices or CPU_DEVICES}"
    jax_env = {"XLA_FLAGS": flags.strip()}  # only the CPU platform reads it; accelerators use their devices
    results, skipped, platform = [], [], None
    for n in counts:
        if not args.skip_jax:
            ours = measure("jax", n, args, [], jax_env)
            if "failed" in ours:
                skipped.append(f"ours, {n} identities: {ours['failed']}")
                log(skipped[-1])
            else:
                results.append(ours)
                platform, args.preset = ours["platform"], ours["preset"]
                log(describe(ours))
        if args.skip_torch:
            continue
        if args.preset == "auto":
            import torch  # only to choose the preset
            args.preset = "vit_b" if torch.cuda.is_available() else "cpu"
        accelerated = platform not in (None, "cpu") or (platform is None and args.preset == "vit_b")
        for label, r in run_torch_variants(args, accelerated, platform,
                                           lambda extra, env: measure("torch", n, args, extra, env)):
            if "failed" in r or "skipped" in r:
                skipped.append(f"{label}, {n} identities: {r.get('failed') or r.get('skipped')}")
                log(skipped[-1])
                r = dict(r, framework="torch", identities=n)
            else:
                log(describe(r))
            results.append(r)

    summary(args, counts, results, skipped)
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "results": results, "skipped": skipped},
                                              indent=2))
    return 0


def summary(args, counts: list[int], results: list[dict], skipped: list[str]) -> None:
    """Every measurement, then one table row per identity count (PyTorch: its fastest variant)."""
    spec = PRESETS.get(args.preset, {})
    measured = [r for r in results if "failed" not in r and "skipped" not in r]
    print()
    print(f"preset {args.preset}: batch {args.batch or spec.get('batch')}/device, median of "
          f"{args.steps or spec.get('steps')} steps after {spec.get('warmup') if args.warmup is None else args.warmup}"
          " warm-up")
    for r in measured:
        print(describe(r))
    header = ("identities", "devices", "classifier rows/device", "classifier+AdamW/device", "XLA args/device",
              "XLA temps/device", "ours img/s", "ours img/s/device", "PyTorch img/s (1 device)",
              "ours / PyTorch (same hardware)")
    rows = []
    for n in counts:
        ours = next((r for r in results if r["framework"] == "jax" and r["identities"] == n), None)
        theirs = [r for r in results if r["framework"] == "torch" and r["identities"] == n]
        best = max((r for r in theirs if "seconds" in r), key=per_device, default=None)
        ran = ours is not None and "seconds" in ours
        xla = (ours or {}).get("xla_memory") or {}
        if best is not None:
            torch_cell = f"{per_device(best):.2f} ({best['name'].removeprefix('PyTorch ')}, {best['dtype']})"
        else:
            torch_cell = "not measured" if theirs else "not run"
        ratio = fmt(same_hardware(ours) / per_device(best), ".2f") if ran and best else "n/a"
        ours_cells = (f"{ours['batch'] / ours['seconds']:.2f}", f"{per_device(ours):.2f}") if ran else \
            ("not run" if ours else "n/a",) * 2
        rows.append((f"{n:,}", str(ours["devices"]) if ours else "n/a",
                     f"{ours['classifier_rows']:,}" if ours else "n/a",
                     fmt_bytes(ours and ours["classifier_bytes"], 3), fmt_bytes(xla.get("arguments"), 3),
                     fmt_bytes(xla.get("temporaries"), 3), *ours_cells, torch_cell, ratio))
    print_table(header, rows)
    print()
    versions = dict.fromkeys(r["versions"] for r in results if "versions" in r)
    if versions:
        print("versions: " + "; ".join(versions))
    if any(r["framework"] == "jax" and r["platform"] == "cpu" for r in results):
        print("note: on CPU the devices are simulated on one host: they share its cores and its RAM, which holds "
              "the per-device memory above once per device (replicated MSID copies included); the ratio then "
              "compares ours on the whole host with PyTorch on the whole host")
    for r in results:
        if r["framework"] == "jax" and "not_run" in r:
            print(f"not run: ours, {r['identities']} identities: {r['not_run']}")
    for s in skipped:
        print(f"not measured: {s}")


if __name__ == "__main__":
    sys.exit(main())
