"""Margin-based softmax heads (ArcFace, CosFace, combined) with the classifier sharded by identity.

The combined margin of insightface's `margin_list=(m1, m2, m3)` replaces the target class's
cosine, and only that one, before scaling by s:

    target = cos(m1 * theta + m2) - m3,   theta = arccos(cos)      (other classes: cos)
    ArcFace = (1.0, 0.5, 0.0), CosFace = (1.0, 0.0, 0.4), s = 64

on L2-normalized embeddings and L2-normalized class centres (weight rows).

What is computed, checked against insightface `recognition/arcface_torch/losses.py`
(`CombinedMarginLoss`) and `partial_fc_v2.py`:

* Forward: exactly the formula above, with cos clipped to [-1 + eps, 1 - eps] before arccos.
  insightface's current `CombinedMarginLoss` has no threshold for theta + m2 > pi (the older
  `ArcFace` class fell back to `cos - m2 sin m2` there; its `theta`/`sinmm` fields are still
  computed but unused), so neither is there one here. For m3 > 0 insightface applies only `- m3`
  (it ignores m1 and m2); here the whole formula is applied, which is the same for CosFace.
* Backward: insightface computes arccos -> +m2 -> cos under `torch.no_grad()`, so the gradient
  of the target logit w.r.t. its cosine is s (as if the margin were a constant offset).
  `straight_through=True` (the default) does the same; `straight_through=False` differentiates
  the formula exactly (d/dcos = m1 sin(m1 theta + m2) / sin(theta), large as theta -> 0).
  For CosFace both are the same.
* The cross-entropy is the mean over the batch of logsumexp(logits) - target logit.

Sharded head (`sharded_margin_loss`): the weight (C, D) is split along C over `class_axis`; every
device computes cosines of the embeddings it sees against its own C / n classes, the softmax
normalizer is combined with `lax.pmax` (the max, no gradient) and `lax.psum` (the sum of exps),
and the target logit is computed only on the shard that owns the label (a row gather, not a
column of the logits) and `psum`-ed. Nothing of size (B, C) or (C, D) is ever gathered.
Where the batch is split over an axis that also splits the classes (insightface: every GPU holds
C / N classes and its own slice of the batch), the embeddings and labels are all-gathered over
that axis first, so every class shard sees the whole batch; over a batch axis that does not split
the classes (a ("data", "model") mesh, batch over "data", classes over "model") nothing is
gathered: the devices of one "model" column hold the same classes, each scores its own batch
slice, and shard_map sums the weight gradient over "data".

Partial FC (`sample_rate` < 1): each class shard scores only num_sampled = ceil(rate * C / n)
of its classes: the positive classes of the global batch first, then random others (a static
count, so shapes are static). Only sampled rows get a gradient, except that a sample's target
row is always scored (by the row gather) even in the rare case that a shard owns more positive
classes than num_sampled and some of them are left out as negatives for the other samples.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.4)

Axes = str | Sequence[str] | None


def _target_margin(cos, margins, straight_through: bool, eps: float):
    """cos(m1 arccos(cos) + m2) - m3 elementwise (float32), see the module docstring."""
    m1, m2, m3 = (float(m) for m in margins)
    cos = cos.astype(jnp.float32)
    if m1 == 1.0 and m2 == 0.0:
        return cos - m3  # CosFace (or plain softmax): no arccos
    theta = jnp.arccos(jnp.clip(cos, -1.0 + eps, 1.0 - eps))
    target = jnp.cos(m1 * theta + m2) - m3
    if straight_through:
        target = cos + lax.stop_gradient(target - cos)
    return target


def margin_logits(cosine, target, margins=ARCFACE, scale: float = 64.0, *, straight_through: bool = True,
                  eps: float = 1e-7):
    """scale * logits with the combined margin applied where `target` is set (float32).

    cosine: (..., C) cosines in [-1, 1]; target: the same shape, a boolean mask or a one-hot
    (non-zero = the target class); margins: (m1, m2, m3).
    """
    target_cos = _target_margin(cosine, margins, straight_through, eps)
    return scale * jnp.where(target.astype(bool), target_cos, cosine.astype(jnp.float32))


def _unit(x, axis=-1):
    """x / max(|x|, 1e-12) as in torch.nn.functional.normalize, norm in float32."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, 1e-12).astype(x.dtype)


def _inverse_norm(w):
    return 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=-1)), 1e-12)


