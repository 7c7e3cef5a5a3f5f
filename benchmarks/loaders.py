#!/usr/bin/env python
"""Host throughput of the training loaders (examples/s) next to the examples/s the training step
takes on an accelerator at a given MFU: can this host keep the accelerators fed?

    python benchmarks/loaders.py                         # a couple of minutes on a 2-core CPU
    python benchmarks/loaders.py --workers 1,4,16 --batches 40 --accelerators-per-host 8

Each loader is the one train.py builds: f2d_jax.data.loader.BatchLoader (with --workers loading
threads) over the source the training loop opens, iterated in this one process; examples/s is
timed over --batches batches after a warm-up that drains what the loader had loaded ahead. The
data are synthetic, written to a temporary folder by the project's own writers:

  Face2Diffusion (configs/f2d_sd14.py): prepared datasets as `python -m f2d_jax.data.prepare`
  writes them (f2d_jax.data.builder), of --resolution px examples made from
  f2d_jax/assets/face.jpg (shifted, scaled, mirrored, with pixel noise), images PNG-encoded:
    f2d cached    prepared with --cache-features (the normal path): identity, expression and VAE
                  latent moments read as float32, the head mask decoded and averaged to the latent grid
    f2d raw       prepared without: the image, mask and 112 / 224 px crops decoded per step; the frozen
                  encoders then run on the accelerators, so the step's FLOPs include them
  MSID pretraining (configs/msid_arcface.py): 112 px face JPEGs (--jpeg-quality) of face.jpg, jittered
    msid identities  an f2d_identities dataset (python -m f2d_jax.data.identities), the JPEGs as stored
    msid recordio    an insightface pack (train.rec / train.idx) read in place

The examples/s a step takes on an accelerator: the step's FLOPs per example at --mfu of the --chip's
dense bf16 peak, times --accelerators-per-host. The FLOPs are those of the matrix multiplications
and convolutions of train.py's step traced on abstract shapes (f2d_jax.compiled.matmul_flops:
nothing is compiled or allocated; the backward pass and remat's recomputation counted, as train.py
runs them; for raw data plus the frozen encoders' encoding). XLA's cost analysis (the training
loop's MFU) counts a loop's body once, so it would miss 11 of MSID's 12 scanned ViT blocks.

    needed examples/s = mfu x peak FLOP/s x accelerators per host / FLOPs per example
    headroom          = loader examples/s / needed examples/s       (want >= --target)
    cores for target  = target x needed examples/s x CPU seconds per example loaded (this process's CPU
                        time, all threads): the cores loading takes at that rate if it scales perfectly

The step FLOPs can be given instead (--f2d-flops, --f2d-raw-flops, --msid-flops) to skip the
tracing (about a minute on 2 cores). Files are read from the page cache (just written).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SD14_CLIP, SD14_SCHEDULER, SD14_UNET, SD14_VAE, log, print_table

FACE = ROOT / "f2d_jax" / "assets" / "face.jpg"
LOADERS = ("f2d-cached", "f2d-raw", "msid-identities", "msid-recordio")
CHIPS = ("H200=989", "TPU v5e=197")   # dense bf16 peak TFLOP/s (f2d_jax/train/metrics.py's PEAK_FLOPS)
PREFETCH = 2                          # BatchLoader's default


# ============================================================================ synthetic data

def jittered(face, size: int, rng, noise: float = 2.0):
    """`face` (RGB uint8) scaled to cover size x size, then randomly scaled, rotated, shifted and
    mirrored, with Gaussian pixel noise (sigma `noise`): one synthetic photo."""
    import cv2
    import numpy as np

    h, w = face.shape[:2]
    scale = size / min(h, w) * rng.uniform(1.0, 1.15)
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-5, 5), scale)
    matrix[:, 2] += np.array([size / 2, size / 2]) - np.array([w / 2, h / 2]) + rng.uniform(-0.04, 0.04, 2) * size
    image = cv2.warpAffine(face, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)


def f2d_examples(n: int, resolution: int, identity_dim: int, latent_shape, seed: int = 0) -> list[dict]:
    """n prepared examples, image fields PNG-encoded as prepare stores them, with cached features."""
    import cv2
    import numpy as np

    from f2d_jax.data.read import EXPRESSION_DIM
    from f2d_jax.data.recordio import encode_image
    from f2d_jax.faces import load_image

    face, r = load_image(FACE)[0], resolution
    examples = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        image = jittered(face, r, rng)
        mask = np.zeros((r, r), np.uint8)
        cv2.ellipse(mask, (int(r * rng.uniform(0.45, 0.55)), r // 2), (int(0.3 * r), int(0.42 * r)), 0, 0, 360, 255, -1)
        examples.append({
            "image": encode_image(image), "mask": cv2.imencode(".png", mask)[1].tobytes(),
            "face": encode_image(cv2.resize(image[r // 4:3 * r // 4, r // 4:3 * r // 4], (112, 112),
                                            interpolation=cv2.INTER_AREA)),
            "expression_face": encode_image(cv2.resize(image[r // 8:7 * r // 8, r // 8:7 * r // 8], (224, 224),
                                                       interpolation=cv2.INTER_AREA)),
            "landmarks": np.zeros((68, 2), np.float32), "name": f"synthetic/{i:05d}.png",
            "identity": rng.standard_normal(identity_dim, np.float32),
            "expression": rng.standard_normal(EXPRESSION_DIM, np.float32),
            "latent_moments": rng.standard_normal(tuple(latent_shape), np.float32),
        })
    return examples


def write_prepared(data_dir: Path, examples: list[dict], config, cached: bool) -> None:
    """A finished prepared dataset of `examples` (one "train" split) that fits `config`."""
    import dataclasses

    from f2d_jax.data import builder
    from f2d_jax.data.read import BASE_FIELDS, EXPRESSION_DIM, FEATURE_FIELDS, FORMAT, INFO_FILE, feature_description

    r = int(config.data.resolution)
    first = examples[0]
    spec = builder.DatasetSpec(r, len(first["identity"]), EXPRESSION_DIM, tuple(first["latent_moments"].shape)) \
        if cached else builder.DatasetSpec(r)
    fields = BASE_FIELDS + (FEATURE_FIELDS if cached else ())
    folder = builder.write_dataset(data_dir, spec, {"train": lambda: (
        (e["name"], {k: e[k] for k in fields}) for e in examples)}, download_dir=data_dir / "downloads")
    info = {"format": FORMAT, "name": builder.NAME, "version": builder.VERSION,
            "tfds_dir": os.path.relpath(folder, data_dir), "resolution": r,
            "mask_source": config.data.mask_source, "mask_dir": "", "flip": True, "holdout": 0,
            "features_cached": cached, "features": feature_description(config) if cached else None,
            **{k: v for k, v in dataclasses.asdict(spec).items() if k != "resolution"},
            "fields": list(fields), "splits": {"train": len(examples)}}
    (data_dir / INFO_FILE).write_text(json.dumps(info, indent=2))


def msid_images(n: int, seed: int = 1):
    """n jittered 112 px faces (uint8 (n, 112, 112, 3)) and their labels, 16 images an identity."""
    import cv2
    import numpy as np

    from f2d_jax.faces import load_image

    face = load_image(FACE)[0]
    face = cv2.resize(face[40:450, :], (140, 140), interpolation=cv2.INTER_AREA)   # a loose face crop
    rng = np.random.default_rng(seed)
    return np.stack([jittered(face, 112, rng) for _ in range(n)]), np.arange(n) // 16


# ============================================================================ loaders

def f2d_config(data_dir=""):
    from f2d_jax.config import load_config

    config = load_config(ROOT / "configs" / "f2d_sd14.py")
    config.data.update(dir=str(data_dir), holdout=0)
    return config


def msid_config(data_dir=""):
    from f2d_jax.config import load_config

    config = load_config(ROOT / "configs" / "msid_arcface.py")
    config.data.dir = str(data_dir)
    return config


def examples_per_second(source, transform, batch: int, workers: int, batches: int, warmup: int) -> tuple[float, float]:
    """train.py's loader over `source`: (examples/s, CPU seconds of this process per example) over
    `batches` batches, after `warmup` more than it loads ahead (its queue and its threads' batches),
    so that the timed batches are loaded while timed."""
    import jax

    from f2d_jax.data.loader import BatchLoader
    from f2d_jax.sharding import batch_sharding, make_mesh

    sharding = batch_sharding(make_mesh(f2d_config().mesh))
    loader = BatchLoader(source, batch, 0, sharding, transform=transform, workers=workers)
    try:
        for _ in range(warmup + PREFETCH + workers):
            next(loader)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            _, arrays = next(loader)
        jax.block_until_ready(arrays)
        return batch * batches / (time.perf_counter() - start), (time.process_time() - cpu) / (batch * batches)
    finally:
        loader.close()


def build_data(root: Path, args) -> tuple[dict, dict]:
    """({loader name: (source, transform)}, what the data are) for the --loaders asked for."""
    import numpy as np

    from f2d_jax.pretrain.data import training_source
    from f2d_jax.train.inputs import prepared_data

    wanted, sources, about = set(args.loaders), {}, {}
    if wanted & {"f2d-cached", "f2d-raw"}:
        started = time.perf_counter()
        r = args.resolution
        config = f2d_config()
        config.data.resolution = r
        examples = f2d_examples(args.f2d_examples, r, config.model.mapping.identity_dim, (r // 8, r // 8, 8))
        about["f2d"] = {f"{k} KB": round(float(np.mean([len(e[k]) for e in examples])) / 1e3, 1)
                        for k in ("image", "mask", "face", "expression_face")}
        for name, cached in (("f2d-cached", True), ("f2d-raw", False)):
            if name in wanted:
                write_prepared(root / name, examples, config, cached)
                config.data.dir = str(root / name)
                data = prepared_data(config, None)
                sources[name] = (data.source, data.transform)
        log(f"wrote the prepared datasets in {time.perf_counter() - started:.1f} s")
    if wanted & {"msid-identities", "msid-recordio"}:
        from f2d_jax.data.identities import build_identities
        from f2d_jax.data.recordio import write_face_recordio

        started = time.perf_counter()
        images, labels = msid_images(args.msid_examples)
        pack = write_face_recordio(root / "msid-recordio", images, labels, image_format=".jpg",
                                   quality=args.jpeg_quality)
        about["msid JPEG KB"] = round((pack / "train.rec").stat().st_size / len(images) / 1e3, 1)
        if "msid-identities" in wanted:
            build_identities(pack, root / "msid-identities", progress=False)
        for name in ("msid-identities", "msid-recordio"):
            if name in wanted:
                sources[name] = (training_source(msid_config(root / name))[0], None)
        log(f"wrote the identity datasets in {time.perf_counter() - started:.1f} s")
    return sources, about


# ============================================================================ the step's FLOPs

def f2d_step_flops(batch: int, resolution: int, raw: bool) -> float:
    """FLOPs per example of configs/f2d_sd14.py's train step (SD v1.4 at `resolution` px, `batch`
    examples), plus with `raw` the frozen encoders' encoding of raw examples (train.inputs.encode_raw)."""
    import jax
    import jax.numpy as jnp

    from f2d_jax.models import stable_diffusion as sdm   # first among ours: it quiets diffusers' Flax logging
    from f2d_jax.encoders import Encoders
    from f2d_jax.bundle import Models
    from f2d_jax.params import partition
    from f2d_jax.train.inputs import encode_raw
    from f2d_jax.train.loop import STEP_MODELS, step_function
    from f2d_jax.compiled import matmul_flops
    from f2d_jax.train.state import init_state
    from f2d_jax.train.step import Constants

    config = f2d_config()
    config.data.resolution = resolution
    sd = sdm.build({"unet": SD14_UNET, "vae": {**SD14_VAE, "sample_size": resolution}, "text_encoder": SD14_CLIP,
                    "scheduler": SD14_SCHEDULER}, dtype=jnp.bfloat16)
    encoders = Encoders.from_config(config.model, sd.text_encoders)
    models = Models(encoders, sd)
    variables = {**sdm.abstract_params(sd),
                 **jax.eval_shape(lambda key: encoders.init(key, ("msid", "mapping", "expression")), jax.random.key(0))}
    step, tx = step_function(config, models)
    trainable, frozen = partition({k: variables[k] for k in STEP_MODELS if k in variables}, config.train.trainable)
    state = jax.eval_shape(functools.partial(init_state, tx=tx), trainable)
    s, h = jax.ShapeDtypeStruct, resolution // 8
    features = {"identity": s((batch, encoders.mapping.identity_dim), jnp.float32),
                "expression": s((batch, encoders.mapping.expression_dim), jnp.float32),
                "latent_moments": s((batch, h, h, 2 * sd.vae.latent_channels), jnp.float32),
                "mask": s((batch, h, h, 1), jnp.float32)}
    constants = Constants(s((1, 77), jnp.int32), s((1,), jnp.int32), {"context": s((1, 77, sd.text_encoder.width), jnp.float32)},
                          s((SD14_SCHEDULER["num_train_timesteps"],), jnp.float32))
    flops = matmul_flops(step, state, frozen, features, constants)
    if raw:
        examples = {"image": s((batch, resolution, resolution, 3), jnp.uint8),
                    "mask": s((batch, resolution, resolution, 1), jnp.uint8),
                    "face": s((batch, 112, 112, 3), jnp.uint8), "expression_face": s((batch, 224, 224, 3), jnp.uint8)}
        flops += matmul_flops(functools.partial(encode_raw, models), variables, examples)
    return flops / batch


