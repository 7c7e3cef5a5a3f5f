"""A training run's folder (a train.py workdir): reading what it trained, on any machine and without
writing there, and the lock a running train.py holds on it.

    WORKDIR/checkpoints/<step>/{state,meta}   orbax checkpoints (f2d_jax/train/checkpoint.py writes them)
    WORKDIR/metrics.jsonl, tensorboard/, samples/
    WORKDIR/run.lock                          held by the train.py that runs in WORKDIR

Sampling, evaluation and conversion read runs through this module; none of them imports the
training package.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

LOCK_FILE = "run.lock"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, or from an incompatible config."""


class WorkdirError(ValueError):
    """A workdir in use by another run."""


def is_workdir(path) -> bool:
    """Whether `path` is a train.py workdir (it has a checkpoints folder)."""
    return (Path(path) / "checkpoints").is_dir()


def task(config: dict) -> str:
    """What a run trains: "f2d" (the mapping network) or "msid_arcface" (MSID pretraining)."""
    return config.get("task", "f2d")


def check_f2d_run(workdir, config: dict) -> None:
    """A CheckpointError, saying what to do instead, for a run that trained no mapping network (MSID pretraining)."""
    if task(config) != "f2d":
        raise CheckpointError(f"{workdir} is an MSID pretraining run (task {task(config)}): it holds MSID weights, not "
                              f"a mapping network. Export them with `f2d-convert export {workdir} --out DIR` and give "
                              "DIR/msid.pt as --msid (msid=, weights.msid) with the mapping network's weights")


def _manager(workdir):
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs routine events as warnings

    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{workdir} is not a train.py workdir (no checkpoints folder in it)")
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "meta"))


def _read(workdir, step: int | None, arrays: bool) -> tuple[dict, Any, int]:
    """(config dict, state or None, step) of checkpoint `step` (default: the latest); the state's
    arrays come to the host whatever mesh wrote them. Nothing is written."""
    import jax
    import orbax.checkpoint as ocp

    drop_closed_loop_reports()
    manager = _manager(workdir)
    try:
        available = sorted(manager.all_steps())
        if not available:
            raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'} yet")
        step = available[-1] if step is None else step
        if step not in available:
            raise FileNotFoundError(f"no checkpoint at step {step} in {Path(workdir) / 'checkpoints'}; available: "
                                    f"{', '.join(map(str, available))}")
        where = Path(workdir) / "checkpoints" / str(step)
        state = None
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            if arrays:
                metadata = ocp.StandardCheckpointer().metadata(where / "state").item_metadata
                device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
                abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
                state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
        except Exception as e:
            raise unreadable(where, e) from None
    finally:
        manager.close()
    return meta["config"], state, step


def load_trained(workdir, step: int | None = None) -> tuple[dict, Any, int]:
    """(config dict, trainable params as numpy, step) of a run's checkpoint (default: the latest)."""
    import jax

    config, state, step = _read(workdir, step, arrays=True)
    return config, jax.device_get(state["params"]), step


def trained_config(workdir, step: int | None = None) -> tuple[dict, int]:
    """(config dict, step) of a run's checkpoint (default: the latest), reading its metadata only."""
    config, _, step = _read(workdir, step, arrays=False)
    return config, step


def unreadable(where: Path, e: BaseException) -> CheckpointError:
    """The error for a checkpoint that orbax cannot read."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". See ")[0][:200]
    return CheckpointError(f"checkpoint {where} cannot be read ({type(e).__name__}: {first}); it is corrupt or "
                           f"incomplete: move it out of {where.parent} to use an earlier one")


def drop_closed_loop_reports() -> None:
    """From here on, drop the "Event loop is closed" errors that orbax's reads in flight report as
    unraisable when a restore fails and its event loop is gone (tracebacks that add nothing to the
    restore's own error); every other unraisable error is still reported. Call before restoring."""
    if getattr(sys.unraisablehook, "drops_closed_loop_reports", False):
        return
    report = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            report(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


def load_trained_models(workdir, step: int | None = None) -> dict[str, tuple[Any, Any]]:
    """{name: (Flax module, variables)} for the Face2Diffusion models a run trained (the mapping
    network, or MSID in pretraining), ready for `convert.save`."""
    from f2d_jax.convert.weights_dir import module_from_config

    config, params, _ = load_trained(workdir, step)
    return {name: (module_from_config(name, config["model"][name]), variables)
            for name, variables in params.items() if name in ("msid", "mapping", "expression")}


class RunLock:
    """An exclusive lock on a workdir for the life of a run (`with RunLock(workdir):`).

    An flock on WORKDIR/run.lock: the operating system releases it whenever the process ends, a
    crash included. The file names the holder; a file left by a run that is gone is taken over
    and reported through `say`."""

    def __init__(self, workdir, say=lambda msg: None):
        self.path = Path(workdir) / LOCK_FILE
        self.say = say
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            file = open(self.path, "a+")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.seek(0)
                holder = _holder(file.read())
                file.close()
                raise WorkdirError(f"{self.path.parent} is in use by another training run ({holder}); wait for "
                                   "it to end, or use another --workdir") from None
            if _same_file(file, self.path):  # not unlinked by a run that ended meanwhile
                break
            file.close()
        file.seek(0)
        left = file.read()
        if left.strip():
            self.say(f"note: {self.path} was left by a run that is no longer running ({_holder(left)}): it crashed "
                     "or was killed; resuming from the latest checkpoint")
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        self._file.close()  # releases the flock
        self._file = None


def _same_file(file, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
