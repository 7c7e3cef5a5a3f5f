"""Shared by the benchmark scripts: Stable Diffusion v1.4's and SDXL's configs, timing, child processes, tables.

Every measurement runs in a child process (the script itself with --worker), so peak memory is
per measurement and the frameworks never share a process; the child prints one RESULT line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from f2d_jax.models.bases import SD14_CLIP, SD14_UNET, SD14_VAE
from f2d_jax.models.bases import SDXL as _SDXL

ROOT = Path(__file__).resolve().parent.parent
RESULT = "RESULT "

# Stable Diffusion v1.4's and SDXL 1.0 base's components (f2d_jax/models/bases.py); the training noise schedule.
SD14_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon")
# scheduler/scheduler_config.json of SD v1.4 (no timestep_spacing: each sampler uses its own default)
SD14_SAMPLING_SCHEDULER = dict(SD14_SCHEDULER, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                               clip_sample=False)
SDXL = dict(_SDXL, resolution=1024)
# What a preset may give of the bundle's configs (f2d_jax.models.stable_diffusion.build's keys).
MODEL_KEYS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def model_configs(spec: dict, scheduler: dict) -> dict:
    """A preset's component configs for stable_diffusion.build; `scheduler` where the preset gives none (SD v1.4's
    presets: the training or the sampling one)."""
    return {"scheduler": scheduler, **{k: spec[k] for k in MODEL_KEYS if k in spec}}


def token_dim(spec: dict) -> int:
    """The mapping network's token width for a preset: its text encoders' widths together (SDXL: 768 + 1280)."""
    return sum(spec[k]["hidden_size"] for k in TEXT_ENCODERS if k in spec)


def torch_text_encoders(spec: dict) -> list:
    """transformers' text encoders of a preset, random init: CLIPTextModel, and SDXL's second as
    CLIPTextModelWithProjection (as its "architectures" says)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = []
    for name in (k for k in TEXT_ENCODERS if k in spec):
        config = CLIPTextConfig(**spec[name], bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        projected = "CLIPTextModelWithProjection" in spec[name].get("architectures", ())
        encoders.append((CLIPTextModelWithProjection if projected else CLIPTextModel)(config))
    return encoders


def reduced(resolution: int, **spec) -> dict:
    """SD v1.4's structure with widths / 5 (CLIP 12 x 256) at `resolution` px, for 2-core CPUs."""
    return dict(
        unet={**SD14_UNET, "sample_size": resolution // 8, "block_out_channels": (64, 128, 256, 256),
              "cross_attention_dim": 256},
        vae={**SD14_VAE, "sample_size": resolution, "block_out_channels": (32, 64, 128, 128)},
        text_encoder={**SD14_CLIP, "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4},
        resolution=resolution, **spec)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping); None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def xla_step_memory(compiled) -> dict | None:
    """XLA's buffer assignment for one step, per device: arguments, outputs (less donated aliases)
    and temporaries (activations and workspace)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes - m.alias_size_in_bytes,
                temporaries=m.temp_size_in_bytes)


# PyTorch autocast dtypes by their command-line names.
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def timed(step, sync, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(first call's seconds, per-step seconds of `steps` synchronized calls after `warmup` calls)."""
    first = None
    for i in range(warmup):
        start = time.perf_counter()
        sync(step())
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - start)
    return first, times


def jax_peak_bytes() -> int | None:
    """The largest peak_bytes_in_use of JAX's local devices; None where the backend reports none (CPU)."""
    import jax

    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    return max(s["peak_bytes_in_use"] for s in stats) if all("peak_bytes_in_use" in s for s in stats) else None


def torch_train_step(forward, opt, params, grad_clip: float, scaler=None, schedule=None):
    """A PyTorch training step as a callable returning the loss: forward() -> loss, backward
    (scaled by `scaler`, a GradScaler, when given), global-norm clipping of `params` at `grad_clip`
    (when > 0), `opt`'s step, then `schedule`'s (a learning-rate scheduler) when given."""
    import torch

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(opt)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if schedule is not None:
            schedule.step()
        return loss
    return step


