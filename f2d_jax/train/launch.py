"""Process set-up around the training loop: the cheap checks, joining a multi-host job, the workdir's
lock, and one-line errors (exit status 2 for a user's mistake, 1 for a run that failed)."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

from f2d_jax import usage
from f2d_jax.compile_cache import enable
from f2d_jax.workdir import RunLock, task

FAILED = 1


def _cluster_size() -> int:
    """Processes a scheduler started for this job (1 when none is detected)."""
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len(hosts.split(",")) if hosts else 1


def initialize_distributed() -> None:
    """jax.distributed.initialize() when this process is one of several; call before using JAX."""
    import jax

    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env or _cluster_size() > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only jobs; no effect otherwise
        explicit = "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env
        if explicit:
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                       int(env["JAX_PROCESS_ID"]))
        else:
            jax.distributed.initialize()  # the scheduler's environment says the rest


def check_run(config, workdir) -> None:
    """What a run cannot start with, found before anything loads (the config's own ranges were checked
    when it loaded): a workdir that cannot be written or named in a checkpoint, an image size the model
    cannot take, a weights path where there is nothing."""
    usage.check_output(workdir, "--workdir", folder=True)
    try:
        os.fsdecode(os.fsencode(workdir)).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"--workdir {os.fsdecode(os.fsencode(workdir))!r}: its name is not valid UTF-8, which "
                         "the checkpoints cannot record; choose another name") from None
    if task(config) != "f2d":
        return
    from f2d_jax.bundle import size_multiple

    multiple = size_multiple(config)
    if config.data.resolution % multiple:
        raise ValueError(f"data.resolution={config.data.resolution}: it must be a multiple of {multiple} for this "
                         f"Stable Diffusion ({config.weights.sd or 'the tiny random one'})")
    for name in ("msid", "mapping", "expression"):
        path = config.weights[name]
        if path and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"weights.{name}: no weight file at {path}")


def compile_for_target(config, args) -> int:
    """f2d-train --target: the training step (Face2Diffusion's or MSID pretraining's) compiled for the
    target's chips at train.batch_size over its devices, or (--fit) the largest batch per device that fits."""
    from f2d_jax import targets

    target = targets.parse(args.target)
    if not args.fit and config.train.batch_size % target.num_devices:
        raise ValueError(f"train.batch_size={config.train.batch_size} is not a multiple of the {target.num_devices} "
                         f"devices of {target.name}: set --config.train.batch_size (batch per device x "
                         f"{target.num_devices}) or pass --fit")
    if task(config) == "msid_arcface":
        from f2d_jax.pretrain.loop import target_programs
    else:
        from f2d_jax.train.loop import target_programs
    return usage.compile_for_target(args, functools.partial(target_programs, config),
                                    max(1, config.train.batch_size // target.num_devices))


def run(config, workdir, compile_cache: str | None = None) -> int:
    """Train as `config` says (its `task`: Face2Diffusion or MSID pretraining) in `workdir`, holding the
    workdir's lock for the run's life (the primary process holds it), with JAX's persistent compilation
    cache as `compile_cache` says (f2d_jax/compile_cache.py). Returns the exit status: 0 when done (or
    already done), 143 after a SIGTERM checkpoint, 2 for a user error, 1 for a failed run."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        check_run(config, workdir)
        path = Path(workdir)
        enable(compile_cache)
        initialize_distributed()
        import jax

        from f2d_jax.train.loop import TrainingError, train
        if task(config) == "msid_arcface":
            from f2d_jax.pretrain import train_msid as train
        say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        try:
            if jax.process_index() != 0:
                return train(config, path)
            with RunLock(path, say):
                return train(config, path)
        except TrainingError as e:
            print(f"error: {usage.describe(e)}", file=sys.stderr)
            return FAILED

    new = not os.path.lexists(workdir)
    status = usage.run(body, interrupted="interrupted: the latest checkpoint is kept; run the same command to resume")
    if status and new:
        _remove_if_unused(Path(workdir))
    return status


def _remove_if_unused(workdir: Path) -> None:
    """Remove a workdir this run made and wrote no file in (it stopped before the first checkpoint or metric)."""
    if workdir.is_dir() and not any(p.is_file() or p.is_symlink() for p in workdir.rglob("*")):
        shutil.rmtree(workdir, ignore_errors=True)
