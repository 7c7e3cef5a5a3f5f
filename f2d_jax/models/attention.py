"""One attention function for every model: softmax(q k^T / sqrt(d)) v, implemented per platform.

`attention(q, k, v, implementation=...)` is what the UNet (self- and cross-attention), the CLIP text
encoders and MSID call. The implementations compute the same function:

- "reference": the textbook form, scores -> softmax -> weighted sum, in the input dtype. The parity
  baseline, and what diffusers' Flax attention computes.
- "xla": `jax.nn.dot_product_attention(implementation="xla")`.
- "cudnn": cuDNN's fused flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
  bfloat16 / float16, head widths up to 128 in multiples of 8, no mask but the causal one; other
  shapes and dtypes take "xla"). Sequences are padded to a multiple of 8 (cuDNN's backward pass
  takes even lengths only: CLIP's 77 tokens, MSID's 197), the padded keys masked by their length.
- "pallas": the Pallas flash-attention kernel for TPU (Mosaic), for every shape the models have:
  sequences padded to a multiple of 128 with the padded keys masked by segment ids (the 77-token
  cross-attention, CLIP, MSID's 197 tokens), head widths over 128 padded to a multiple of 128 (SD
  1.x's 160); no mask but the causal one (others take "xla"). Under a mesh (`jax.set_mesh`) it runs
  in a `shard_map` over the batch, which Mosaic kernels need. On CPU it runs in Pallas' interpret
  mode, which is slow and meant for testing the kernel.
- "cpu": flash attention written in JAX for XLA:CPU. Queries are split into blocks whose score
  tiles stay in cache; a block's softmax is exponentiated once, normalized after the (P V) matmul,
  and the backward pass recomputes each block's probabilities from the saved log-sum-exp instead of
  storing them. XLA:CPU's softmax over a full (B, H, T, T) score array is bound by memory traffic,
  so this is several times faster than the other forms there.
- "auto": "cpu" on CPU, "cudnn" on GPUs, "pallas" on TPUs (each falling back as above): the platform of
  the devices the program is for (`targets.platform()`), not the host's.

Scores and softmax are computed in float32 whatever the input dtype (bfloat16 inputs give float32
statistics, as fused kernels do); the output has the input dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from f2d_jax import targets

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "pallas", "cpu")

# Score elements per query block of the "cpu" implementation (16 MiB of float32): measured fastest
# on XLA:CPU for SD's shapes among 2^20 .. 2^24.
_CPU_BLOCK_ELEMENTS = 1 << 22


def check_implementation(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return name


def attention(q, k, v, *, causal: bool = False, mask=None, implementation: str = "auto"):
    """softmax(q k^T / sqrt(D) [masked]) v per head.

    q: (B, Tq, H, D); k, v: (B, Tk, H, D) -> (B, Tq, H, D). `causal` lets query i see keys <= i;
    `mask` (bool, broadcastable to (B, H, Tq, Tk), True = attend) removes more keys. Every row must
    keep at least one key.
    """
    name = resolve(check_implementation(implementation), q, k, mask)
    if name == "reference":
        return _reference(q, k, v, causal, mask)
    if name == "cpu":
        return _cpu(q, k, v, causal, mask)
    if name == "pallas":
        return _pallas_tpu(q, k, v, causal)
    if name == "cudnn":
        return _cudnn(q, k, v, causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=name)


def resolve(name: str, q, k, mask=None) -> str:
    """The implementation `name` runs as for these arguments on the platform the program is for
    (`targets.platform()`: the compile target's, else the default backend's)."""
    platform = targets.platform()
    if name == "auto":
        name = {"cpu": "cpu", "gpu": "cudnn", "tpu": "pallas"}.get(platform, "xla")
    if name == "cudnn":
        if platform != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU (JAX runs on {platform})")
        return "cudnn" if _cudnn_supports(q, mask) else "xla"
    if name == "pallas":
        if platform not in ("tpu", "cpu"):
            raise ValueError(f"attention implementation 'pallas' is the TPU kernel (JAX runs on {platform})")
        return "pallas" if _pallas_supports(q, k, mask) else "xla"
    return name


def _cudnn_supports(q, mask) -> bool:
    d = q.shape[-1]
    return mask is None and q.dtype in (jnp.bfloat16, jnp.float16) and d <= 128 and d % 8 == 0


def _pallas_supports(q, k, mask) -> bool:
    return mask is None


def _allowed(causal, mask, start, tq, tk):
    """Bool (.., tq, tk) of the keys queries start..start+tq may see, or None for all."""
    allowed = None
    if causal:
        rows = start + jnp.arange(tq)[:, None]
        allowed = rows >= jnp.arange(tk)[None, :]
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    return allowed


def _scores(q, k, allowed):
    """(B, H, Tq, Tk) float32 scaled scores, masked entries at the lowest float."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    return s if allowed is None else jnp.where(allowed, s, jnp.finfo(jnp.float32).min)