def torch_timed(step, warmup: int, steps: int) -> tuple[float, list[float]]:
    """`timed` for PyTorch: on CUDA synchronized, with the peak memory statistics reset first."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return timed(step, lambda _: torch.cuda.synchronize() if cuda else None, warmup, steps)


def apply_preset(args, presets: dict, accelerated: str, framework: str) -> None:
    """Resolve args.preset "auto" (`accelerated` when `framework`, "jax" or "torch", sees an
    accelerator, else "cpu"), then fill in the preset's batch, steps and warmup where the command
    line gave none."""
    if args.preset == "auto":
        if framework == "jax":
            import jax
            args.preset = "cpu" if jax.default_backend() == "cpu" else accelerated
        else:
            import torch
            args.preset = accelerated if torch.cuda.is_available() else "cpu"
    spec = presets[args.preset]
    args.batch = args.batch or spec["batch"]
    args.steps = args.steps or spec["steps"]
    args.warmup = spec["warmup"] if args.warmup is None else args.warmup


def add_comparison_arguments(parser, batch_help: str, steps_help: str, warmup_help: str) -> None:
    """The options the step benchmarks share: sizes, the PyTorch variants, what to skip, the child
    processes' time limit, JSON output, and the internal worker options."""
    parser.add_argument("--batch", type=int, help=batch_help)
    parser.add_argument("--steps", type=int, help=steps_help)
    parser.add_argument("--warmup", type=int, help=warmup_help)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="our compute dtype (auto: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--torch-dtypes", default="auto",
                        help="comma list of PyTorch autocast dtypes among fp32, bf16, fp16 (auto: bf16,fp16 on "
                             "CUDA, fp32 on CPU)")
    parser.add_argument("--torch-compile", choices=("auto", "both", "off", "only"), default="auto",
                        help="PyTorch eager and torch.compile (both; a compile failure is reported, not fatal), "
                             "eager only (off) or compiled only; auto: both on CUDA, off on CPU")
    parser.add_argument("--warm-torch-cache", action="store_true",
                        help="let torch.compile use its on-disk caches (default: a fresh cache per run, so its "
                             "compile time is a cold compile like ours)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one measurement may take before it is reported as not measured "
                             "(default: %(default)s)")
    add_attention_argument(parser)
    parser.add_argument("--skip-torch", action="store_true", help="measure ours only")
    parser.add_argument("--skip-jax", action="store_true", help="measure PyTorch only")
    parser.add_argument("--json", metavar="FILE", help="also write all results to FILE")
    # Internal: one measurement in this process.
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--torch-dtype", choices=tuple(TORCH_DTYPES), default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--torch-compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jax-platform", help=argparse.SUPPRESS)


def add_attention_argument(parser) -> None:
    from f2d_jax.models.attention import IMPLEMENTATIONS

    parser.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto",
                        help="our attention implementation, model.attention (default: %(default)s; 'reference' is "
                             "the plain softmax form the models used before f2d_jax.models.attention)")


def check_comparison_arguments(parser, args) -> None:
    """parser.error for option values add_comparison_arguments' options cannot take."""
    if (args.batch is not None and args.batch < 1) or (args.steps is not None and args.steps < 1) or \
            (args.warmup is not None and args.warmup < 0):
        parser.error("--batch and --steps must be at least 1, --warmup at least 0")
    if args.torch_dtypes != "auto" and not set(args.torch_dtypes.split(",")) <= set(TORCH_DTYPES):
        parser.error(f"--torch-dtypes: a comma list of {', '.join(TORCH_DTYPES)}, got {args.torch_dtypes!r}")


def run_torch_variants(args, accelerated: bool, platform: str | None, run) -> list[tuple[str, dict]]:
    """Each PyTorch variant --torch-dtypes and --torch-compile ask for, measured by
    `run(extra worker arguments, env)`: [(label, result)], compiled variants in a fresh
    Inductor/Triton cache unless --warm-torch-cache (so torch.compile's time is a cold compile, as
    ours is)."""
    dtypes = args.torch_dtypes.split(",") if args.torch_dtypes != "auto" else \
        (["bf16", "fp16"] if accelerated else ["fp32"])
    mode = args.torch_compile if args.torch_compile != "auto" else ("both" if accelerated else "off")
    out = []
    for torch_dtype in dtypes:
        for compiled in {"both": [False, True], "off": [False], "only": [True]}[mode]:
            extra = ["--torch-dtype", torch_dtype] + (["--torch-compiled"] if compiled else []) + \
                (["--jax-platform", platform] if platform else [])
            with tempfile.TemporaryDirectory(prefix="f2d_bench_inductor_") as cache:
                env = {} if args.warm_torch_cache or not compiled else \
                    {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": str(Path(cache) / "triton")}
                out.append((f"PyTorch {'torch.compile' if compiled else 'eager'} {torch_dtype}", run(extra, env)))
    return out


def result_line(result: dict) -> str:
    return RESULT + json.dumps(result)


def run_child(command: list[str], timeout: float | None, env: dict | None = None) -> dict:
    """Run one measurement (`command`) in a child process; its last RESULT line is the answer."""
    started = time.perf_counter()
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, **(env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(failed=f"did not finish in --timeout {timeout:.0f} s")
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode or not lines:
        return dict(failed=f"exit status {result.returncode} (see its output above)")
    out = json.loads(lines[-1][len(RESULT):])
    out["wall_s"] = time.perf_counter() - started
    return out


def run_worker(script: str, kind: str, args, extra: list[str], env: dict | None = None,
               flags: tuple[str, ...] = ("batch", "steps", "warmup")) -> dict:
    """One measurement: `script --worker kind` with the preset, dtype, `extra` and the `flags` the
    command line set, in a child process (`run_child`)."""
    command = [sys.executable, str(Path(script).resolve()), "--worker", kind, "--preset", args.preset,
               "--dtype", args.dtype, "--attention", args.attention, *extra]
    for flag in flags:
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    return run_child(command, args.timeout, env)


def per_device(r: dict) -> float:
    """Images/s per device."""
    return r["batch"] / r["seconds"] / r["devices"]


def fmt_bytes(n, digits: int = 2) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.{digits}f} GiB"


def fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def table_text(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A markdown table, its columns padded to one width."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A markdown table after a blank line; nothing without rows."""
    if rows:
        print()
        print(table_text(header, rows))
