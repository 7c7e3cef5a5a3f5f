"""MSID: the multi-scale identity encoder, a ViT face recognizer read out at several depths.

Matches the official `msid_base_patch8_112` (a timm VisionTransformer): patch 8 on 112x112,
width 384, 12 blocks of 12 heads, pre-norm LayerNorm eps 1e-6. The CLS token after blocks
2, 5, 8 and 11 goes through BatchNorm1d (running statistics) and LayerNorm (eps 1e-5) and the
four are concatenated: (B, 112, 112, 3) in [-1, 1] -> (B, 1536), with no L2 normalization.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from f2d_jax.models.layers import BatchNorm1d, LayerNorm, Mlp, multi_head_attention

_init = nn.initializers.truncated_normal(0.02)


class Attention(nn.Module):
    """timm's attention: fused qkv projection, softmax attention, output projection."""

    num_heads: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_init)
        q, k, v = jnp.split(dense(3 * x.shape[-1], name="qkv")(x), 3, axis=-1)
        return dense(x.shape[-1], name="proj")(multi_head_attention(q, k, v, self.num_heads,
                                                                      implementation=self.attention))


class ViTBlock(nn.Module):
    """Pre-norm transformer block; as an `nn.scan` body it also emits its CLS token."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, _=None):
        norm = functools.partial(LayerNorm, epsilon=1e-6, dtype=self.dtype)
        x = x + Attention(self.num_heads, self.dtype, self.attention, name="attn")(norm(name="norm1")(x))
        x = x + Mlp(self.mlp_dim, "gelu", self.dtype, _init, name="mlp")(norm(name="norm2")(x))
        return x, x[:, 0]


class TapNorm(nn.Module):
    """BatchNorm1d then LayerNorm (both eps 1e-5) on one tapped CLS token."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = BatchNorm1d(epsilon=1e-5, dtype=self.dtype, name="batch_norm")(x, train)
        return LayerNorm(epsilon=1e-5, dtype=self.dtype, name="layer_norm")(x)


class MSIDEncoder(nn.Module):
    """(B, H, W, 3) faces in [-1, 1] -> (B, len(tap_layers) * width) identity features.

    Defaults are the official sizes. `train=True` uses batch statistics in the tap
    BatchNorms (apply with ``mutable=["batch_stats"]``); otherwise running statistics.
    """

    image_size: int = 112
    patch_size: int = 8
    width: int = 384
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    tap_layers: tuple[int, ...] = (2, 5, 8, 11)
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"  # f2d_jax.models.attention's implementation

    @property
    def features(self) -> int:
        return len(self.tap_layers) * self.width

    @nn.compact
    def __call__(self, faces, train: bool = False):
        b, h, w, c = faces.shape
        if (h, w, c) != (self.image_size, self.image_size, 3):
            raise ValueError(f"MSIDEncoder takes (B, {self.image_size}, {self.image_size}, 3) aligned faces, "
                             f"got {faces.shape}")
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch_embed")(faces.astype(self.dtype))
        x = x.reshape(b, -1, self.width)                                      # (B, N, D)
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
        pos = self.param("pos_embed", _init, (1, x.shape[1] + 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1) + pos

        block = nn.remat(ViTBlock) if self.remat else ViTBlock
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth)
        x, cls_per_block = blocks(self.num_heads, int(self.width * self.mlp_ratio), self.dtype, self.attention,
                                    name="blocks")(x)
        if self.is_initializing():
            # The ViT's final norm is unused by MSID but is part of the official checkpoint.
            LayerNorm(epsilon=1e-6, name="norm")(x)
        taps = [TapNorm(self.dtype, name=f"tap_{i}")(cls_per_block[i], train) for i in self.tap_layers]
        return jnp.concatenate(taps, axis=-1)                                 # (B, T * D)
