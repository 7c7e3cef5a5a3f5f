"""Parameter trees: split by a path pattern into what trains and what stays frozen, and merge back."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import traverse_util


def partition(params: Mapping[str, Any], pattern: str) -> tuple[dict, dict]:
    """(trainable, frozen) sub-trees: leaves whose "a/b/c" path matches `pattern` train."""
    regex = re.compile(pattern)
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    trainable = {k: v for k, v in flat.items() if regex.search(k)}
    if not trainable:
        raise ValueError(f"train.trainable={pattern!r} matches no parameter; paths look like "
                         f"{', '.join(sorted(flat)[:3])}")
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return (traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/"))


def merge(*trees: Mapping[str, Any]) -> dict:
    """The union of disjoint sub-trees (the inverse of `partition`)."""
    flat = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(dict(tree), sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def with_trained(variables: Mapping[str, Any], trained: Mapping[str, Any]) -> dict:
    """`variables` with the `trained` leaves (a sub-tree of it, as a checkpoint holds them) in their place,
    in the dtypes of the leaves they replace."""
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    new = traverse_util.flatten_dict(dict(trained), sep="/")
    return traverse_util.unflatten_dict({**flat, **{k: jnp.asarray(v, flat[k].dtype) for k, v in new.items()}}, sep="/")
