"""Checkpoints of a training run: orbax, asynchronous, keep-N, restorable onto any mesh.

A checkpoint holds only what trains (the TrainState: trainable params, optimizer state, step)
and a JSON item with the data-iterator state and the config. The step's randomness and the
example order are functions of (seed, step), so this is the whole state of the run.
A checkpoint that cannot be restored stops the run with `CheckpointError`: never a silent
fresh start. Reading a finished run is f2d_jax/workdir.py's job.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from f2d_jax.workdir import CheckpointError, drop_closed_loop_reports, unreadable

# Config fields a resumed run must share with the checkpoint (the model, what trains, and
# everything that decides which examples each step sees).
RESUME_KEYS = ("model", "train.trainable", "train.batch_size", "train.prompts", "seed", "data.dir",
               "data.synthetic_identities", "data.synthetic_examples")
# ... except these, which change how the same function is computed, not what is trained.
FREE_KEYS = {"model.attention"}


def _get(config: Mapping[str, Any], dotted: str):
    for name in dotted.split("."):
        config = config.get(name) if isinstance(config, Mapping) else None
    return config


def _leaves(value, prefix: str) -> dict[str, Any]:
    """{dotted key: value} of the leaves of nested dicts."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    return {k: v for name, child in value.items() for k, v in _leaves(child, f"{prefix}.{name}").items()}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], keys=RESUME_KEYS) -> list[str]:
    """`key: before -> now` for each leaf under `keys` where the two configs differ."""
    changes = []
    for key in keys:
        before, now = _leaves(_get(saved, key), key), _leaves(_get(current, key), key)
        changes += [f"{k}: {before.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
                    for k in sorted(before.keys() | now.keys())
                    if before.get(k) != now.get(k) and k not in FREE_KEYS]
    return changes


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be written); the message says why
    and what to try."""


@contextlib.contextmanager
def _written(step: int, directory: Path):
    """orbax's errors writing checkpoint `step` become one TrainingError."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (whatever the writer raised: a full disk, a lost mount, ...)
        text = str(e)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in text
        why = "the disk is full" if full else f"{type(e).__name__}: {(text.splitlines() or [''])[0][:200]}"
        raise TrainingError(f"checkpoint {step} could not be written in {directory} ({why}); the checkpoints "
                            "before it are intact: fix that, then run the same command to resume") from None


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


class Checkpoints:
    """workdir/checkpoints/<step>/{state, meta}. A checkpoint that cannot be written (a full disk) stops
    the run with one TrainingError; orbax's own reports of it (logged errors and tracebacks from its
    threads) are silenced."""

    def __init__(self, workdir, keep: int):
        self.directory = Path(workdir) / "checkpoints"
        self.keep = keep
        self._step = None  # the latest save started
        drop_closed_loop_reports()
        logging.getLogger("absl").setLevel(logging.CRITICAL)  # errors reach us as exceptions
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_space(self, abstract_state: Any) -> None:
        """A ValueError unless the disk has room for the checkpoints this run keeps (`keep`, and the one
        being written), each the size of `abstract_state`."""
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
        need, free = (self.keep + 1) * size, shutil.disk_usage(self.directory).free
        if free < need:
            raise ValueError(f"{self.directory} has {free / 2**20:.1f} MiB free; the checkpoints need about "
                             f"{need / 2**20:.1f} MiB ({self.keep} kept and one being written, {size / 2**20:.1f} "
                             "MiB each): free some space, lower checkpoint.keep or choose another --workdir")

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Start an asynchronous save (all processes call it; orbax coordinates the writes)."""
        with _written(self._step or step, self.directory):  # an earlier save's failure surfaces here
            self.manager.wait_until_finished()
        self._step = step
        with _written(step, self.directory):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(_jsonable(meta))), force=True)

    def restore(self, step: int, abstract_state: Any, config: Mapping[str, Any]) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, placed as `abstract_state`'s shardings say."""
        where = self.directory / str(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise unreadable(where, e) from None
        current = _jsonable(config.to_dict() if hasattr(config, "to_dict") else dict(config))
        changes = config_changes(meta.get("config", {}), current)
        if changes:
            raise CheckpointError(f"checkpoint {where} was written with a different config ("
                                  f"{'; '.join(changes)}); resume with the same values or start in a new --workdir")
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state
        except Exception as e:
            raise unreadable(where, e) from None
        return state, meta

    def wait(self) -> None:
        with _written(self._step, self.directory):
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: what `restore` places a checkpoint onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
