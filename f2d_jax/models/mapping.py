"""The mapping network: identity (+ expression) features -> the two pseudo-word embeddings "f l".

Matches the official `IMG2TEXTwithEXP(1536, 1536, 768)`: two independent MLPs, `i2t_first`
and `i2t_last`, each Linear -> Dropout -> LeakyReLU(0.2) twice then Linear, on
concat(identity, expression). A learnable `null_exp` (zeros at init) stands in for the
expression where `expression_mask` is 0, and everywhere when no expression is given.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from f2d_jax.models.layers import torch_linear_init


class MappingMLP(nn.Module):
    hidden_dim: int
    out_dim: int
    num_layers: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.num_layers):
            x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=torch_linear_init, name=f"layers_{i}")(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)  # before the activation, as official
            x = nn.leaky_relu(x, 0.2)
        return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=torch_linear_init, name="fc_out")(x)


class MappingNetwork(nn.Module):
    """(B, identity_dim) features -> (first, last), each (B, token_dim).

    expression: (B, expression_dim) codes or None (then `null_exp` is used, as at inference).
    expression_mask: (B,) in {0, 1}; 1 keeps the sample's expression, 0 swaps in `null_exp`.
    Dropout is active only with `train=True` (which needs a "dropout" rng).
    """

    identity_dim: int = 1536
    expression_dim: int = 64
    hidden_dim: int = 1536
    token_dim: int = 768
    num_layers: int = 2
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, identity, expression=None, expression_mask=None, train: bool = False):
        b = identity.shape[0]
        if identity.shape[1:] != (self.identity_dim,):
            raise ValueError(f"MappingNetwork takes (B, {self.identity_dim}) identity features, got {identity.shape}")
        null_exp = self.param("null_exp", nn.initializers.zeros, (self.expression_dim,))
        if expression is None:
            expression = null_exp[None]
        mask = jnp.ones((b,)) if expression_mask is None else jnp.asarray(expression_mask)
        mask = mask.reshape(-1, 1).astype(null_exp.dtype)
        expression = expression * mask + null_exp[None] * (1 - mask)
        x = jnp.concatenate([identity, jnp.broadcast_to(expression, (b, self.expression_dim))], axis=-1)
        mlp = lambda name: MappingMLP(self.hidden_dim, self.token_dim, self.num_layers,  # noqa: E731
                                      self.dropout, self.dtype, name=name)
        return mlp("i2t_first")(x, train), mlp("i2t_last")(x, train)