def _shard_losses(emb, labels, weight, offset, rows, reduce_max: Callable, reduce_sum: Callable, *, margins,
                  scale, straight_through, eps, with_accuracy):
    """Per-sample losses (and correctness) of `emb` against one shard of classes.

    emb (b, D) raw embeddings; labels (b,) global class ids; weight (c, D) this shard's classes,
    global ids offset .. offset + c - 1; rows: (k,) int32 indices into weight to score as the
    softmax's classes, or None for all; reduce_max / reduce_sum combine a (b,) value over the
    class shards (identity when unsharded).
    """
    c = weight.shape[0]
    e = _unit(emb)
    local = labels - offset
    owned = (local >= 0) & (local < c)
    # The target logit, on the shard that owns the label only.
    w_target = weight[jnp.where(owned, local, 0)]
    target_cos = jnp.sum(e.astype(jnp.float32) * w_target.astype(jnp.float32), axis=-1) * _inverse_norm(w_target)
    target_logit = scale * _target_margin(target_cos, margins, straight_through, eps)
    target_logit = reduce_sum(jnp.where(owned, target_logit, 0.0))
    # The other classes' logits; the target's own column is left out (it is `target_logit`).
    ids = jnp.arange(c) if rows is None else rows
    w = weight if rows is None else weight[rows]
    cos = jnp.einsum("bd,kd->bk", e, w, preferred_element_type=jnp.float32) * _inverse_norm(w)
    is_target = ids[None, :] == local[:, None]
    others = jnp.where(is_target, -jnp.inf, scale * cos)
    top = jnp.maximum(reduce_max(lax.stop_gradient(jnp.max(others, axis=-1))), lax.stop_gradient(target_logit))
    total = reduce_sum(jnp.sum(jnp.exp(others - top[:, None]), axis=-1)) + jnp.exp(target_logit - top)
    losses = top + jnp.log(total) - target_logit
    if not with_accuracy:
        return losses, None
    # Prediction = argmax of the plain cosines (no margin); ties go to the lowest class id.
    cos = lax.stop_gradient(cos)
    best = jnp.max(cos, axis=-1)
    best_all = reduce_max(best)
    candidate = jnp.where(best >= best_all, offset + ids[jnp.argmax(cos, axis=-1)], jnp.iinfo(jnp.int32).max)
    predicted = -reduce_max(-candidate)  # min over the shards
    return losses, (predicted == labels).astype(jnp.float32)


def margin_loss(embeddings, labels, weight, margins=ARCFACE, scale: float = 64.0, *, straight_through: bool = True,
                eps: float = 1e-7, with_accuracy: bool = False):
    """Mean margin-softmax cross-entropy on one device: the unsharded reference.

    embeddings (B, D), labels (B,) int class ids in [0, C), weight (C, D) class centres (neither
    needs to be normalized). Returns the loss, or (loss, accuracy) with `with_accuracy`
    (accuracy: argmax of the plain cosines, no margin).
    """
    identity = lambda x: x  # noqa: E731
    losses, correct = _shard_losses(embeddings, labels, weight, 0, None, identity, identity, margins=margins,
                                    scale=scale, straight_through=straight_through, eps=eps,
                                    with_accuracy=with_accuracy)
    return (jnp.mean(losses), jnp.mean(correct)) if with_accuracy else jnp.mean(losses)


