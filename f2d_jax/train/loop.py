"""The training loop: one linear function from a config and a workdir to a trained mapping network.

Sections: set-up, mesh, models and data, state (resume or init), compiled step, loop
(metrics, checkpoints, sample images, preemption). Everything numeric runs in jitted
functions with explicit shardings; the host only feeds batches and reads metrics every
`log.every` steps.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from f2d_jax.bundle import Models, abstract_models, compute_dtype, load_models
from f2d_jax.compiled import TargetProgram, compile_counted
from f2d_jax.config import config_from_dict
from f2d_jax.data.synthetic import SyntheticFaces
from f2d_jax.models.stable_diffusion import alphas_cumprod
from f2d_jax.faces import msid_input
from f2d_jax.sampling import DDIM, decode_images, denoise
from f2d_jax.sampling.flow_match import flow_schedule
from f2d_jax.sampling.loop import flow_denoise
from f2d_jax.sampling.metadata import grid
from f2d_jax.sharding import batch_sharding, make_mesh, param_shardings, replicated
from f2d_jax.targets import on_mesh, platform
from f2d_jax.train.checkpoint import Checkpoints, TrainingError, abstract_like
from f2d_jax.data.loader import BatchLoader, loading_workers
from f2d_jax.train.inputs import FEATURES, encode_raw, latent_shape, prepared_has_features, training_data
from f2d_jax.train.metrics import MetricWriter, is_primary, mfu
from f2d_jax.params import merge, partition
from f2d_jax.train.state import TrainState, init_state, optimizer
from f2d_jax.train.step import Constants, StepConfig, train_step

log = logging.getLogger("f2d_jax.train")
PREEMPTED = 143  # exit status after a SIGTERM-triggered checkpoint (128 + SIGTERM)
STEP_MODELS = ("mapping", "text_encoder", "text_encoder_2", "unet", "transformer")


class Preemption:
    """Notices SIGTERM (single process: our handler; several: JAX's preemption sync point)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __call__(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(config, workdir) -> int:
    """Train as `config` says in `workdir`, resuming from its latest checkpoint.

    Returns 0 when done, PREEMPTED after SIGTERM (a checkpoint was written first).
    """
    workdir = Path(workdir)
    jax.config.update("jax_threefry_partitionable", True)  # random draws independent of the sharding
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if is_primary() else (lambda msg: None)
    tc = config.train

    # ------------------------------------------------------------------ mesh
    mesh = make_mesh(config.mesh)
    if tc.batch_size % mesh.size:
        raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of the {mesh.size} devices")
    say(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)")

    # ------------------------------------------------------------------ models and data
    dtype = compute_dtype(tc.compute_dtype, platform(mesh))
    models, variables, data = _models_and_data(config, dtype, say)
    program = step_program(config, models, variables, mesh)
    rep, batch_sh = replicated(mesh), batch_sharding(mesh)

    # ------------------------------------------------------------------ state: resume or init
    checkpoints = Checkpoints(workdir, config.checkpoint.keep)
    state, start = resume_or_init(checkpoints, program.abstract_state, program.init, config, say)
    if state is None:
        return 0

    # ------------------------------------------------------------------ the compiled step
    started = time.perf_counter()
    compiled, flops = program.compile(_feature_shapes(models, variables, data, tc.batch_size, batch_sh), mesh.size)
    say(f"compiled the train step in {time.perf_counter() - started:.1f} s")
    frozen, constants = program.frozen, program.constants
    encode = encoder_vars = None
    if not data.encoded:  # raw images: the frozen encoders turn each batch into features on the devices
        encoder_vars = jax.device_put({k: variables[k] for k in ("msid", "expression", "vae")}, rep)
        encode = jax.jit(on_mesh(functools.partial(encode_raw, models), mesh), in_shardings=(rep, batch_sh),
                         out_shardings=batch_sh)
    sampler = _sampler(config, models, variables, frozen, data, mesh) if config.log.sample_every else None

    # ------------------------------------------------------------------ loop
    def step_fn(state, batch):
        if encode is not None:
            batch = encode(encoder_vars, batch)
        return compiled(state, frozen, batch, constants)

    def sample(done, state):
        images, non_finite = sampler(state.params)
        path = writer.image(done, "samples", images)
        if path:
            say(f"step {done}: sample images {path}" + (f" ({non_finite} of them NaN or infinite: black)"
                                                         if non_finite else ""))

    writer = MetricWriter(workdir, enabled=is_primary(), start_step=start)
    loader = BatchLoader(data.source, tc.batch_size, config.seed, batch_sh, start_step=start, transform=data.transform,
                         workers=loading_workers(config.data.workers))
    status = run_loop(config, state, start, loader, step_fn, checkpoints, writer, flops=flops, say=say,
                      hooks=[(config.log.sample_every if sampler is not None else 0, sample)],
                      postfix=lambda m: dict(loss=f"{m['loss']:.4f}", fg=f"{m['loss_fg']:.4f}",
                                             bg=f"{m['loss_bg']:.4f}"))
    if status == 0:
        say(f"done: {tc.steps} steps; checkpoints in {checkpoints.directory}; export the mapping network with "
            f"`f2d-convert export {workdir} --out DIR`")
    return status


def resume_or_init(checkpoints: Checkpoints, abstract_state, init: Callable[[], Any], config, say):
    """(state, start step): the latest checkpoint restored onto `abstract_state`'s shardings, else
    init(); (None, step) when that checkpoint already completes config.train.steps (then closed)."""
    start = checkpoints.latest_step() or 0
    try:
        if start < config.train.steps:
            checkpoints.check_space(abstract_state)
        if start:
            state, _ = checkpoints.restore(start, abstract_state, config)
    except BaseException:
        checkpoints.close()
        raise
    if start:
        say(f"resumed from {checkpoints.directory / str(start)}")
    else:
        state = init()
    if start >= config.train.steps:
        say(f"already trained: checkpoint at step {start} >= train.steps={config.train.steps}")
        checkpoints.close()
        return None, start
    return state, start


def run_loop(config, state, start: int, loader, step_fn: Callable, checkpoints: Checkpoints, writer: MetricWriter,
             *, flops, say, postfix: Callable[[dict], dict],
             hooks: Sequence[tuple[int, Callable[[int, Any], None]]] = ()) -> int:
    """Steps start .. config.train.steps of `step_fn(state, batch) -> (state, metrics)` on the
    loader's batches: metrics every log.every steps (means; a non-finite loss stops the run),
    checkpoints every checkpoint.every steps, each hook (every, fn(step, state)) every `every`
    steps (0: never) and at the end, and a checkpoint then PREEMPTED on SIGTERM. Returns 0 when
    done; closes the loader, writer and checkpoints."""
    tc = config.train
    def meta(step):  # the data iterator's whole state is (seed, batch size, step): see data/loader.py
        return {"config": config.to_dict(), "data": {"seed": config.seed, "batch_size": tc.batch_size, "step": step}}

    bar = tqdm(total=tc.steps, initial=start, desc="train", disable=not is_primary(), dynamic_ncols=True)
    pending, last_time, last_step = [], time.perf_counter(), start
    try:
        with Preemption() as preemption:
            for step in range(start, tc.steps):
                _, batch = next(loader)
                with jax.transfer_guard("disallow"):  # every input is already on the devices
                    state, metrics = step_fn(state, batch)
                pending.append(metrics)
                done = step + 1
                bar.update(1)
                if done % config.log.every == 0 or done == tc.steps:
                    now = time.perf_counter()
                    scalars = _summarize(jax.device_get(pending), done)
                    seconds = (now - last_time) / (done - last_step)
                    scalars.update(step_time=seconds, examples_per_second=tc.batch_size / seconds,
                                   mfu=mfu(flops, seconds, jax.devices()[0]))
                    writer.scalars(done, scalars)
                    bar.set_postfix(**postfix(scalars))
                    pending, last_time, last_step = [], now, done
                save = done % config.checkpoint.every == 0 or done == tc.steps
                due = [fn for every, fn in hooks if every and (done % every == 0 or done == tc.steps)]
                if save or due:  # their time stays out of the step time
                    jax.block_until_ready(state.step)
                    paused = time.perf_counter()
                    if save:
                        checkpoints.save(done, state, meta(done))
                    for fn in due:
                        fn(done, state)
                    last_time += time.perf_counter() - paused
                if preemption(done):
                    if not save:  # else this step's checkpoint is already on its way
                        checkpoints.save(done, state, meta(done))
                    checkpoints.wait()
                    say(f"SIGTERM: saved checkpoint {checkpoints.directory / str(done)}; "
                        "run the same command to resume")
                    return PREEMPTED
    finally:
        loader.close()
        bar.close()
        writer.close()
        checkpoints.close()
    return 0


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """The jitted train step over a mesh, with its frozen parameters and constants already placed."""

    step: Any                      # jit(train_step): (state, frozen, batch, constants) -> (state, metrics)
    frozen: Any                    # the frozen parameters, sharded by config.mesh.frozen
    constants: Constants           # replicated
    abstract_state: Any            # the state's ShapeDtypeStructs with their shardings (for restore and lowering)
    init: Callable[[], TrainState] | None  # a fresh state on the mesh (None: an abstract program, to compile only)

    def compile(self, features: dict[str, jax.ShapeDtypeStruct], devices: int):
        """Ahead-of-time compile for a batch of these shapes (with shardings) over `devices`:
        (compiled step, its FLOPs per device)."""
        return compile_counted(self.step, self.abstract_state, self.frozen, features, self.constants, devices=devices)


def target_programs(config, devices, batch_per_device: int) -> list[TargetProgram]:
    """train.py's step over a mesh of `devices` (a compile target's: f2d_jax/targets.py) at `batch_per_device`
    examples per device, from abstract parameters (f2d_jax/compiled.py compiles it): the frozen models and the
    train state as config.mesh places them, the batch as cached features (a prepared dataset with
    --cache-features, or synthetic data)."""
    jax.config.update("jax_threefry_partitionable", True)  # as train()
    mesh = make_mesh(config.mesh, devices)
    config = config_from_dict(config.to_dict())
    config.train.batch_size = batch_per_device * mesh.size
    models, variables = abstract_models(config, compute_dtype(config.train.compute_dtype, platform(mesh)))
    program = step_program(config, models, variables, mesh, abstract=True)
    data = config.data
    example = SyntheticFaces(1, 1, models.encoders.mapping.identity_dim, models.encoders.mapping.expression_dim,
                             latent_shape(data.resolution, models.sd)).get([0])
    features = {k: jax.ShapeDtypeStruct((config.train.batch_size, *v.shape[1:]), v.dtype, sharding=batch_sharding(mesh))
                for k, v in example.items() if k in FEATURES}
    return [TargetProgram("train step", program.step, (program.abstract_state, program.frozen, features,
                                                       program.constants), batch_per_device, mesh)]


def step_config(config, models: Models) -> StepConfig:
    """The step's settings from `config` and the Stable Diffusion it trains against."""
    tc, sd = config.train, models.sd
    flux = sd.base == "flux"
    return StepConfig(config.seed, tc.cgdr_lambda, tc.p_uncond, tc.remat_unet, sd.vae_scaling_factor,
                      "flow" if flux else sd.scheduler_config.get("prediction_type", "epsilon"), sd.vae_shift_factor,
                      config.flux.train_guidance if flux else 1.0)


def step_function(config, models: Models) -> tuple[Callable, Any]:
    """(train_step with `config`'s optimizer and settings bound, (state, frozen, batch, constants) ->
    (state, metrics); the optimizer, to make the state)."""
    tx, schedule = optimizer(config.optim, config.train.steps)
    return functools.partial(train_step, models=models, tx=tx, schedule=schedule, cfg=step_config(config, models)), tx


def step_program(config, models: Models, variables, mesh, *, abstract: bool = False) -> StepProgram:
    """Split what trains from what is frozen, place both on `mesh` and jit the step with explicit
    shardings (batch over all devices, constants replicated, the state donated).

    With `abstract`, `variables` may be ShapeDtypeStructs and nothing is computed or placed: `frozen` and
    `constants` are ShapeDtypeStructs with their shardings, enough for `compile` (e.g. XLA's memory
    analysis of a model too large for this host), and `init` is None."""
    tc = config.train
    trainable, frozen = partition({k: variables[k] for k in STEP_MODELS if k in variables}, tc.trainable)
    step_fn, tx = step_function(config, models)
    frozen_shardings = param_shardings(frozen, mesh, config.mesh.frozen)
    rep, batch_sh = replicated(mesh), batch_sharding(mesh)
    make_state = functools.partial(init_state, tx=tx)
    abstract_state = jax.eval_shape(make_state, trainable)
    state_shardings = param_shardings(abstract_state, mesh, "replicate")
    step = jax.jit(on_mesh(step_fn, mesh), in_shardings=(state_shardings, frozen_shardings, batch_sh, rep),
                   out_shardings=(state_shardings, rep), donate_argnums=0)
    abstract_state = abstract_like(abstract_state, state_shardings)
    if abstract:
        constants = jax.eval_shape(functools.partial(step_constants, config, models), variables)
        return StepProgram(step, abstract_like(frozen, frozen_shardings),
                           abstract_like(constants, param_shardings(constants, mesh, "replicate")), abstract_state, None)
    return StepProgram(step, jax.device_put(frozen, frozen_shardings),
                       jax.device_put(step_constants(config, models, variables), rep), abstract_state,
                       lambda: jax.jit(make_state, out_shardings=state_shardings)(trainable))


def step_constants(config, models: Models, variables) -> Constants:
    """The step's constants: the training captions' ids and identifier positions, the class prompt's
    conditioning (through the frozen text encoders in `variables`), the noise schedule."""
    tc, sd = config.train, models.sd
    ids, positions = sd.prompt_ids(list(tc.prompts))
    class_conditioning = jax.jit(models.encoders.prompt_embeddings)(variables, sd.plain_ids([tc.class_prompt]))
    schedule = None if sd.base == "flux" else jnp.asarray(alphas_cumprod(sd.scheduler_config))
    return Constants(jax.tree.map(jnp.asarray, ids), jax.tree.map(jnp.asarray, positions), class_conditioning,
                     schedule)


def _models_and_data(config, dtype, say):
    """Load the models the data needs (the frozen encoders only for raw datasets), and the data."""
    needs_encoders = bool(config.data.dir) and not prepared_has_features(config.data.dir)
    # Every weights file the config names loads (checked) before Stable Diffusion, used or not.
    names = tuple(n for n in ("msid", "mapping", "expression") if needs_encoders or n == "mapping" or config.weights[n])
    models, variables = load_models(config, dtype, names, log=say)
    return models, variables, training_data(config, models)


def _feature_shapes(models: Models, variables, data, batch_size: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch as ShapeDtypeStructs (what the loader yields, after encoding raw data)."""
    example = {k: np.asarray(v[:1]) for k, v in data.holdout.items()}
    if not data.encoded:
        example = jax.eval_shape(lambda b: encode_raw(models, variables, b), example)
    return {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=sharding)
            for k, v in example.items() if k in FEATURES}


def _summarize(metrics: list[dict], step: int) -> dict[str, float]:
    """Means over the logging interval; stops the run on a non-finite loss or gradient."""
    finite = np.array([m["finite"] for m in metrics], bool)
    if not finite.all():
        bad = metrics[int(np.argmin(finite))]
        first = step - len(metrics) + int(np.argmin(finite)) + 1
        raise TrainingError(f"non-finite loss or gradient at step {first} (loss={float(bad['loss'])}, "
                            f"grad_norm={float(bad['grad_norm'])}, lr={float(bad['lr']):.3g}); that update was not "
                            "applied and training stopped. The last checkpoint is intact: lower optim.lr, set "
                            "optim.grad_clip, or use train.compute_dtype=float32, then rerun to resume.")
    return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0] if k != "finite"}


def _sampler(config, models: Models, variables, frozen, data, mesh):
    """A function trainable params -> a grid image of held-out faces x sample prompts (DDIM with classifier-free
    guidance; FLUX: Euler flow matching with the guidance embedding)."""
    lc, encoders, sd = config.log, models.encoders, models.sd
    holdout = {k: v[:lc.sample_faces] for k, v in data.holdout.items()}
    prompts = list(lc.sample_prompts)
    ids, positions = sd.prompt_ids(prompts)
    n_faces, n_prompts = len(next(iter(holdout.values()))), len(prompts)
    # Every (face, prompt) pair: faces vary along rows, prompts along columns.
    face_index = np.repeat(np.arange(n_faces), n_prompts)
    prompt_index = np.tile(np.arange(n_prompts), n_faces)
    rep = replicated(mesh)
    encoder_vars = {k: variables[k] for k in ("msid", "expression", "vae") if k in variables}  # frozen, as arguments
    size = config.data.resolution // sd.vae_scale_factor
    noise = jax.random.normal(jax.random.key(config.seed), (len(face_index), sd.latent_channels, size, size))
    constants = jax.device_put(dict(ids=jax.tree.map(lambda x: jnp.asarray(x[prompt_index]), ids),
                                    positions=jax.tree.map(lambda x: jnp.asarray(x[prompt_index]), positions),
                                    noise=noise, holdout=holdout, encoder_vars=encoder_vars), rep)
    if sd.base == "flux":   # the guidance embedding: no unconditional branch
        sigmas = flow_schedule(lc.sample_steps, (size // 2) ** 2, sd.scheduler_config)[1]
    else:
        scheduler = DDIM.create(sd.scheduler_config, lc.sample_steps)
        constants["uncond"] = jax.device_put(sd.plain_ids([""] * len(face_index)), rep)

    def sample(trainable, frozen, c):
        params = merge(trainable, frozen)
        identity = c["holdout"]["identity"] if data.encoded else \
            encoders.identity_features(c["encoder_vars"], msid_input(c["holdout"]["face"]))
        tokens = encoders.identity_tokens(params, identity[face_index])
        conditioning = encoders.prompt_embeddings(params, c["ids"], c["positions"], tokens)
        if sd.base == "flux":
            latents = flow_denoise(sd, params["transformer"], c["noise"], conditioning, sigmas, lc.sample_guidance)
        else:
            uncond = sd.negative_conditioning(encoders.prompt_embeddings(params, c["uncond"]), None)
            size = config.data.resolution
            latents = denoise(sd.unet, params["unet"], scheduler, c["noise"], sd.with_size(conditioning, size, size),
                              sd.with_size(uncond, size, size), lc.sample_guidance)
        return decode_images(sd.vae, c["encoder_vars"]["vae"], latents, sd.vae_scaling_factor)

    sample = jax.jit(on_mesh(sample, mesh), out_shardings=rep)

    def run(trainable):
        """(the grid image, how many of its pictures came out NaN or infinite)."""
        images, finite = jax.device_get(sample(trainable, frozen, constants))
        return grid(np.asarray(images), rows=n_faces), int(np.sum(~np.asarray(finite)))
    return run


