"""Shared by the benchmark scripts: Stable Diffusion v1.4's configs, timing, child processes, tables.

Every measurement runs in a child process (the script itself with --worker), so peak memory is
per measurement and the frameworks never share a process; the child prints one RESULT line.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = "RESULT "

# Stable Diffusion v1.4's components, as in the checkpoint's config.json files.
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
    norm_eps=1e-5, act_fn="silu")
SD14_VAE = dict(  # built (the bundle needs it) but never run: the step reads cached VAE moments
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", scaling_factor=0.18215)
SD14_CLIP = dict(  # CLIP ViT-L/14's text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
SD14_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon")

# scheduler/scheduler_config.json of SD v1.4 (no timestep_spacing: each sampler uses its own default)
SD14_SAMPLING_SCHEDULER = dict(SD14_SCHEDULER, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                               clip_sample=False)


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


def fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2 ** 30:.2f} GiB"


def fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A markdown table."""
    if not rows:
        return
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
