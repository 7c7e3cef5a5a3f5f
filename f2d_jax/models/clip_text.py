"""CLIP text encoder that accepts injected word embeddings (the "f l" identity tokens).

Same computation as Hugging Face's CLIPTextModel: token + position embeddings, pre-norm
causal transformer layers, final LayerNorm. Face2Diffusion overwrites the embedded hidden
states at the identifier's positions with the mapping network's outputs (no position
embedding is added to them) before the transformer runs; `inject_tokens` does that.

Three options cover the text encoders of SD 2.x and SDXL: `projection_dim` adds
CLIPTextModelWithProjection's bias-free `text_projection` of the pooled output,
`penultimate` returns the state before the last layer (SDXL's `hidden_states[-2]`, no final
LayerNorm), and `pad_token_id` re-pads the ids after the first end-of-text token, so that
ids from a tokenizer padding with end-of-text give what a tokenizer padding with "!" gives.

The layers and the fields of the transformer (CLIPLayer, CLIPTower) also make the image
tower, f2d_jax.models.clip_vision.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from f2d_jax.convert.layout import TorchLayout
from f2d_jax.models.layers import LayerNorm, Mlp, multi_head_attention

_init = nn.initializers.normal(0.02)

# The key layout of Hugging Face's checkpoints (f2d_jax.convert): CLIPTextModel's keys live under `text_model.`
# in published checkpoints (and in what we write), without it in what transformers 5's CLIPTextModel saves;
# CLIPTextModelWithProjection adds a top-level `text_projection.weight`, which the generic rules map onto our
# `text_projection` Dense.
_CLIP_TEXT_MODULES = (("embeddings.token_embedding", "token_embedding"),
                      ("embeddings.position_embedding", "position_embedding"),
                      ("encoder.layers", "layers"),
                      ("final_layer_norm", "final_layer_norm"))
CLIP_LAYOUT = TorchLayout(
    renames=(*((f"text_model.{torch}", flax) for torch, flax in _CLIP_TEXT_MODULES), *_CLIP_TEXT_MODULES),
    stacked=("layers",),
    ignore=(r"position_ids$",))  # a buffer older transformers versions saved


def inject_tokens(hidden, tokens, positions):
    """Overwrite hidden[b, positions[b] + k] with tokens[b, k].

    hidden: (B, T, D); tokens: (B, K, D); positions: (B,) int. Differentiable in `tokens`.
    """
    t, k = hidden.shape[1], tokens.shape[1]
    offset = jnp.arange(t)[None, :] - jnp.asarray(positions).reshape(-1, 1)   # (B, T)
    inside = (offset >= 0) & (offset < k)
    picked = jnp.take_along_axis(tokens, jnp.clip(offset, 0, k - 1)[..., None], axis=1)  # (B, T, D)
    return jnp.where(inside[..., None], picked.astype(hidden.dtype), hidden)


class CLIPAttention(nn.Module):
    """Self-attention with separate q, k, v and output projections (HF's layout); causal in the text tower."""

    num_heads: int
    dtype: Any = jnp.float32
    attention: str = "auto"
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_init, name=name)  # noqa: E731
        q, k, v = (dense(f"{n}_proj")(x) for n in "qkv")
        return dense("out_proj")(multi_head_attention(q, k, v, self.num_heads, causal=self.causal,
                                                             implementation=self.attention))


class CLIPLayer(nn.Module):
    """Pre-norm transformer layer of both CLIP towers (HF's CLIPEncoderLayer): attention, then the MLP."""

    num_heads: int
    mlp_dim: int
    activation: str
    eps: float
    dtype: Any = jnp.float32
    attention: str = "auto"
    keep_input: bool = False  # the carry is (state, this layer's input): the scan ends with the penultimate state
    causal: bool = True       # False in the vision tower

    @nn.compact
    def __call__(self, carry, _=None):
        x = carry[0] if self.keep_input else carry
        h = LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm1")(x)
        out = x + CLIPAttention(self.num_heads, self.dtype, self.attention, self.causal, name="self_attn")(h)
        h = LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm2")(out)
        out = out + Mlp(self.mlp_dim, self.activation, self.dtype, _init, name="mlp")(h)
        return ((out, x) if self.keep_input else out), None


