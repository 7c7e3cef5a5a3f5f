"""Building blocks shared by the Flax models: norms with PyTorch numerics, attention, MLPs."""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from f2d_jax.models.attention import attention

# Two-pass variance (as PyTorch computes it) rather than E[x^2] - E[x]^2: the residual stream
# of a trained transformer is large enough for the fast form to lose digits.
LayerNorm = functools.partial(nn.LayerNorm, use_fast_variance=False)
BatchNorm = functools.partial(nn.BatchNorm, use_fast_variance=False)
GroupNorm = functools.partial(nn.GroupNorm, use_fast_variance=False)


class BatchNorm1d(nn.Module):
    """torch.nn.BatchNorm1d over the last axis of (B, C): in training the batch's mean and biased
    variance normalize, and the running variance takes the unbiased one (x n / (n - 1)), as
    PyTorch does (Flax's BatchNorm keeps the biased one); otherwise the running statistics. The
    variables are nn.BatchNorm's ("scale", "bias"; batch_stats "mean", "var"). Statistics are
    computed in float32 over the whole (global) batch."""

    momentum: float = 0.1      # PyTorch's convention: new = (1 - momentum) old + momentum batch
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if train:
            mean = x32.mean(axis=0)
            var = jnp.square(x32 - mean).mean(axis=0)
            if not self.is_initializing():
                n = x.shape[0]
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + \
                    self.momentum * var * (n / max(n - 1, 1))
        else:
            mean, var = running_mean.value, running_var.value
        y = (x32 - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)


# torch.nn.Linear's default init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # torch.nn.GELU / HF "gelu"
    "quick_gelu": quick_gelu,                                   # OpenAI CLIP
}


def multi_head_attention(q, k, v, num_heads: int, causal: bool = False, mask=None, implementation: str = "auto"):
    """(B, Tq, D) queries, (B, Tk, D) keys and values -> (B, Tq, D), softmax(q k^T / sqrt(D/heads)) v per
    head (f2d_jax.models.attention.attention, with its `causal`, `mask` and `implementation`)."""
    b, t, d = q.shape
    split = lambda x: x.reshape(b, x.shape[1], num_heads, d // num_heads)  # noqa: E731
    return attention(split(q), split(k), split(v), causal=causal, mask=mask,
                     implementation=implementation).reshape(b, t, d)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2, the transformer feed-forward block (output width = input width)."""

    hidden_dim: int
    activation: str = "gelu"
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.truncated_normal(0.02)

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=self.kernel_init)
        y = ACTIVATIONS[self.activation](dense(self.hidden_dim, name="fc1")(x))
        return dense(x.shape[-1], name="fc2")(y)
