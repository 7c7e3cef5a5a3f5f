"""The MSID pretraining loop (config.task = "msid_arcface"): ArcFace on identity-labelled faces.

The machinery is Face2Diffusion training's (f2d_jax/train): the mesh, the data loader, orbax
checkpoints with resume, metrics, SIGTERM handling and the non-finite stop. What differs is
the state: the whole MSID (params and BatchNorm running statistics) and the classifier, its
rows (identities) split over every device (f2d_jax/arcface.py), plus periodic verification
accuracy (insightface's 10-fold protocol) on pair sets.

The checkpoint's params are {"msid": variables, "classifier": W}, so
`python -m f2d_jax.convert export WORKDIR --out DIR` writes DIR/msid.pt in the official layout.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from f2d_jax.arcface import init_weight, weight_sharding
from f2d_jax.bundle import compute_dtype
from f2d_jax.compiled import TargetProgram, compile_counted
from f2d_jax.data.loader import BatchLoader, loading_workers
from f2d_jax.data.verification import verification_accuracy
from f2d_jax.models.msid import MSIDEncoder
from f2d_jax.pretrain.data import SIZE, training_source, verification_sets
from f2d_jax.pretrain.step import ArcFaceConfig, embed, train_step, with_frozen_stats
from f2d_jax.sharding import AXES, batch_sharding, make_mesh, param_shardings, replicated
from f2d_jax.targets import on_mesh, platform
from f2d_jax.train.checkpoint import Checkpoints, abstract_like
from f2d_jax.train.loop import resume_or_init, run_loop
from f2d_jax.train.metrics import MetricWriter, is_primary
from f2d_jax.train.state import TrainState, init_state, optimizer


def padded_classes(num_identities: int, shards: int) -> int:
    """Classifier rows: num_identities rounded up to a multiple of the class shards (the extra
    rows are identities no example has: negatives only)."""
    return shards * math.ceil(num_identities / shards)


def in_classifier(path) -> bool:
    """Whether a state leaf's key path is the classifier or one of its optimizer moments."""
    return any(getattr(k, "key", None) == "classifier" for k in path)


@dataclasses.dataclass(frozen=True)
class Program:
    """The jitted step and embedding function over a mesh, with the state's abstract shapes."""

    step: Any                       # jit(train_step): (state, batch) -> (state, metrics)
    embed: Any                      # jit(embed): (msid variables, uint8 images) -> (B, D) replicated
    abstract_state: Any             # ShapeDtypeStructs with shardings (restore and lowering)
    init: Callable[[], TrainState]  # a fresh state on the mesh

    @staticmethod
    def batch(batch_size: int, sharding) -> dict[str, jax.ShapeDtypeStruct]:
        """The step's batch of `batch_size` examples laid out by `sharding`, as ShapeDtypeStructs."""
        return {"image": jax.ShapeDtypeStruct((batch_size, SIZE, SIZE, 3), jnp.uint8, sharding=sharding),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding)}

    def compile(self, batch_size: int, sharding, devices: int):
        """(The step compiled for `batch_size` examples over `devices`, its FLOPs per device.)"""
        return compile_counted(self.step, self.abstract_state, self.batch(batch_size, sharding), devices=devices)


def program(config, mesh) -> Program:
    """The model, optimizer and shardings: MSID by config.mesh.params ("replicate" / "fsdp"), the
    classifier and its optimizer moments split by identity over every device, the batch over every
    device; the state is donated."""
    tc, ac = config.train, config.arcface
    model = MSIDEncoder(**config.model.msid, dtype=compute_dtype(tc.compute_dtype, platform(mesh)),
                        attention=config.model.get("attention", "auto"))
    tx, schedule = optimizer(config.optim, tc.steps)
    tx = with_frozen_stats(tx)
    classes = padded_classes(ac.num_identities, mesh.size)

    def make_state():
        msid_key, head_key = jax.random.split(jax.random.key(config.seed))
        msid = model.init(msid_key, jnp.zeros((1, SIZE, SIZE, 3), jnp.float32))
        classifier = init_weight(head_key, classes, model.features, mesh, AXES, std=ac.init_std)
        return init_state({"msid": msid, "classifier": classifier}, tx)

    abstract = jax.eval_shape(make_state)
    rows = weight_sharding(mesh, AXES)
    shardings = jax.tree_util.tree_map_with_path(
        lambda path, x, s: rows if in_classifier(path) and x.ndim == 2 else s,
        abstract, param_shardings(abstract, mesh, config.mesh.params))
    rep, batch_sh = replicated(mesh), batch_sharding(mesh)
    cfg = ArcFaceConfig(config.seed, tuple(ac.margins), ac.scale, ac.sample_rate, config.data.flip)
    step_fn = functools.partial(train_step, model=model, mesh=mesh, tx=tx, schedule=schedule, cfg=cfg)
    step = jax.jit(on_mesh(step_fn, mesh), in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep),
                   donate_argnums=0)
    embed_fn = jax.jit(on_mesh(functools.partial(embed, model=model), mesh),
                       in_shardings=(shardings.params["msid"], batch_sh), out_shardings=rep)
    return Program(step, embed_fn, abstract_like(abstract, shardings),
                   lambda: jax.jit(make_state, out_shardings=shardings)())


