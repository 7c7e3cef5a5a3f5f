"""f2d_jax.models.attention: every implementation that runs on CPU against the plain softmax form and
against PyTorch's scaled_dot_product_attention, outputs and gradients, float32 and bfloat16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from f2d_jax.models import attention as attn

# pallas: the TPU kernel, interpreted (slow on CPU)
CPU_IMPLEMENTATIONS = ("reference", "xla", "cpu", pytest.param("pallas", marks=pytest.mark.slow))

# (batch, queries, keys, heads, head width, causal, padding mask)
CASES = {
    "self-attention": (2, 256, 256, 2, 16, False, False),    # UNet self-attention (the pallas kernel runs)
    "cross-attention": (2, 128, 77, 2, 8, False, False),     # UNet cross-attention over 77 text tokens
    "causal": (2, 77, 77, 4, 8, True, False),                # CLIP text encoder
    "causal, padded keys": (3, 77, 77, 2, 8, True, True),    # CLIP with an attention mask (evaluation)
    "causal, 256": (1, 256, 256, 2, 16, True, False),        # causal through the pallas kernel
    "197 tokens, 160 wide": (1, 197, 197, 2, 160, False, False),  # MSID's length, SD 1.x's deepest heads: padded
}


def _inputs(case, dtype=jnp.float32, seed=0):
    b, tq, tk, h, d, _, padded = CASES[case]
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for t in (tq, tk, tk))
    q, k = 2 * q, 2 * k  # peaked softmaxes, as trained attention has
    mask = None
    if padded:  # the last keys of each row but the first are padding
        lengths = np.array([tk, 50, 20][:b])
        mask = (np.arange(tk)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, Tk)
    return [jnp.asarray(x, dtype) for x in (q, k, v)], mask


def _ours(implementation, case, q, k, v, mask):
    causal = CASES[case][5]

    def out(q, k, v):
        return attn.attention(q, k, v, causal=causal, mask=None if mask is None else jnp.asarray(mask),
                              implementation=implementation)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(out(q, k, v).astype(jnp.float32)))

    return jax.jit(out)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _torch(case, q, k, v, mask, dtype=torch.float32):
    """PyTorch's output and gradients of sum(sin(out)) w.r.t. q, k, v; (B, T, H, D) layout."""
    causal = CASES[case][5]
    tq, tk = q.shape[1], k.shape[1]
    q, k, v = (torch.tensor(np.asarray(x, np.float32), dtype=dtype).transpose(1, 2).requires_grad_() for x in (q, k, v))
    allowed = None
    if mask is not None or causal:
        allowed = torch.ones(tq, tk, dtype=torch.bool)
        if causal:
            allowed = torch.tril(allowed)
        if mask is not None:
            allowed = allowed & torch.from_numpy(np.asarray(mask))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    out.float().sin().sum().backward()
    numpy = lambda x: x.detach().float().transpose(1, 2).numpy()  # noqa: E731
    return numpy(out), [numpy(x.grad) for x in (q, k, v)]


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_float32_matches_softmax_and_pytorch(implementation, case, parity):
    (q, k, v), mask = _inputs(case)
    out, grads = _ours(implementation, case, q, k, v, mask)
    ref_out, ref_grads = _ours("reference", case, q, k, v, mask)
    torch_out, torch_grads = _torch(case, q, k, v, mask)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    wide = max(1, q.shape[-1] / 64)  # longer float32 dot products round more
    assert _err(out, ref_out) <= 5e-6 * wide and max(map(_err, grads, ref_grads)) <= 3e-5 * wide
    parity(f"attention {implementation}, {case}: output", _err(out, torch_out), 1e-5)
    parity(f"attention {implementation}, {case}: gradients", max(map(_err, grads, torch_grads)), 1e-4)


@pytest.mark.parametrize("case", ["self-attention", "causal, padded keys"])
@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.slow
def test_bfloat16_matches_float32_softmax_and_pytorch(implementation, case):
    (q, k, v), mask = _inputs(case, jnp.bfloat16)
    out, grads = _ours(implementation, case, q, k, v, mask)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    # The same bfloat16 inputs in float32: the exact answer, up to bfloat16 rounding of the output
    # (|out| <= 4: spacing 2^-6) and of the inputs to the P V and gradient matmuls.
    exact_out, exact_grads = _ours("reference", case, *(x.astype(jnp.float32) for x in (q, k, v)), mask)
    assert _err(out, exact_out) <= 3e-2
    assert max(_err(g, e) / float(jnp.max(jnp.abs(e))) for g, e in zip(grads, exact_grads)) <= 3e-2
    torch_out, _ = _torch(case, q, k, v, mask, torch.bfloat16)
    assert _err(out, torch_out) <= 3e-2


def test_cpu_blocks_and_padding_give_the_same_answer(monkeypatch, parity):
    """The cpu implementation split into blocks that do not divide the queries (the last is padded)."""
    (q, k, v), mask = _inputs("causal, padded keys")
    whole, whole_grads = _ours("cpu", "causal, padded keys", q, k, v, mask)
    monkeypatch.setattr(attn, "_CPU_BLOCK_ELEMENTS", 3 * 2 * 77 * 10)  # blocks of 10 queries: 8 blocks
    assert attn._cpu_block(q, k) == 10
    blocked, blocked_grads = _ours("cpu", "causal, padded keys", q, k, v, mask)
    torch_out, torch_grads = _torch("causal, padded keys", q, k, v, mask)
    assert _err(blocked, whole) <= 5e-6 and max(map(_err, blocked_grads, whole_grads)) <= 3e-5
    parity("attention cpu, 8 query blocks (last padded): output", _err(blocked, torch_out), 1e-5)
    parity("attention cpu, 8 query blocks (last padded): gradients",
           max(map(_err, blocked_grads, torch_grads)), 1e-4)


@pytest.mark.slow
def test_a_query_dependent_mask_is_split_with_the_blocks(monkeypatch):
    (q, k, v), _ = _inputs("cross-attention")
    mask = np.random.default_rng(1).random((1, 1, q.shape[1], k.shape[1])) < 0.7
    mask[..., 0] = True  # every row keeps a key
    monkeypatch.setattr(attn, "_CPU_BLOCK_ELEMENTS", 2 * 2 * 77 * 48)   # blocks of 48: 3 blocks, last padded
    ours, _ = _ours("cpu", "cross-attention", q, k, v, mask)
    reference, _ = _ours("reference", "cross-attention", q, k, v, mask)
    assert _err(ours, reference) <= 5e-6


def test_auto_and_fallbacks(monkeypatch):
    (q, k, v), _ = _inputs("cross-attention")
    assert attn.resolve("auto", q, k) == "cpu"                 # this test runs on CPU
    assert attn.resolve("pallas", q, k) == "pallas"            # 77 keys: padded to 128, the padding masked
    assert attn.resolve("pallas", q, k, mask=jnp.ones((1, 1, 1, 77), bool)) == "xla"   # masks take xla
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        attn.resolve("cudnn", q, k)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attn.resolve("auto", q.astype(jnp.bfloat16), k) == "cudnn"
    assert attn.resolve("auto", q, k) == "xla"                 # cuDNN's kernel takes bf16 / fp16 only
    assert attn.resolve("auto", q.astype(jnp.bfloat16), k, mask=jnp.ones((1, 1, 1, 77), bool)) == "xla"
    with pytest.raises(ValueError, match="TPU kernel"):
        attn.resolve("pallas", q, k)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attn.resolve("auto", *_inputs("self-attention")[0][:2]) == "pallas"
    with pytest.raises(ValueError, match="is not one of"):
        attn.attention(q, k, v, implementation="flash")
