"""Process set-up around the training loop: joining a multi-host job, and one-line errors."""
from __future__ import annotations

import logging
import os
import sys

import jax

from f2d_jax.convert import CheckpointMismatchError
from f2d_jax.models.stable_diffusion import UnsupportedConfigError
from f2d_jax.text import PromptError
from f2d_jax.workdir import CheckpointError
from f2d_jax.train.loop import TrainingError, train

USER_ERRORS = (TrainingError, CheckpointError, CheckpointMismatchError, UnsupportedConfigError, PromptError,
               FileNotFoundError, ValueError)


def _cluster_size() -> int:
    """Processes a scheduler started for this job (1 when none is detected)."""
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len(hosts.split(",")) if hosts else 1


def initialize_distributed() -> None:
    """jax.distributed.initialize() when this process is one of several; call before using JAX."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env or _cluster_size() > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only jobs; no effect otherwise
        explicit = "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env and "JAX_PROCESS_ID" in env
        if explicit:
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                       int(env["JAX_PROCESS_ID"]))
        else:
            jax.distributed.initialize()  # the scheduler's environment says the rest


def run(config, workdir) -> int:
    """train() (or config.task's trainer) with logging set up; user errors become one line on stderr and exit status 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    initialize_distributed()
    try:
        if config.get("task", "f2d") == "msid_arcface":
            from f2d_jax.pretrain import train_msid
            return train_msid(config, workdir)
        return train(config, workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