def target_programs(config, devices, batch_per_device: int) -> list[TargetProgram]:
    """MSID pretraining's step over a mesh of `devices` (a compile target's) at `batch_per_device` images per
    device, from abstract parameters: the classifier of arcface.num_identities rows split over every device."""
    if config.arcface.num_identities < 1:
        raise ValueError("compiling MSID pretraining for a target needs the classifier's size: set "
                         "--config.arcface.num_identities (MS1MV3: 93431, WebFace42M: 2059906)")
    jax.config.update("jax_threefry_partitionable", True)  # as train_msid()
    mesh = make_mesh(config.mesh, devices)
    prog = program(config, mesh)
    batch = Program.batch(batch_per_device * mesh.size, batch_sharding(mesh))
    return [TargetProgram("MSID ArcFace step", prog.step, (prog.abstract_state, batch), batch_per_device, mesh)]


def embeddings(embed_fn, variables, images: np.ndarray, batch_size: int, sharding) -> np.ndarray:
    """embed_fn(variables, batch) over `images` in batches of `batch_size` (the last one padded) laid
    out by `sharding`; (N, D) numpy."""
    out = []
    for lo in range(0, len(images), batch_size):
        chunk = images[lo:lo + batch_size]
        full = np.zeros((batch_size, *chunk.shape[1:]), chunk.dtype)
        full[:len(chunk)] = chunk
        array = jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])
        out.append(np.asarray(jax.device_get(embed_fn(variables, array)))[:len(chunk)])
    return np.concatenate(out)


def verifier(sets: dict, embed_fn, batch_size: int, sharding) -> Callable[[Any], dict[str, float]]:
    """msid variables -> {"verification/<name>": 10-fold accuracy, ".../<name>_std": its std}."""
    def run(variables):
        scalars = {}
        for name, (images, issame) in sets.items():
            e = embeddings(embed_fn, variables, images, batch_size, sharding)
            result = verification_accuracy(e[0::2], e[1::2], issame)
            scalars[f"verification/{name}"] = result["accuracy_mean"]
            scalars[f"verification/{name}_std"] = result["accuracy_std"]
        return scalars
    return run


def train_msid(config, workdir) -> int:
    """Pretrain MSID as `config` says in `workdir`, resuming from its latest checkpoint.

    Returns 0 when done, train.loop.PREEMPTED after SIGTERM (a checkpoint was written first).
    """
    workdir = Path(workdir)
    jax.config.update("jax_threefry_partitionable", True)
    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if is_primary() else (lambda msg: None)
    tc, lc = config.train, config.log

    mesh = make_mesh(config.mesh)
    if tc.batch_size % mesh.size or lc.verify_batch_size % mesh.size:
        raise ValueError(f"train.batch_size={tc.batch_size} and log.verify_batch_size={lc.verify_batch_size} "
                         f"must be multiples of the {mesh.size} devices")
    say(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)")
    source, config = training_source(config)
    prog = program(config, mesh)
    batch_sh = batch_sharding(mesh)
    verify = verifier(verification_sets(config, source), prog.embed, lc.verify_batch_size, batch_sh)

    checkpoints = Checkpoints(workdir, config.checkpoint.keep)
    state, start = resume_or_init(checkpoints, prog.abstract_state, prog.init, config, say)
    if state is None:
        return 0

    started = time.perf_counter()
    compiled, flops = prog.compile(tc.batch_size, batch_sh, mesh.size)
    say(f"compiled the train step in {time.perf_counter() - started:.1f} s")

    writer = MetricWriter(workdir, enabled=is_primary(), start_step=start)
    def check(done, state):
        results = verify(state.params["msid"])
        writer.scalars(done, results)
        say(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items() if not k.endswith("_std")))

    loader = BatchLoader(source, tc.batch_size, config.seed, batch_sh, start_step=start,
                         workers=loading_workers(config.data.workers))
    status = run_loop(config, state, start, loader, compiled, checkpoints, writer, flops=flops,
                      say=say, hooks=[(lc.verify_every, check)],
                      postfix=lambda m: dict(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.3f}"))
    if status == 0:
        say(f"done: {tc.steps} steps; checkpoints in {checkpoints.directory}; export MSID (msid.pt) with "
            f"`f2d-convert export {workdir} --out DIR`")
    return status
