#!/usr/bin/env python
"""Training-step throughput: our jitted Face2Diffusion CGDR step against the same step in PyTorch.

    python benchmarks/train_step.py                  # sd14 on an accelerator, the cpu preset otherwise
    python benchmarks/train_step.py --preset cpu --steps 5 --warmup 2
    python benchmarks/train_step.py --preset sdxl    # SDXL 1.0 base, 1024 px
    python benchmarks/train_step.py --preset sdxl --memory-only --devices 8 --fsdp 8 --batch 1

Both sides run one training step of Face2Diffusion's CGDR objective on random weights and data of
the same shapes (the numbers that matter for speed; nothing is downloaded):

    class branch:  eps_c = UNet(z_t, t, CLIP("a photo of a person"))        no gradient
    trained path:  mapping(identity, expression | null_exp) -> "f l" tokens written into the
                   CLIP embeddings of "a photo of f l" -> CLIP encoder -> UNet -> eps*
    loss:          mean(M (eps* - eps)^2) + lambda mean((1 - M)(eps* - eps_c)^2)
    update:        global-norm clipping + AdamW on the mapping network only

Ours is exactly what train.py runs: f2d_jax.train.step.train_step, jitted with explicit shardings
over all local devices (batch split, frozen parameters replicated), the state donated, compiled
ahead of time, built as f2d_jax/train/loop.py builds it from configs/f2d_sd14.py. PyTorch is
diffusers' UNet2DConditionModel and transformers' CLIPTextModel with the same configs (the official
Face2Diffusion injection: embeddings, overwrite the two identifier positions, causal encoder, final
layer norm), the plain-torch official mapping network (f2d_jax.torch.Mapping), torch.optim.AdamW and
clip_grad_norm_, frozen models with requires_grad False and the class branch under no_grad.
PyTorch runs eager and, where it works, under torch.compile; on accelerators with bf16 autocast
and with fp16 autocast (+ GradScaler), frozen weights stored in that dtype as diffusers' training
scripts do. On CPU everything is float32.

Every measurement runs in its own child process (this script with --worker), one after the
other, so peak memory is per measurement and the frameworks do not share the machine. Times are
medians over --steps synchronized steps after --warmup steps. --batch is per device: ours runs
batch x local devices, PyTorch batch on one device; the ratio compares images/s per device.

SDXL (--preset sdxl): both text encoders, the "f l" tokens 768 + 1280 wide (CLIP ViT-L's slice, bigG's
slice), the context their penultimate states side by side, the UNet's added conditioning bigG's
projected pooled state and the time ids of the training size; PyTorch the same through
transformers' CLIPTextModel and CLIPTextModelWithProjection (hidden_states[-2], text_embeds) and the
UNet's added_cond_kwargs.

--memory-only compiles ours' step (the same step_program, abstract=True) from ShapeDtypeStructs with
shardings, so nothing is allocated, and prints XLA's buffer assignment per device (arguments,
outputs less donated, temporaries), the frozen parameters and train state per device, and whether
the total fits a 16 GB accelerator: --devices simulates that many devices on the CPU backend, and
--fsdp > 1 shards the frozen parameters over the mesh's fsdp axis (mesh.frozen="fsdp"). The compute
dtype defaults to bfloat16. On CPU the figures are XLA:CPU's buffer assignment, not the GPU or TPU
compiler's: XLA:CPU computes bfloat16 convolutions and matmuls in float32 and moves those conversions
ahead of the fsdp all-gathers, so its temporaries hold float32 copies of the gathered weights and
activations (about twice what bfloat16 operands take), with other fusions and scheduling besides.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (ROOT, SD14_CLIP, SD14_SCHEDULER, SD14_UNET, SD14_VAE, SDXL, TORCH_DTYPES, add_comparison_arguments,
                    apply_preset, check_comparison_arguments, fmt, fmt_bytes, jax_peak_bytes, log, max_rss_bytes,
                    model_configs, per_device, print_table, reduced, result_line, run_torch_variants, run_worker, timed,
                    token_dim, torch_text_encoders, torch_timed, torch_train_step, xla_step_memory)
from f2d_jax.models.stable_diffusion import TINY_SDXL_CONFIGS

PRESETS = {
    # The paper's set-up: SD v1.4 at 512 px (64x64x4 latents), the official mapping network 1536 -> 768.
    "sd14": dict(unet=SD14_UNET, vae=SD14_VAE, text_encoder=SD14_CLIP, resolution=512, batch=8, warmup=5, steps=20),
    # The same structure, widths / 5 (CLIP / 3), 256 px (32x32x4 latents): a few minutes on a 2-core CPU.
    "cpu": reduced(256, batch=2, warmup=2, steps=5),
    # SDXL 1.0 base at 1024 px (128x128x4 latents): both text encoders, the mapping network 1536 -> 768 + 1280.
    "sdxl": dict(SDXL, batch=2, warmup=3, steps=10),
    # The tiny SDXL structure of the tests (64 px, 8x8x4 latents): --memory-only's test.
    "tiny_sdxl": dict(TINY_SDXL_CONFIGS, resolution=64, batch=1, warmup=1, steps=2),
}
ACCELERATED = "sd14"   # --preset auto on an accelerator


def train_config(args):
    """configs/f2d_sd14.py with the mapping network sized for the preset's text encoders."""
    from f2d_jax.config import load_config

    config = load_config(ROOT / "configs" / "f2d_sd14.py")
    config.model.mapping.token_dim = token_dim(PRESETS[args.preset])
    config.model.attention = args.attention
    if args.remat_unet != "config":
        config.train.remat_unet = args.remat_unet == "on"
    config.train.batch_size = args.batch
    return config


