"""CLIP image encoder: the ViT of Hugging Face's CLIPVisionModel[WithProjection].

Same computation: a bias-free patch convolution, the class embedding before the patches, position
embeddings, `pre_layrnorm`, pre-norm transformer layers (the text tower's CLIPLayer, not causal),
then `post_layernorm` of the class token's state. `projection_dim` adds the bias-free
`visual_projection` of that pooled output, CLIPVisionModelWithProjection's `image_embeds` (what
CLIPModel.get_image_features returns). Module names are Hugging Face's, as in the text tower.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from f2d_jax.models.clip_text import CLIPTower

_init = nn.initializers.normal(0.02)


class CLIPVisionEmbeddings(nn.Module):
    """(B, H, W, C) pixels -> (B, 1 + patches, D): the class embedding, then the patches in row-major
    order, plus a learned position embedding each."""

    image_size: int
    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        if pixels.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"images of {self.image_size}x{self.image_size} pixels, got "
                             f"{pixels.shape[1]}x{pixels.shape[2]}")
        patch = (self.patch_size, self.patch_size)
        patches = nn.Conv(self.width, patch, strides=patch, padding="VALID", use_bias=False, dtype=self.dtype,
                          kernel_init=_init, name="patch_embedding")(pixels)
        patches = patches.reshape(patches.shape[0], -1, self.width)
        cls = self.param("class_embedding", _init, (self.width,)).astype(patches.dtype)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (patches.shape[0], 1, self.width)), patches], axis=1)
        positions = nn.Embed(tokens.shape[1], self.width, embedding_init=_init, dtype=self.dtype,
                             name="position_embedding")
        return tokens + positions(jnp.arange(tokens.shape[1]))[None]


class CLIPVisionEncoder(CLIPTower):
    """(B, H, W, C) pixels, CLIP-normalized -> (hidden states (B, 1 + patches, D), pooled).

    Defaults are CLIP ViT-L/14's image tower. The hidden states are the last layer's
    (`last_hidden_state`, no final LayerNorm); the pooled output is `post_layernorm` of the class
    token's state, then `visual_projection` (no bias) when `projection_dim` is set.
    """

    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    image_size: int = 224
    patch_size: int = 14

    def setup(self):
        self.embeddings = CLIPVisionEmbeddings(self.image_size, self.patch_size, self.width, self.dtype)
        self.pre_layrnorm = self.layer_norm()
        self.layers = self.stacked_layers(causal=False)
        self.post_layernorm = self.layer_norm()
        if self.projection_dim is not None:
            self.visual_projection = self.projection()

    def __call__(self, pixels):
        hidden, _ = self.layers(self.pre_layrnorm(self.embeddings(pixels)))
        pooled = self.post_layernorm(hidden[:, 0])
        if self.projection_dim is not None:
            pooled = self.visual_projection(pooled)
        return hidden, pooled
