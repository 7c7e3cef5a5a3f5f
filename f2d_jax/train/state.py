"""The train state (only what trains) and the optimizer."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax



@flax.struct.dataclass
class TrainState:
    step: jax.Array     # int32 scalar: the number of updates applied
    params: Any         # the trainable parameters, as a sub-tree of the full parameter tree
    opt_state: Any


def learning_rate(optim: Mapping[str, Any], steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then constant, cosine decay to 0 at `steps`, or polynomial decay
    (lr * (1 - t / T) ** optim.power to 0 at `steps`, insightface's PolyScheduler)."""
    warmup = max(int(optim["warmup_steps"]), 0)
    if optim["schedule"] == "constant":
        after = optax.constant_schedule(optim["lr"])
    elif optim["schedule"] == "cosine":
        after = optax.cosine_decay_schedule(optim["lr"], max(steps - warmup, 1))
    elif optim["schedule"] == "polynomial":
        after = optax.polynomial_schedule(optim["lr"], 0.0, optim.get("power", 1.0), max(steps - warmup, 1))
    else:
        raise ValueError(f"optim.schedule={optim['schedule']!r}; use 'constant', 'cosine' or 'polynomial'")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim["lr"], warmup), after], [warmup])


def optimizer(optim: Mapping[str, Any], steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on the schedule above, after global-norm clipping (when optim.grad_clip > 0)."""
    schedule = learning_rate(optim, steps)
    adamw = optax.adamw(schedule, b1=optim["b1"], b2=optim["b2"], weight_decay=optim["weight_decay"])
    clip = [optax.clip_by_global_norm(optim["grad_clip"])] if optim["grad_clip"] > 0 else []
    return optax.chain(*clip, adamw), schedule


def apply_if_finite(state: TrainState, grads, finite, tx: optax.GradientTransformation,
                    finish: Callable[[Any], Any] = lambda params: params) -> TrainState:
    """The next state: `tx`'s update from `grads` (then `finish` on the new params) when `finite`,
    else the same params and optimizer state; the step counts either way. A branch, not a select
    of old and new, so that the update writes the donated state in place instead of holding a
    second copy of it (for MSID pretraining: of the classifier and its moments)."""
    def update(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return finish(optax.apply_updates(state.params, updates)), opt_state

    params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state)


def init_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """A fresh state owning copies of `params` (the step donates its state's buffers)."""
    params = jax.tree.map(jnp.array, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