def make_batch(preset: str, batch: int, identity_dim: int, expression_dim: int, seed: int = 0):
    """Cached-feature batch as the data loader yields it (NHWC, float32): identity, expression,
    VAE latent moments (mean | logvar) and a head mask at latent resolution."""
    import numpy as np

    rng = np.random.default_rng(seed)
    size = PRESETS[preset]["resolution"] // 8
    yy, xx = np.mgrid[:size, :size] / size
    mask = ((((yy - 0.5) / 0.35) ** 2 + ((xx - 0.5) / 0.26) ** 2) <= 1).astype(np.float32)
    mean = rng.standard_normal((batch, size, size, 4), np.float32) * 5.5
    return {
        "identity": rng.standard_normal((batch, identity_dim), np.float32),
        "expression": rng.standard_normal((batch, expression_dim), np.float32),
        "latent_moments": np.concatenate([mean, np.full_like(mean, -6.0)], axis=-1),
        "mask": np.broadcast_to(mask[None, :, :, None], (batch, size, size, 1)).copy(),
    }


# ============================================================================ ours (JAX)

def jax_models(args, config, dtype):
    """(Models, abstract variables) of the preset: the SD bundle from its config dicts, the encoders from
    `config`; ShapeDtypeStructs (nothing allocated) of the step's models, the UNet and text encoders in
    `dtype`, the mapping network float32 (as load_models gives them)."""
    import jax

    # First among ours: it silences diffusers' Flax deprecation logging.
    from f2d_jax.models import stable_diffusion as sdm
    from f2d_jax.encoders import Encoders
    from f2d_jax.bundle import Models

    sd = sdm.build(model_configs(PRESETS[args.preset], SD14_SCHEDULER), dtype=dtype, attention=config.model.attention)
    abstract = sdm.abstract_params(sd, dtype)
    encoders = Encoders.from_config(config.model, sd.text_encoders)
    variables = {k: abstract[k] for k in ("unet", *sd.text_encoders)}
    variables.update(jax.eval_shape(lambda key: encoders.init(key, ("mapping",)), jax.random.key(config.seed + 1)))
    return Models(encoders, sd), variables


def feature_shapes(preset: str, encoders, global_batch: int, sharding) -> dict:
    """The step's batch as ShapeDtypeStructs (make_batch's, `global_batch` rows) with `sharding`."""
    import jax

    example = make_batch(preset, 1, encoders.mapping.identity_dim, encoders.mapping.expression_dim)
    return {k: jax.ShapeDtypeStruct((global_batch, *v.shape[1:]), v.dtype, sharding=sharding)
            for k, v in example.items()}


def jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    from f2d_jax.models import stable_diffusion as sdm
    from f2d_jax.bundle import compute_dtype
    from f2d_jax.sharding import batch_sharding, make_mesh
    from f2d_jax.train.loop import step_program
    from f2d_jax.compiled import compiled_flops
    from f2d_jax.train.metrics import mfu, peak_flops

    jax.config.update("jax_threefry_partitionable", True)  # as loop.py
    rss_baseline = max_rss_bytes()  # Python + JAX + diffusers (+ the torch it imports), before any model
    config = train_config(args)
    tc = config.train
    dtype = compute_dtype(args.dtype)

    # ---- models: the SD bundle from config dicts, random weights; the encoders from the config
    log(f"[ours] building {args.preset} models ({jnp.dtype(dtype).name}) ...")
    models, abstract = jax_models(args, config, dtype)
    encoders = models.encoders
    variables = sdm.random_params({k: v for k, v in abstract.items() if k != "mapping"}, jax.random.key(config.seed),
                                  dtype)
    variables.update(encoders.init(jax.random.key(config.seed + 1), ("mapping",)))

    # ---- exactly train.py's step: f2d_jax.train.loop.step_program
    mesh = make_mesh(config.mesh)
    global_batch = args.batch * mesh.size
    program = step_program(config, models, variables, mesh)
    state = program.init()
    del variables
    batch_sh = batch_sharding(mesh)
    batch = jax.device_put(make_batch(args.preset, global_batch, encoders.mapping.identity_dim,
                                      encoders.mapping.expression_dim), batch_sh)
    features = feature_shapes(args.preset, encoders, global_batch, batch_sh)

    log(f"[ours] compiling the train step (batch {global_batch} over {mesh.size} device(s), "
        f"remat_unet={tc.remat_unet}) ...")
    rss_setup = max_rss_bytes()
    start = time.perf_counter()
    compiled, flops = program.compile(features, mesh.size)
    compile_s = time.perf_counter() - start
    if jax.config.jax_compilation_cache_dir:
        log(f"[ours] note: JAX's persistent compilation cache is on ({jax.config.jax_compilation_cache_dir}); "
            "the compile time may be a cache hit")
    # flops: per device, the traced matmuls and convolutions, every loop iteration counted (XLA's cost
    # analysis counts a loop body once, e.g. one query block of the cpu attention); XLA's figure is kept.
    xla_memory = xla_step_memory(compiled)
    rss_compiled = max_rss_bytes()
    log(f"[ours] compiled in {compile_s:.1f} s (trace, lower, compile); timing {args.warmup} warm-up + "
        f"{args.steps} steps ...")

    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], program.frozen, batch, program.constants)
        return holder["state"], metrics

    first, times = timed(step, jax.block_until_ready, args.warmup, args.steps)
    _, metrics = step()
    metrics = jax.device_get(metrics)

    device = jax.local_devices()[0]
    memory, memory_kind = jax_peak_bytes(), "device peak_bytes_in_use"
    if memory is None:
        memory, memory_kind = max_rss_bytes(), "process max RSS"
    seconds = statistics.median(times)
    return dict(
        name="ours (JAX, jit AOT)", framework="jax", dtype=jnp.dtype(dtype).name, compiled=True,
        device=f"{jax.local_device_count()} x {device.device_kind}", platform=device.platform,
        batch=global_batch, devices=mesh.size, seconds=seconds, times=times, first_step_s=first,
        compile_s=compile_s, memory=memory, memory_kind=memory_kind, rss_baseline=rss_baseline,
        rss_setup=rss_setup, rss_compiled=rss_compiled,
        xla_memory=xla_memory, flops=flops, xla_flops=compiled_flops(compiled),
        peak_flops=peak_flops(device), mfu=mfu(flops, seconds, device),
        loss=float(metrics["loss"]), finite=bool(metrics["finite"]), remat_unet=bool(tc.remat_unet),
        versions=f"jax {jax.__version__}, flax {__import__('flax').__version__}")


