"""Process set-up around the training loop: the cheap checks, joining a multi-host job, the workdir's
lock, and one-line errors (exit status 2 for a user's mistake, 1 for a run that failed)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from f2d_jax import cli
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


def check_config(config) -> None:
    """The config values a run cannot start with, found before anything loads."""
    tc = config.train
    for key in ("steps", "batch_size"):
        if tc[key] < 1:
            raise ValueError(f"train.{key}={tc[key]}: it must be at least 1")
    if config.data.workers < 0:
        raise ValueError(f"data.workers={config.data.workers}: it must be at least 0 (0: one per CPU core)")
    if config.checkpoint.every < 1 or config.log.every < 1:
        raise ValueError(f"checkpoint.every={config.checkpoint.every} and log.every={config.log.every} must be at "
                         "least 1")


def run(config, workdir, compile_cache: str | None = None) -> int:
    """Train as `config` says (its `task`: Face2Diffusion or MSID pretraining) in `workdir`, holding the
    workdir's lock for the run's life (the primary process holds it), with JAX's persistent compilation
    cache as `compile_cache` says (f2d_jax/compile_cache.py). Returns the exit status: 0 when done (or
    already done), 143 after a SIGTERM checkpoint, 2 for a user error, 1 for a failed run."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        check_config(config)
        cli.check_output(workdir, "--workdir", folder=True)
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
            print(f"error: {cli.describe(e)}", file=sys.stderr)
            return FAILED

    return cli.run(body, interrupted="interrupted: the latest checkpoint is kept; run the same command to resume")
