#!/usr/bin/env python
"""Sampling throughput: F2DPipeline (JAX) against diffusers' PyTorch StableDiffusionPipeline (SDXL:
StableDiffusionXLPipeline).

    python benchmarks/sample.py                 # sd14 on an accelerator, the cpu preset otherwise
    python benchmarks/sample.py --preset cpu --repeats 2

Both sides generate `--batch` images with the same settings (Euler-ancestral, 30 steps, guidance 7,
512x512 for sd14, 1024x1024 for sdxl) from random weights of SD v1.4's or SDXL 1.0 base's shapes
(nothing is downloaded). Ours is
`F2DPipeline.generate` on an aligned face (conditioning, the jitted denoising loop, VAE decode,
images back on the host), the batch sharded over the local devices; PyTorch gets the prompt
embeddings precomputed (`prompt_embeds`, `negative_prompt_embeds`; SDXL also the pooled ones, the
negative ones zeros as its force_zeros_for_empty_prompt makes them) and returns numpy images, its
attention diffusers' default (AttnProcessor2_0: PyTorch's scaled_dot_product_attention, recorded as
"attention" in --json). On CUDA PyTorch runs in float16 (as diffusers recommends) and ours in bfloat16;
on CPU both in float32 (SDXL's PyTorch pipeline decodes in float32 on CUDA: its VAE config sets
force_upcast, as the published one does).
Compile time (our first call less a warm call) is reported apart; times are medians over --repeats
calls after one warm-up call. Each side runs in its own child process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import (ROOT, SD14_CLIP, SD14_SAMPLING_SCHEDULER, SD14_UNET, SD14_VAE, SDXL, add_attention_argument,
                    fmt, fmt_bytes, jax_peak_bytes, log, max_rss_bytes, model_configs, print_table, reduced, result_line,
                    run_child, timed, token_dim, torch_text_encoders, torch_timed)

PRESETS = {
    "sd14": dict(unet=SD14_UNET, vae=SD14_VAE, text_encoder=SD14_CLIP, resolution=512, batch=8),
    "cpu": reduced(256, batch=2),
    "sdxl": dict(SDXL, batch=2),   # SDXL 1.0 base, 1024 px
}


def benchmark_face():
    """f2d_jax/assets/face.jpg aligned; where dlib's detector is not installed, the photo resized to
    the two crops stands in (the timing does not depend on what the crops show)."""
    import numpy as np
    from PIL import Image

    from f2d_jax.faces import AlignedFace, align_face

    path = ROOT / "f2d_jax" / "assets" / "face.jpg"
    try:
        return align_face(str(path))
    except ImportError as e:
        log(f"[ours] no face detector ({e}): face.jpg resized stands in for its aligned crops")
        photo = Image.open(path).convert("RGB")
        crops = [np.asarray(photo.resize((size, size))) for size in (112, 224)]
        return AlignedFace(*crops, landmarks=np.zeros((68, 2)), matrix=np.eye(3), source=str(path))


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    from f2d_jax.models import stable_diffusion as sdm  # first: silences diffusers' Flax notices
    from f2d_jax.config import load_config
    from f2d_jax.encoders import Encoders
    from f2d_jax.bundle import Models, compute_dtype
    from f2d_jax.sampling import F2DPipeline

    spec = PRESETS[args.preset]
    dtype = compute_dtype("auto")
    sd = sdm.build(model_configs(spec, SD14_SAMPLING_SCHEDULER), dtype=dtype, attention=args.attention)
    variables = sdm.random_params(sdm.abstract_params(sd), jax.random.key(0), dtype)
    model = load_config(ROOT / "configs" / "f2d_sd14.py").model
    model.mapping.token_dim = token_dim(spec)   # SDXL: 768 + 1280
    model.attention = args.attention
    encoders = Encoders.from_config(model, sd.text_encoders)
    variables.update(encoders.init(jax.random.key(1), ("msid", "mapping")))
    pipe = F2DPipeline(Models(encoders, sd), variables)
    face = benchmark_face()
    size = spec["resolution"]

    def call(seed=0):
        return pipe.generate(face, "f l eating bread in front of the Eiffel Tower", num_images=args.batch, seed=seed,
                             steps=args.steps, guidance_scale=7.0, scheduler="euler_a", height=size, width=size,
                             progress=False)

    log(f"[ours] {args.preset}, {jnp.dtype(dtype).name}, {jax.local_device_count()} device(s): first call ...")
    first, times = timed(call, lambda x: x, 1, args.repeats)
    seconds = statistics.median(times)
    device = jax.local_devices()[0]
    peak = jax_peak_bytes()
    return dict(name="ours: F2DPipeline (JAX)", framework="jax", dtype=jnp.dtype(dtype).name, batch=args.batch,
                devices=jax.local_device_count(), seconds=seconds, times=times, compile_s=first - seconds,
                memory=peak or max_rss_bytes(),
                memory_kind="device peak_bytes_in_use" if peak else "process max RSS",
                device=f"{jax.local_device_count()} x {device.device_kind}", platform=device.platform,
                versions=f"jax {jax.__version__}")


def torch_worker(args) -> dict:
    import torch
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)

    from f2d_jax.text import load_tokenizer

    spec = PRESETS[args.preset]
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    texts = torch_text_encoders(spec)
    modules = dict(vae=AutoencoderKL(**spec["vae"]), unet=UNet2DConditionModel(**spec["unet"]),
                   scheduler=EulerAncestralDiscreteScheduler.from_config(model_configs(spec, SD14_SAMPLING_SCHEDULER)[
                       "scheduler"]), text_encoder=texts[0], tokenizer=load_tokenizer())
    sdxl = len(texts) > 1
    if sdxl:  # the prompt embeddings are given: the tokenizers are never called
        pipeline = StableDiffusionXLPipeline(**modules, text_encoder_2=texts[1], tokenizer_2=load_tokenizer())
    else:
        pipeline = StableDiffusionPipeline(**modules, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe = pipeline.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(args.batch, 77, token_dim(spec), device=device, dtype=dtype)
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds))
    if sdxl:   # bigG's projected pooled state; the negative zeros (force_zeros_for_empty_prompt)
        pooled = torch.randn(args.batch, spec["text_encoder_2"]["projection_dim"], device=device, dtype=dtype)
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=torch.zeros_like(pooled))
    size = spec["resolution"]

    def call(seed=0):
        with torch.no_grad():
            return pipe(**kwargs, height=size, width=size, num_inference_steps=args.steps, guidance_scale=7.0,
                        output_type="np", generator=torch.Generator(device).manual_seed(seed)).images

    log(f"[PyTorch] {args.preset}, {dtype}, {device}: first call ...")
    first, times = torch_timed(call, 1, args.repeats)
    return dict(name=f"diffusers {type(pipe).__name__} (PyTorch)", framework="torch", compiled=False,
                dtype=str(dtype).removeprefix("torch."), batch=args.batch, devices=1,
                attention=", ".join(sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})),
                seconds=statistics.median(times), times=times, compile_s=None,
                memory=torch.cuda.max_memory_allocated() if cuda else max_rss_bytes(),
                memory_kind="torch.cuda.max_memory_allocated" if cuda else "process max RSS",
                device=torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
                versions=f"torch {torch.__version__}, diffusers {diffusers.__version__}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                        help="sd14 (SD v1.4, 512 px, batch 8), cpu (widths / 5, 256 px, batch 2) or sdxl (SDXL 1.0 "
                             "base, 1024 px, batch 2); auto: sd14 when JAX sees an accelerator")
    parser.add_argument("--batch", type=int, help="images per call (default: the preset's)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write all results to FILE")
    add_attention_argument(parser)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.preset == "auto":
        import jax
        args.preset = "cpu" if jax.default_backend() == "cpu" else "sd14"
    args.batch = args.batch or PRESETS[args.preset]["batch"]
    if min(args.batch, args.steps, args.repeats) < 1:
        parser.error("--batch, --steps and --repeats must be at least 1")
    if args.worker:
        print(result_line((jax_worker if args.worker == "jax" else torch_worker)(args)), flush=True)
        return 0

    command = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--steps",
               str(args.steps), "--repeats", str(args.repeats), "--attention", args.attention, "--worker"]
    results, started = {}, time.perf_counter()
    for kind in ("jax", "torch"):
        results[kind] = run_child(command + [kind], args.timeout)
        if "failed" not in results[kind]:
            log(f"{results[kind]['name']}: {results[kind]['seconds']:.2f} s per call")
    size = PRESETS[args.preset]["resolution"]
    print(f"\npreset {args.preset}: {args.batch} images of {size}x{size}, Euler-ancestral, {args.steps} steps, "
          f"guidance 7 (batch {2 * args.batch} through the UNet); median of {args.repeats} calls "
          f"({time.perf_counter() - started:.0f} s in all)")
    rows = []
    for r in results.values():
        if "failed" in r:
            print(f"not measured: {r['failed']}")
            continue
        rows.append((r["name"], r["dtype"], r["device"], f"{args.batch / r['seconds']:.3f}",
                     f"{r['seconds'] / args.batch:.2f}", fmt(r["compile_s"], ".1f", "-"), fmt_bytes(r["memory"])))
    print_table(("run", "dtype", "device", "images/s", "s/image", "compile s", "peak memory"), rows)
    if all("failed" not in r for r in results.values()):
        ratio = results["torch"]["seconds"] / results["jax"]["seconds"]
        print(f"\nratio ours / PyTorch: {ratio:.2f}x images/s")
        print("versions: " + "; ".join(r["versions"] for r in results.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"preset": args.preset, "steps": args.steps, "repeats": args.repeats,
             "results": [r for r in results.values() if "failed" not in r],
             "skipped": [f"{kind}: {r['failed']}" for kind, r in results.items() if "failed" in r]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