def _axes(axes: Axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _spec(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else (axes or None)


def weight_sharding(mesh: Mesh, class_axis: Axes = "model") -> NamedSharding:
    """The classifier's sharding: rows (identities) split over `class_axis`, D whole."""
    return NamedSharding(mesh, P(_spec(_axes(class_axis)), None))


def init_weight(key, num_classes: int, dim: int, mesh: Mesh, class_axis: Axes = "model", std: float = 0.01,
                dtype=jnp.float32):
    """A (num_classes, dim) normal(0, std) classifier created directly in `weight_sharding`
    (each device generates only its rows; the whole matrix never exists on one device)."""
    make = jax.jit(lambda k: (std * jax.random.normal(k, (num_classes, dim), jnp.float32)).astype(dtype),
                   out_shardings=weight_sharding(mesh, class_axis))
    return make(key)


def num_sampled(local_classes: int, sample_rate: float) -> int:
    """Classes scored per shard under Partial FC: ceil(rate * local_classes)."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    return min(local_classes, max(1, math.ceil(sample_rate * local_classes - 1e-9)))


def sharded_margin_loss(embeddings, labels, weight, mesh: Mesh, margins=ARCFACE, scale: float = 64.0, *,
                        class_axis: Axes = "model", batch_axis: Axes = "data", sample_rate: float = 1.0,
                        key=None, straight_through: bool = True, eps: float = 1e-7, with_accuracy: bool = False):
    """Mean margin-softmax cross-entropy with the classifier split over devices by identity.

    Expected shardings (others are resharded to these by shard_map under jit):
      embeddings (B, D): P(batch_axis, None), the batch split over `batch_axis` (None: replicated);
      labels (B,) int32 global class ids in [0, C): P(batch_axis), like the embeddings;
      weight (C, D): P(class_axis, None) (`weight_sharding`), C divisible by the class shards;
      key: a replicated PRNG key, needed only when sample_rate < 1.
    `class_axis` / `batch_axis` are mesh axis names (or tuples of them, major first). Typical:
      mesh ("data", "model"), batch_axis="data", class_axis="model" (2-D), or
      batch_axis = class_axis = "model" or ("data", "model") (insightface: each device holds
      C / N classes and its slice of the batch; the batch is all-gathered).
    The loss (and accuracy) come back replicated; the weight gradient has the weight's sharding.
    sample_rate < 1: Partial FC (module docstring); with 1.0 all classes are used.
    Returns the loss, or (loss, accuracy) with `with_accuracy` (argmax of the plain cosines,
    computed shard-wise; under Partial FC among the sampled classes). The gradients are those of
    this mean (insightface scales its embedding gradient by the world size to suit DDP's mean;
    nothing like that here).
    """
    class_axes, batch_axes = _axes(class_axis), _axes(batch_axis)
    for name in class_axes + batch_axes:
        if name not in mesh.axis_names:
            raise ValueError(f"axis {name!r} is not in the mesh {mesh.axis_names}")
    class_shards = math.prod(mesh.shape[a] for a in class_axes)
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    num_classes, batch = weight.shape[0], embeddings.shape[0]
    if num_classes % class_shards or batch % batch_shards:
        raise ValueError(f"{num_classes} classes over {class_shards} shards / batch {batch} over {batch_shards} "
                         "shards: both must divide evenly")
    local_classes = num_classes // class_shards
    k = num_sampled(local_classes, sample_rate)
    sampling = k < local_classes
    if sampling and key is None:
        raise ValueError("sample_rate < 1 needs a PRNG key")
    gathered = tuple(a for a in batch_axes if a in class_axes)  # batch axes that also split the classes
    summed = tuple(a for a in batch_axes if a not in class_axes)  # the rest: sum the losses over them
    reduce_max = lambda x: lax.pmax(x, class_axes) if class_axes else x  # noqa: E731
    reduce_sum = lambda x: lax.psum(x, class_axes) if class_axes else x  # noqa: E731

    def body(emb, lab, w, *rng):
        offset = (lax.axis_index(class_axes) if class_axes else 0) * local_classes
        rows = None
        if sampling:  # positives of the global batch first, then random others
            everyone = lax.all_gather(lab, batch_axes, tiled=True) if batch_axes else lab
            local = everyone - offset
            local = jnp.where((local >= 0) & (local < local_classes), local, local_classes)
            positive = jnp.zeros(local_classes, jnp.float32).at[local].set(2.0, mode="drop")
            shard_key = jax.random.fold_in(rng[0], offset)
            rows = lax.top_k(jax.random.uniform(shard_key, (local_classes,)) + positive, k)[1]
        if gathered:
            emb = lax.all_gather(emb, gathered, tiled=True)
            lab = lax.all_gather(lab, gathered, tiled=True, to="invarying")  # (labels carry no gradient)
        losses, correct = _shard_losses(emb, lab, w, offset, rows, reduce_max, reduce_sum, margins=margins,
                                        scale=scale, straight_through=straight_through, eps=eps,
                                        with_accuracy=with_accuracy)
        out = [jnp.sum(losses)] + ([jnp.sum(correct)] if with_accuracy else [])
        out = [lax.psum(x, summed) if summed else x for x in out]
        return tuple(x / batch for x in out)

    batch_spec = _spec(batch_axes)
    in_specs = (P(batch_spec, None), P(batch_spec), P(_spec(class_axes), None)) + ((P(),) if sampling else ())
    args = (embeddings, labels.astype(jnp.int32), weight) + ((key,) if sampling else ())
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(P(),) * (2 if with_accuracy else 1))
    out = fn(*args)
    return out if with_accuracy else out[0]