def _reference(q, k, v, causal, mask):
    p = jax.nn.softmax(_scores(q, k, _allowed(causal, mask, 0, q.shape[1], k.shape[1])), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


# ------------------------------------------------------------------------------------------- cpu

def _blocks(x, block):
    """(B, T, ...) -> (T / block, B, block, ...), T padded up to a multiple of block."""
    t = x.shape[1]
    x = jnp.pad(x, [(0, 0), (0, -t % block)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _unblocks(x, t):
    """Inverse of _blocks: (N, B, block, ...) -> (B, t, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _mask_blocks(mask, tq, block):
    """(per-block stack, shared): a (.., Tq, Tk) mask split like the queries into (N, .., block, Tk)
    and None; a mask the queries share ((.., 1, Tk) or fewer axes) is None and itself."""
    if mask is None:
        return None, None
    mask = jnp.asarray(mask)
    if mask.ndim < 4 or mask.shape[-2] == 1:
        return None, mask
    mask = jnp.broadcast_to(mask, (*mask.shape[:-2], tq, mask.shape[-1]))
    mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(0, -tq % block), (0, 0)], constant_values=True)
    return jnp.moveaxis(mask.reshape(*mask.shape[:-2], -1, block, mask.shape[-1]), -3, 0), None


def _cpu_block(q, k) -> int:
    """Queries per block of the cpu path."""
    b, tq, h, _ = q.shape
    return max(1, min(tq, _CPU_BLOCK_ELEMENTS // (b * h * k.shape[1])))


def _cpu(q, k, v, causal, mask):
    block = _cpu_block(q, k)
    return _cpu_attention(q, k, v, *_mask_blocks(mask, q.shape[1], block), causal, block)


def _block_mask(causal, stacked, shared, index, block, tk):
    return _allowed(causal, shared if stacked is None else stacked, index * block, block, tk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _cpu_attention(q, k, v, stacked, shared, causal, block):
    return _cpu_forward(q, k, v, stacked, shared, causal, block)[0]


def _cpu_forward(q, k, v, stacked, shared, causal, block):
    tq, tk = q.shape[1], k.shape[1]

    def one(args):
        index, qb, mb = args
        s = _scores(qb, k, _block_mask(causal, mb, shared, index, block, tk))
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1)                                                       # (B, H, block)
        o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        o = o / jnp.swapaxes(total, 1, 2)[..., None]
        return o.astype(q.dtype), m[..., 0] + jnp.log(total)

    qs = _blocks(q, block)
    o, lse = jax.lax.map(one, (jnp.arange(qs.shape[0]), qs, stacked))
    return _unblocks(o, tq), (q, k, v, stacked, shared, o, lse)


def _cpu_backward(causal, block, residuals, grad):
    q, k, v, stacked, shared, o, lse = residuals
    tq, tk = q.shape[1], k.shape[1]
    f32 = jnp.float32

    def one(carry, args):
        dk, dv = carry
        index, qb, ob, gb, lb, mb = args
        s = _scores(qb, k, _block_mask(causal, mb, shared, index, block, tk))
        p = jnp.exp(s - lb[..., None])                                                     # (B, H, block, Tk)
        gb32 = gb.astype(f32)
        dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p, gb32)
        dp = jnp.einsum("bqhd,bkhd->bhqk", gb32, v.astype(f32))
        delta = jnp.einsum("bqhd,bqhd->bhq", gb32, ob.astype(f32))
        ds = p * (dp - delta[..., None]) * (q.shape[-1] ** -0.5)
        dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k.astype(f32))
        dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds, qb.astype(f32))
        return (dk, dv), dq.astype(q.dtype)

    qs, gs = _blocks(q, block), _blocks(grad, block)
    zeros = jnp.zeros(k.shape, f32)
    (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), (jnp.arange(qs.shape[0]), qs, o, gs, lse, stacked))
    return (_unblocks(dq, tq), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_cpu_attention.defvjp(_cpu_forward, _cpu_backward)


# ------------------------------------------------------------------------------------ cudnn, pallas

def _padded(x, multiple: int, axis: int = 1):
    return jnp.pad(x, [(0, -x.shape[axis] % multiple if a == axis else 0) for a in range(x.ndim)])


def _cudnn(q, k, v, causal):
    tq, tk = q.shape[1], k.shape[1]

    def run(q, k, v):
        q, k, v = _padded(q, 8), _padded(k, 8), _padded(v, 8)
        lengths = jnp.full((q.shape[0],), tk, jnp.int32) if k.shape[1] != tk else None  # padded keys drop out
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                           implementation="cudnn")
        return out[:, :tq]

    return _per_device(run, q, k, v)


def _pallas_tpu(q, k, v, causal):
    from jax.experimental.pallas.ops.tpu.flash_attention import SegmentIds, flash_attention

    tq, tk, d = q.shape[1], k.shape[1], q.shape[-1]
    width = d if d <= 128 else -(-d // 128) * 128  # widths over 128 in multiples of 128: zeros add nothing to q k^T

    def kernel_layout(x):  # (B, T, H, D) -> (B, H, T', D'), T' a multiple of 128
        return jnp.swapaxes(jnp.pad(_padded(x, 128), [(0, 0)] * 3 + [(0, width - d)]), 1, 2)

    def run(q, k, v):
        q, k, v = kernel_layout(q), kernel_layout(k), kernel_layout(v)
        segments = None
        if k.shape[2] != tk:  # padded keys: their segment (0) is no query's (1)
            b = q.shape[0]
            keys = jnp.broadcast_to((jnp.arange(k.shape[2]) < tk).astype(jnp.int32), (b, k.shape[2]))
            segments = SegmentIds(q=jnp.ones((b, q.shape[2]), jnp.int32), kv=keys)
        out = flash_attention(q, k, v, segment_ids=segments, causal=causal, sm_scale=d ** -0.5)
        return jnp.swapaxes(out, 1, 2)[:, :tq, :, :d]

    return _per_device(run if targets.platform() == "tpu" else _interpreted(run), q, k, v)


def _per_device(run, q, k, v):
    """`run(q, k, v)` on each device's part of the batch under a mesh (all of a batch the devices do not divide,
    such as a single prompt's): XLA does not partition Mosaic kernels, and cuDNN's partitioning rule refuses
    a batch split over more devices than it has."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v)
    spec = P(mesh.axis_names) if q.shape[0] % mesh.size == 0 else P()
    return jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def _interpreted(run):
    """`run` with its Pallas TPU kernels interpreted, the backward pass's kernels included."""
    from jax.experimental.pallas import tpu as pltpu

    @jax.custom_vjp
    def interpreted(*args):
        with pltpu.force_tpu_interpret_mode():
            return run(*args)

    def forward(*args):
        with pltpu.force_tpu_interpret_mode():
            return jax.vjp(run, *args)

    def backward(vjp, grad):
        with pltpu.force_tpu_interpret_mode():
            return vjp(grad)

    interpreted.defvjp(forward, backward)
    return interpreted