class CLIPTower(nn.Module):
    """What both CLIP towers (text, image) share: the sizes of their transformer, built by
    `stacked_layers`, and the makers of their LayerNorms and of the bias-free projection of the
    pooled output (when `projection_dim` is set). Defaults are CLIP ViT-L/14's text tower."""

    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"  # f2d_jax.models.attention's implementation
    projection_dim: int | None = None  # width of the pooled output's projection; None: no projection

    def stacked_layers(self, **fields) -> nn.Module:
        """`num_layers` CLIPLayers (`fields`: CLIPLayer's others) run by nn.scan, parameters stacked."""
        layer = nn.remat(CLIPLayer) if self.remat else CLIPLayer
        return nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.num_layers)(
            self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps, self.dtype, self.attention, **fields)

    def layer_norm(self) -> nn.Module:
        return LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype)

    def projection(self) -> nn.Module:
        return nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, kernel_init=_init)


class CLIPTextEncoder(CLIPTower):
    """(B, T) token ids [+ injected (B, K, D) at (B,) positions] -> (hidden states, pooled).

    Defaults are CLIP ViT-L/14's text tower, the one Stable Diffusion v1 uses. The pooled
    output is the final LayerNorm of the last layer's state at argmax(input_ids) (the first
    end-of-text token), then `text_projection` (no bias) when `projection_dim` is set, as
    CLIPTextModelWithProjection's `text_embeds`. The hidden states are the final LayerNorm of
    the last layer's states (`last_hidden_state`), or with `penultimate` the states after
    num_layers - 1 layers without it (`hidden_states[-2]`, what SDXL conditions on). With
    `pad_token_id`, every id after the first end-of-text token becomes that id before embedding.
    """

    vocab_size: int = 49408
    max_length: int = 77
    penultimate: bool = False          # hidden states before the last layer, no final LayerNorm
    pad_token_id: int | None = None    # re-pad after the first end-of-text token with this id

    def setup(self):
        self.token_embedding = nn.Embed(self.vocab_size, self.width, embedding_init=_init, dtype=self.dtype)
        self.position_embedding = nn.Embed(self.max_length, self.width, embedding_init=_init, dtype=self.dtype)
        self.layers = self.stacked_layers(keep_input=self.penultimate)
        self.final_layer_norm = self.layer_norm()
        if self.projection_dim is not None:
            self.text_projection = self.projection()

    def repad(self, input_ids):
        """The ids with every position after the first end-of-text token set to `pad_token_id` (if set)."""
        if self.pad_token_id is None:
            return input_ids
        end = jnp.argmax(input_ids, axis=-1)[..., None]
        return jnp.where(jnp.arange(input_ids.shape[-1]) > end, jnp.asarray(self.pad_token_id, input_ids.dtype),
                         input_ids)

    def embed(self, input_ids):
        """(B, T) ids -> (B, T, D) token + position embeddings (of the re-padded ids)."""
        t = input_ids.shape[-1]
        if t > self.max_length:
            raise ValueError(f"at most {self.max_length} tokens, got {t}")
        return self.token_embedding(self.repad(input_ids)) + self.position_embedding(jnp.arange(t))[None]

    def encode(self, hidden, input_ids):
        """(B, T, D) embedded hidden states -> (hidden states (B, T, D), pooled (B, D) or (B, projection_dim))."""
        end = jnp.argmax(input_ids, axis=-1)[:, None, None]
        if self.penultimate:
            (last, hidden), _ = self.layers((hidden, hidden))
            pooled = self.final_layer_norm(jnp.take_along_axis(last, end, axis=1)[:, 0])
        else:
            hidden, _ = self.layers(hidden)
            hidden = self.final_layer_norm(hidden)
            pooled = jnp.take_along_axis(hidden, end, axis=1)[:, 0]
        if self.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled

    def __call__(self, input_ids, injected=None, positions=None):
        hidden = self.embed(input_ids)
        if injected is not None:
            hidden = inject_tokens(hidden, injected, positions)
        return self.encode(hidden, input_ids)