def msid_step_flops(batch: int, identities: int) -> float:
    """FLOPs per example of configs/msid_arcface.py's train step (the official MSID, ArcFace over
    `identities` classes) at `batch` examples."""
    from f2d_jax.pretrain.loop import program
    from f2d_jax.sharding import batch_sharding, make_mesh
    from f2d_jax.compiled import matmul_flops

    config = msid_config()
    config.arcface.num_identities = identities
    config.train.update(batch_size=batch, compute_dtype="bfloat16")
    mesh = make_mesh(config.mesh)
    prog = program(config, mesh)
    return matmul_flops(prog.step, prog.abstract_state, prog.batch(batch, batch_sharding(mesh))) / batch


def step_flops(args) -> dict[str, tuple[float, str]]:
    """{loader name: (FLOPs per example, what they are)}."""
    f2d = f"sd14 train step, {args.resolution} px, batch {args.f2d_batch}"
    kinds = {"f2d-cached": ("f2d_flops", f"{f2d}, cached features",
                            lambda: f2d_step_flops(args.f2d_batch, args.resolution, raw=False)),
             "f2d-raw": ("f2d_raw_flops", f"{f2d} + encoding raw examples (MSID, expression ResNet-50, VAE encoder)",
                         lambda: f2d_step_flops(args.f2d_batch, args.resolution, raw=True)),
             "msid": ("msid_flops", f"MSID vit_b ArcFace step, batch {args.msid_batch}, "
                                    f"{args.msid_identities:,} identities",
                      lambda: msid_step_flops(args.msid_batch, args.msid_identities))}
    out = {}
    for kind, (flag, what, lower) in kinds.items():
        if not any(name.startswith(kind) for name in args.loaders):
            continue
        given = getattr(args, flag)
        if given:
            out[kind] = (given, f"{what} (--{flag.replace('_', '-')})")
            continue
        started = time.perf_counter()
        log(f"tracing the {what} on abstract shapes ...")
        out[kind] = (lower(), f"{what} (matmuls and convolutions of the traced step)")
        log(f"  {out[kind][0] / 1e9:,.1f} GFLOP per example ({time.perf_counter() - started:.0f} s)")
    return {name: out["msid" if name.startswith("msid") else name] for name in args.loaders}


