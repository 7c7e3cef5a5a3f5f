"""Checkpoints of a training run: orbax, asynchronous, keep-N, restorable onto any mesh.

A checkpoint holds only what trains (the TrainState: trainable params, optimizer state, step)
and a JSON item with the data-iterator state and the config. The step's randomness and the
example order are functions of (seed, step), so this is the whole state of the run.
A checkpoint that cannot be restored stops the run with `CheckpointError`: never a silent
fresh start.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs routine events as warnings

# Config fields a resumed run must share with the checkpoint (the model, what trains, and
# everything that decides which examples each step sees).
RESUME_KEYS = ("model", "train.trainable", "train.batch_size", "train.prompts", "seed", "data.dir",
               "data.synthetic_identities", "data.synthetic_examples")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, or from an incompatible config."""


def _get(config: Mapping[str, Any], dotted: str):
    for name in dotted.split("."):
        config = config.get(name) if isinstance(config, Mapping) else None
    return config


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
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} cannot be read ({type(e).__name__}: {e}); it is corrupt or "
                                  "incomplete: move it away to resume from an earlier one") from e
        saved = meta.get("config", {})
        current = _jsonable(config.to_dict() if hasattr(config, "to_dict") else dict(config))
        changed = [k for k in RESUME_KEYS if _get(saved, k) != _get(current, k)]
        if changed:
            details = "; ".join(f"{k}: {_get(saved, k)!r} -> {_get(current, k)!r}" for k in changed)
            raise CheckpointError(f"checkpoint {where} was written with a different config ({details}); "
                                  "resume with the same values or start in a new --workdir")
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state))).state
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} cannot be restored ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:500]}); move it away to resume from an earlier one "
                                  "or start in a new --workdir") from e
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings: what `restore` places a checkpoint onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def is_workdir(path) -> bool:
    """Whether `path` is a train.py workdir (it has a checkpoints folder)."""
    return (Path(path) / "checkpoints").is_dir()


def load_trained(workdir, step: int | None = None) -> tuple[dict, Any, int]:
    """(config dict, trainable params as numpy, step) of a run's checkpoint (default: the latest),
    on any machine: arrays are restored to the host, whatever mesh wrote them."""
    checkpoints = Checkpoints(workdir, keep=None)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
        meta = checkpoints.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        metadata = ocp.StandardCheckpointer().metadata(checkpoints.directory / str(step) / "state").item_metadata
        device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        state = checkpoints.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state
    except FileNotFoundError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {checkpoints.directory / str(step)} cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
    finally:
        checkpoints.close()
    return meta["config"], jax.device_get(state["params"]), step


def load_trained_models(workdir, step: int | None = None) -> dict[str, tuple[Any, Any]]:
    """{name: (Flax module, variables)} for the Face2Diffusion models a run trained (the mapping
    network; the others it may train are not Face2Diffusion checkpoints), ready for `convert.save`."""
    from f2d_jax.convert.weights_dir import module_from_config

    config, params, _ = load_trained(workdir, step)
    return {name: (module_from_config(name, config["model"][name]), variables)
            for name, variables in params.items() if name in ("msid", "mapping", "expression")}
