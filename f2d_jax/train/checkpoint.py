"""Checkpoints of a training run: orbax, asynchronous, keep-N, restorable onto any mesh.

A checkpoint holds only what trains (the TrainState: trainable params, optimizer state, step)
and a JSON item with the data-iterator state and the config. The step's randomness and the
example order are functions of (seed, step), so this is the whole state of the run.
A checkpoint that cannot be restored stops the run with `CheckpointError`: never a silent
fresh start. Reading a finished run is f2d_jax/workdir.py's job.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from f2d_jax.workdir import CheckpointError, drop_closed_loop_reports, unreadable

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs routine events as warnings

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


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


class Checkpoints:
    """workdir/checkpoints/<step>/{state, meta}."""

    def __init__(self, workdir, keep: int):
        self.directory = Path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory.absolute(), options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        """Start an asynchronous save (all processes call it; orbax coordinates the writes)."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(_jsonable(meta))), force=True)

    def restore(self, step: int, abstract_state: Any, config: Mapping[str, Any]) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, placed as `abstract_state`'s shardings say."""
        where = self.directory / str(step)
        drop_closed_loop_reports()
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: what `restore` places a checkpoint onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