# ============================================================================ driver

def chips(values: list[str]) -> list[tuple[str, float]]:
    """--chip NAME=TFLOPS -> [(name, peak FLOP/s)]."""
    out = []
    for value in values:
        name, _, peak = value.rpartition("=")
        if not name or float(peak) <= 0:
            raise ValueError(value)
        out.append((name, float(peak) * 1e12))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loaders", default=",".join(LOADERS),
                        help=f"comma list among {', '.join(LOADERS)} (default: all)")
    parser.add_argument("--workers", default="1,0",
                        help="comma list of loading threads to time each loader with; 0 = data.workers' default, "
                             "one per CPU core up to 16 (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed batches first, besides those the loader had loaded ahead (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=512, help="Face2Diffusion image size (default: %(default)s)")
    parser.add_argument("--f2d-batch", type=int, default=8, help="Face2Diffusion batch (default: %(default)s)")
    parser.add_argument("--f2d-examples", type=int, default=48,
                        help="examples in each prepared dataset (default: %(default)s)")
    parser.add_argument("--msid-batch", type=int, default=128, help="MSID batch (default: %(default)s)")
    parser.add_argument("--msid-examples", type=int, default=1024,
                        help="112 px JPEGs in the identity dataset and the pack (default: %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="of the 112 px JPEGs (default: %(default)s)")
    parser.add_argument("--msid-identities", type=int, default=93_431,
                        help="classifier rows of the MSID step whose FLOPs count (default: %(default)s, MS1MV3)")
    parser.add_argument("--mfu", type=float, default=0.4, help="step MFU assumed (default: %(default)s)")
    parser.add_argument("--chip", action="append", metavar="NAME=TFLOPS",
                        help=f"an accelerator and its dense bf16 peak TFLOP/s; repeatable (default: {', '.join(CHIPS)})")
    parser.add_argument("--accelerators-per-host", type=int, default=1,
                        help="accelerators one host (this loader's process) feeds (default: %(default)s)")
    parser.add_argument("--target", type=float, default=5.0, help="headroom a loader should have (default: %(default)s)")
    parser.add_argument("--f2d-flops", type=float, help="FLOPs per example of the f2d step (skips its tracing)")
    parser.add_argument("--f2d-raw-flops", type=float,
                        help="FLOPs per example of the f2d step with raw-example encoding (skips its tracing)")
    parser.add_argument("--msid-flops", type=float, help="FLOPs per example of the MSID step (skips its tracing)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    args = parser.parse_args(argv)
    args.loaders = args.loaders.split(",")
    try:
        workers = [int(w) for w in args.workers.split(",")]
        accelerators = chips(args.chip or list(CHIPS))
    except ValueError as e:
        parser.error(f"--workers: comma list of integers >= 0; --chip: NAME=TFLOPS ({e})")
    if not set(args.loaders) <= set(LOADERS):
        parser.error(f"--loaders: comma list among {', '.join(LOADERS)}, got {','.join(args.loaders)}")
    if min(workers) < 0 or min(args.batches, args.f2d_batch, args.msid_batch, args.f2d_examples,
                               args.msid_examples, args.accelerators_per_host) < 1 or args.warmup < 0:
        parser.error("--workers must be >= 0, --warmup >= 0, and the batches, examples and accelerators >= 1")
    if args.resolution % 8 or not 0 < args.mfu <= 1:
        parser.error("--resolution must be a multiple of 8 and --mfu in (0, 1]")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import jax

    from f2d_jax.data.loader import loading_workers

    flops = step_flops(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="f2d_loaders_") as tmp:
        sources, about = build_data(Path(tmp), args)
        for name in args.loaders:
            source, transform = sources[name]
            batch = args.f2d_batch if name.startswith("f2d") else args.msid_batch
            for threads in dict.fromkeys(loading_workers(w) for w in workers):
                rate, cpu = examples_per_second(source, transform, batch, threads, args.batches, args.warmup)
                needed = {chip: args.mfu * peak * args.accelerators_per_host / flops[name][0]
                          for chip, peak in accelerators}
                results.append(dict(loader=name, workers=threads, batch=batch, examples_per_second=rate,
                                    cpu_seconds_per_example=cpu, needed=needed, flops_per_example=flops[name][0]))
                log(f"{name}, {threads} worker(s): {rate:,.1f} examples/s, {cpu * 1e3:.2f} CPU ms/example")

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\nhost: {cpus} CPU cores available, jax {jax.__version__} ({jax.default_backend()}); synthetic data "
          f"(mean encoded sizes): {json.dumps(about)}; examples/s over {args.batches} batches in one process")
    print("step FLOPs per example:")
    for what in dict.fromkeys((f, w) for f, w in flops.values()):
        print(f"  {what[0] / 1e9:,.1f} GFLOP  {what[1]}")
    print(f"needed examples/s = {args.mfu:.0%} MFU x dense bf16 peak x {args.accelerators_per_host} accelerator(s) "
          f"per host / step FLOPs per example; headroom = loader / needed (target {args.target:g}x); CPU ms/example: "
          f"this process's CPU time (all threads) per example loaded; cores for {args.target:g}x = {args.target:g} x "
          "needed x CPU s/example (the cores the loader would take at that rate if it scaled perfectly)")
    header = ("loader", "workers", "batch", "loader examples/s", "CPU ms/example",
              *(cell for chip, peak in accelerators for cell in (f"{chip} ({peak / 1e12:g} TFLOP/s) step examples/s",
                                                                 f"headroom on {chip}",
                                                                 f"cores for {args.target:g}x on {chip}")))
    rows = [(r["loader"], str(r["workers"]), str(r["batch"]), f"{r['examples_per_second']:,.1f}",
             f"{r['cpu_seconds_per_example'] * 1e3:.2f}",
             *(cell for chip, _ in accelerators for cell in (
                 f"{r['needed'][chip]:,.1f}",
                 f"{r['examples_per_second'] / r['needed'][chip]:.2f}x"
                 + ("" if r["examples_per_second"] >= args.target * r["needed"][chip] else " (<target)"),
                 f"{args.target * r['needed'][chip] * r['cpu_seconds_per_example']:.1f}")))
            for r in results]
    print_table(header, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results=results, flops={k: v[1] for k, v in flops.items()},
                                                   about=about, mfu=args.mfu, chips=dict(accelerators),
                                                   accelerators_per_host=args.accelerators_per_host), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