# ============================================================================ ours: memory only

GIB16 = 16 * 2 ** 30   # a 16 GB accelerator (V100 16GB, TPU v5e: 16 GiB of HBM)


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bytes_total(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_only(args) -> dict:
    """Compile train.py's step for the preset over --devices devices (a mesh of data x --fsdp; the frozen
    parameters sharded by mesh.frozen="fsdp" when --fsdp > 1) from abstract variables (nothing is allocated,
    so any model size compiles on a small host), and report XLA's buffer assignment per device."""
    import jax

    if args.devices and jax.config.jax_num_cpu_devices != args.devices:   # on the CPU backend, simulated
        jax.config.update("jax_num_cpu_devices", args.devices)              # devices (before JAX's backends start)
    import jax.numpy as jnp

    from f2d_jax.sharding import batch_sharding, make_mesh
    from f2d_jax.train.loop import step_program

    jax.config.update("jax_threefry_partitionable", True)  # as loop.py
    config = train_config(args)
    config.mesh.update(data=-1, fsdp=args.fsdp, frozen="fsdp" if args.fsdp > 1 else "replicate")
    dtype = jnp.bfloat16 if args.dtype == "auto" else jnp.dtype(args.dtype)   # auto: an accelerator's
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    if args.devices and len(devices) < args.devices:
        raise SystemExit(f"--devices {args.devices}: JAX has {len(devices)} {devices[0].platform} device(s)")
    mesh = make_mesh(config.mesh, devices)
    config.train.batch_size = global_batch = args.batch * mesh.size
    spec = PRESETS[args.preset]
    log(f"[memory] {args.preset}: train step at {spec['resolution']} px, batch {args.batch}/device over "
        f"{mesh.size} {devices[0].platform} device(s), mesh {dict(mesh.shape)}, frozen={config.mesh.frozen}, "
        f"{jnp.dtype(dtype).name}, abstract parameters ...")
    start = time.perf_counter()
    models, variables = jax_models(args, config, dtype)
    program = step_program(config, models, variables, mesh, abstract=True)
    features = feature_shapes(args.preset, models.encoders, global_batch, batch_sharding(mesh))
    compiled, flops = program.compile(features, mesh.size)
    compile_s = time.perf_counter() - start
    xla = xla_step_memory(compiled)
    total = sum(xla.values()) if xla else None
    return dict(
        mode="memory-only", preset=args.preset, resolution=spec["resolution"], batch_per_device=args.batch,
        batch=global_batch, devices=mesh.size, platform=devices[0].platform, mesh=dict(mesh.shape),
        frozen_rule=config.mesh.frozen, dtype=jnp.dtype(dtype).name, remat_unet=bool(config.train.remat_unet),
        attention=config.model.attention, compile_s=compile_s, flops=flops,
        frozen_total=bytes_total(program.frozen), frozen_per_device=bytes_per_device(program.frozen),
        state_total=bytes_total(program.abstract_state), state_per_device=bytes_per_device(program.abstract_state),
        xla_memory=xla, xla_total=total, fits_16gb=None if total is None else total <= GIB16,
        max_rss=max_rss_bytes(), versions=f"jax {jax.__version__}, flax {__import__('flax').__version__}")


def describe_memory(r: dict) -> str:
    xla = r["xla_memory"]
    lines = [
        f"preset {r['preset']} (memory only: compiled, not run): train step at {r['resolution']} px, batch "
        f"{r['batch_per_device']}/device ({r['batch']} in all) over {r['devices']} {r['platform']} device(s), mesh "
        f"{r['mesh']}, frozen parameters {r['frozen_rule']}, {r['dtype']}, remat_unet={r['remat_unet']}, attention "
        f"{r['attention']}; trace + lower + compile {r['compile_s']:.1f} s (max RSS {fmt_bytes(r['max_rss'])})",
        f"frozen parameters: {fmt_bytes(r['frozen_total'])} in all, {fmt_bytes(r['frozen_per_device'])}/device; "
        f"train state (mapping network + AdamW): {fmt_bytes(r['state_total'], 3)} in all, "
        f"{fmt_bytes(r['state_per_device'], 3)}/device",
    ]
    if xla is None:
        lines.append("XLA's buffer assignment: not available on this backend")
    else:
        lines.append(f"XLA buffers/device: arguments {fmt_bytes(xla['arguments'])}, outputs {fmt_bytes(xla['outputs'])} "
                     f"(less donated), temporaries {fmt_bytes(xla['temporaries'])}; total {fmt_bytes(r['xla_total'])}: "
                     f"{'fits' if r['fits_16gb'] else 'does not fit'} in 16 GiB per device")
    return "\n".join(lines)


# ============================================================================ PyTorch

def torch_worker(args) -> dict:
    import contextlib
    import warnings

    import numpy as np
    import torch
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # Flax deprecation notices (diffusers imports its Flax side)
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from f2d_jax.text import identifier_prompts, load_tokenizer, token_ids

    from f2d_jax.torch import Mapping, text_transformer  # the official IMG2TEXTwithEXP structure, plain torch

    rss_baseline = max_rss_bytes()  # Python + torch + diffusers (+ the JAX it imports), before any model
    config = train_config(args)
    tc, optim, spec = config.train, config.optim, PRESETS[args.preset]
    cuda = torch.cuda.is_available()
    if args.jax_platform not in (None, "cpu") and not cuda:
        return dict(skipped=f"JAX ran on {args.jax_platform} but this PyTorch has no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, TORCH_DTYPES[args.torch_dtype])
    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    torch.manual_seed(config.seed)
    name = f"PyTorch {'torch.compile' if args.torch_compiled else 'eager'}" + \
        (f" + {args.torch_dtype} autocast" if dtype != torch.float32 else "")
    log(f"[{name}] building {args.preset} models ...")

    # ---- frozen models: same configs, random init, weights in the compute dtype, no gradients
    with torch.device(device):
        unet = UNet2DConditionModel(**spec["unet"])
        texts = torch_text_encoders(spec)   # SDXL: CLIP ViT-L and bigG (with its projection)
        m = config.model.mapping
        mapping = Mapping(identity=m.identity_dim, hidden=m.hidden_dim, out=m.token_dim, n_layer=m.num_layers,
                          dropout=m.dropout, exp=m.expression_dim)
    for frozen in (unet, *texts):
        frozen.requires_grad_(False).eval().to(dtype)
    if tc.remat_unet:  # the same recomputation as ours (diffusers checkpoints per block)
        unet.enable_gradient_checkpointing()
    mapping.train()  # dropout on, as ours (train=True)
    sdxl = len(texts) > 1

    # ---- optimizer: AdamW on the mapping network, global-norm clipping, linear warm-up
    opt = torch.optim.AdamW(mapping.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2),
                            weight_decay=optim.weight_decay, eps=1e-8)
    warmup = max(int(optim.warmup_steps), 0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s / warmup, 1.0) if warmup else 1.0)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    # ---- constants: captions (each encoder's ids: SDXL's bigG pads with its tokenizer's "!"), the class
    # conditioning, the noise schedule, SDXL's time ids (the training size: (h, w, 0, 0, h, w))
    tokenizer = load_tokenizer()
    ids, positions = identifier_prompts(list(tc.prompts), tokenizer)
    pads = [(spec.get(name) or {}).get("pad_token") for name in ("tokenizer", "tokenizer_2")[:len(texts)]]

    def encoder_ids(ids):  # the ids each encoder reads: re-padded after the first end-of-text token
        after_end = np.arange(ids.shape[-1]) > (ids == tokenizer.eos_token_id).argmax(-1, keepdims=True)
        return [torch.as_tensor(ids if pad is None else np.where(after_end, tokenizer.convert_tokens_to_ids(pad), ids),
                                dtype=torch.long, device=device) for pad in pads]
    ids = encoder_ids(ids)
    positions = torch.as_tensor(positions, dtype=torch.long, device=device)
    size = spec["resolution"]
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device)

    def conditioning(ids, tokens=None, positions=None):
        """The UNet's (context, added_cond_kwargs) for each encoder's (B, 77) ids, with the (first, last)
        "f l" tokens (B, D) written at `positions` (each encoder takes its slice of D, in order): SD v1 the
        final layer norm's states; SDXL both penultimate states side by side, and bigG's projected pooled
        state and the time ids."""
        states, offset, added = [], 0, None
        for text, input_ids in zip(texts, ids):
            embeddings = text_transformer(text).embeddings
            width = embeddings.token_embedding.embedding_dim

            def inject(module, args, hidden, offset=offset, width=width):  # the tokens over the embeddings
                hidden, rows = hidden.clone(), torch.arange(len(input_ids), device=device)
                for i, token in enumerate(tokens):
                    hidden[rows, positions + i] = token[:, offset:offset + width].to(hidden.dtype)
                return hidden

            handle = embeddings.register_forward_hook(inject) if tokens is not None else None
            try:
                out = text(input_ids, output_hidden_states=sdxl)
            finally:
                if handle is not None:
                    handle.remove()
            offset += width
            final = out.last_hidden_state
            states.append(out.hidden_states[-2] if sdxl else final)
            if hasattr(text, "text_projection"):   # pooled at the first end-of-text token
                rows = torch.arange(len(input_ids), device=device)
                pooled = final[rows, (input_ids == tokenizer.eos_token_id).int().argmax(-1)]
                added = {"text_embeds": text.text_projection(pooled), "time_ids": time_ids.expand(len(rows), -1)}
        return torch.cat(states, -1), added

    with torch.no_grad(), autocast():
        class_context, class_added = conditioning(encoder_ids(token_ids(tc.class_prompt, tokenizer)))
    alphas = DDPMScheduler.from_config(model_configs(spec, SD14_SCHEDULER)["scheduler"]).alphas_cumprod.to(
        device=device, dtype=torch.float32)

    b = args.batch
    data = make_batch(args.preset, b, m.identity_dim, m.expression_dim)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)  # noqa: E731
    batch = {"identity": torch.from_numpy(data["identity"]).to(device),
             "expression": torch.from_numpy(data["expression"]).to(device),
             "latent_moments": nchw(data["latent_moments"]), "mask": nchw(data["mask"])}
    scaling, lam, p_uncond = spec["vae"]["scaling_factor"], tc.cgdr_lambda, tc.p_uncond
    class_added = class_added and {k: v.expand(b, -1) for k, v in class_added.items()}

    def loss_fn(batch):
        mean, logvar = batch["latent_moments"].chunk(2, dim=1)
        z0 = scaling * (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))
        t = torch.randint(0, alphas.shape[0], (b,), device=device)
        eps = torch.randn_like(z0)
        abar = alphas[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
        keep = (torch.rand(b, device=device) < 1 - p_uncond).float()
        caption = torch.randint(0, ids[0].shape[0], (b,), device=device)
        with autocast():
            with torch.no_grad():
                eps_class = unet(z_t, t, encoder_hidden_states=class_context.expand(b, -1, -1),
                                 added_cond_kwargs=class_added).sample
            tokens = mapping(batch["identity"], batch["expression"], keep)
            context, added = conditioning([x[caption] for x in ids], tokens, positions[caption])
            pred = unet(z_t, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        pred, eps_class, mask = pred.float(), eps_class.float(), batch["mask"]
        fg = (mask * (pred - eps) ** 2).mean()
        bg = ((1 - mask) * (pred - eps_class) ** 2).mean()
        return fg + lam * bg

    # diffusers' checkpointing helper calls an lru_cache'd version check, which dynamo warns about.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    forward = torch.compile(loss_fn) if args.torch_compiled else loss_fn

    step = torch_train_step(lambda: forward(batch), opt, list(mapping.parameters()), optim.grad_clip, scaler,
                            lr_schedule)
    log(f"[{name}] timing {args.warmup} warm-up + {args.steps} steps"
        + (" (torch.compile happens in the first)" if args.torch_compiled else "") + " ...")
    first, times = torch_timed(step, args.warmup, args.steps)
    loss = float(step().detach())
    flops = None
    if not args.torch_compiled:  # an independent count (matmuls, convolutions, attention), one more step
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = float(counter.get_total_flops())
    if cuda:
        memory, memory_kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        device_name = torch.cuda.get_device_name()
    else:
        memory, memory_kind = max_rss_bytes(), "process max RSS"
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    seconds = statistics.median(times)
    return dict(
        name=name, framework="torch", dtype=str(dtype).removeprefix("torch."), compiled=args.torch_compiled,
        device=device_name, platform=device.type, batch=b, devices=1, seconds=seconds, times=times,
        first_step_s=first, compile_s=(first - seconds) if args.torch_compiled and first else None,
        memory=memory, memory_kind=memory_kind, rss_baseline=rss_baseline, flops=flops,
        loss=loss, finite=bool(np.isfinite(loss)),
        remat_unet=bool(tc.remat_unet),
        versions=f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
                 f"transformers {__import__('transformers').__version__}")


# ============================================================================ driver

def measure(kind: str, args, extra: list[str], env: dict | None = None) -> dict:
    """One measurement in a child process."""
    return run_worker(__file__, kind, args, ["--remat-unet", args.remat_unet, *extra], env)


def describe(r: dict) -> str:
    parts = [f"{r['name']:<38s} {r['dtype']:>8s}: {r['batch'] / r['seconds']:8.2f} images/s "
             f"({per_device(r):.2f}/device), {r['seconds']:.3f} s/step median "
             f"[{min(r['times']):.3f}-{max(r['times']):.3f}], first step {fmt(r['first_step_s'], '.1f')} s"]
    if r["framework"] == "jax":
        parts.append(f"compile {r['compile_s']:.1f} s")
        parts.append(f"{fmt(r['flops'] and r['flops'] / 1e12, '.3f')} TFLOP/step (traced matmuls + "
                     "convolutions), "
                     f"{fmt(r['flops'] and r['flops'] / r['seconds'] / 1e12, '.3f')} TFLOP/s/device, "
                     f"MFU {fmt(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''}")
    elif r["compiled"]:
        parts.append(f"torch.compile ~{fmt(r['compile_s'], '.1f')} s (first step - median)")
    else:
        parts.append(f"{fmt(r['flops'] and r['flops'] / 1e12, '.3f')} TFLOP/step (FlopCounterMode: matmul/conv/"
                     "attention only)")
    memory = f"peak memory {fmt_bytes(r['memory'])} ({r['memory_kind']}"
    if "RSS" in r["memory_kind"]:
        memory += f"; max RSS {fmt_bytes(r['rss_baseline'])} after imports"
        if r.get("rss_setup"):
            memory += (f", {fmt_bytes(r['rss_setup'])} after set-up, {fmt_bytes(r['rss_compiled'])} after "
                       "compiling")
    parts.append(memory + ")")
    xla = r.get("xla_memory")
    if xla:
        parts.append(f"XLA buffers/device: arguments {fmt_bytes(xla['arguments'])}, temporaries "
                     f"{fmt_bytes(xla['temporaries'])}, outputs {fmt_bytes(xla['outputs'])}")
    parts.append(f"loss {r['loss']:.4g}")
    return ", ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("auto", *PRESETS), default="auto",
                        help="model sizes: sd14 (SD v1.4, 512 px, batch 8), cpu (same structure, reduced "
                             "widths: UNet (64, 128, 256, 256), CLIP 12 x 256, 256 px, batch 2), sdxl (SDXL 1.0 "
                             "base, 1024 px, batch 2) or tiny_sdxl (the tests' tiny SDXL, 64 px, batch 1); auto: "
                             "sd14 when JAX sees an accelerator, else cpu")
    add_comparison_arguments(parser, batch_help="per-device batch (default: the preset's, 8, 2, 2 or 1)",
                             steps_help="timed steps, median reported (default: 20 sd14, 5 cpu, 10 sdxl)",
                             warmup_help="untimed steps first (default: 5 sd14, 2 cpu, 3 sdxl)")
    parser.add_argument("--remat-unet", choices=("config", "on", "off"), default="config",
                        help="recompute UNet activations in the backward pass, both sides (config: "
                             "configs/f2d_sd14.py's train.remat_unet, which is on)")
    memory = parser.add_argument_group(
        "memory only", "compile ours' step from abstract parameters (none allocated) and print XLA's buffer "
        "assignment per device, e.g. SDXL over 8 simulated CPU devices: --preset sdxl --memory-only --devices 8 "
        "--fsdp 8 --batch 1")
    memory.add_argument("--memory-only", action="store_true", help="compile, do not run; nothing is timed")
    memory.add_argument("--devices", type=int,
                        help="compile for this many devices (on the CPU backend: simulated; default: all)")
    memory.add_argument("--fsdp", type=int, default=1,
                        help="the mesh's fsdp axis; above 1 the frozen parameters are sharded over it "
                             "(mesh.frozen=fsdp) (default: %(default)s)")
    args = parser.parse_args(argv)
    check_comparison_arguments(parser, args)
    if not args.memory_only and (args.devices or args.fsdp != 1):
        parser.error("--devices and --fsdp go with --memory-only")
    if args.memory_only:
        if args.preset == "auto":
            parser.error("--memory-only needs a --preset")
        args.batch = args.batch or PRESETS[args.preset]["batch"]
        result = memory_only(args)
        print(describe_memory(result))
        print(result_line(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    if args.worker:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        apply_preset(args, PRESETS, ACCELERATED, args.worker)
        result = jax_worker(args) if args.worker == "jax" else torch_worker(args)
        result.update(preset=args.preset)
        print(result_line(result), flush=True)
        return 0

    results, platform, skipped = [], None, []
    if not args.skip_jax:
        ours = measure("jax", args, [])
        if "failed" in ours:
            skipped.append(f"ours: {ours['failed']}")
            log(f"ours failed: {ours['failed']}")
        else:
            results.append(ours)
            platform, args.preset = ours["platform"], ours["preset"]
            log(describe(ours))
    apply_preset(args, PRESETS, ACCELERATED, "torch")   # (already resolved when ours ran)

    if not args.skip_torch:
        accelerated = platform not in (None, "cpu") or (platform is None and args.preset in ("sd14", "sdxl"))
        for label, r in run_torch_variants(args, accelerated, platform,
                                           lambda extra, env: measure("torch", args, extra, env)):
            if "failed" in r or "skipped" in r:
                skipped.append(f"{label}: {r.get('failed') or r.get('skipped')}")
                log(skipped[-1])
                continue
            results.append(r)
            log(describe(r))

    # ---- summary
    ours = next((r for r in results if r["framework"] == "jax"), None)
    print()
    print(f"preset {args.preset}: batch {args.batch}/device, {PRESETS[args.preset]['resolution']} px "
          f"({PRESETS[args.preset]['resolution'] // 8}x{PRESETS[args.preset]['resolution'] // 8}x4 latents), "
          f"median of {args.steps} steps after {args.warmup} warm-up; remat_unet={results[0]['remat_unet']}"
          if results else f"preset {args.preset}: nothing measured")
    for r in results:
        print(describe(r))
    if results:
        print("versions: " + "; ".join(dict.fromkeys(r["versions"] for r in results)))
    header = ("run", "dtype", "device", "img/s/device", "s/step", "compile s", "peak memory", "MFU",
              "ours/this")
    rows = []
    for r in results:
        ratio = None if ours is None else per_device(ours) / per_device(r)
        memory = f"{fmt_bytes(r['memory'])} ({'RSS' if 'RSS' in r['memory_kind'] else 'device'})"
        mfu = (f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a") if r["framework"] == "jax" else "-"
        rows.append((r["name"], r["dtype"], r["device"], f"{per_device(r):.2f}", f"{r['seconds']:.3f}",
                     fmt(r["compile_s"], ".1f", "-"), memory, mfu, fmt(ratio, ".2f", "-")))
    print_table(header, rows)
    if ours is not None:
        for r in results:
            if r is not ours:
                print(f"ratio ours / {r['name']} ({r['dtype']}): {per_device(ours) / per_device(r):.2f}x "
                      "images/s per device")
    for s in skipped:
        print(f"not measured: {s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "results": results, "skipped": skipped},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
