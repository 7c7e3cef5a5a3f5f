"""Stable Diffusion's UNet in Flax: diffusers' UNet2DConditionModel for SD 1.x, 2.x and SDXL, computing what
PyTorch computes.

The fields are the options of diffusers' config.json (the ones our bases use; `options.py` refuses the
others), so a config builds the module as it is: `UNet2DConditionModel(**config, dtype=...)`. The
parameter tree is diffusers' Flax layout (`down_blocks_0/resnets_0/conv1/kernel`,
`.../transformer_blocks_0/attn1/to_q/kernel`), which every msgpack, safetensors and PyTorch .bin folder
loads into. PyTorch's numerics are computed here: exact-erf GELU in the GEGLU feed-forward, GroupNorm
epsilons of 1e-5 (ResNet blocks, output) and 1e-6 (the transformers' input), and with `upcast_attention`
(SD 2.1 768-v) attention scores, softmax and P V in float32. The norms take Flax's one-pass variance
(E[x^2] - E[x]^2): against diffusers' PyTorch UNets on random weights the two forms are within float32
rounding of each other (2.29e-6 against 2.21e-6 two-pass at SD v1.4's full size, 1.25-1.67e-6 against
1.61-1.94e-6 on the tiny ones).

Three fields are ours, not the config's: `attention` names the implementation of every attention layer
(`f2d_jax.models.attention`), `remat` recomputes each ResNet block and transformer layer in the backward
pass under the `jax.checkpoint_policies` policy `remat_policy` names (training's `remat_unet`), and
`dtype` is the compute dtype.

The sinusoidal embeddings are PyTorch's formula (flip_sin_to_cos, freq_shift); their frequencies differ
from torch's by at most one float32 ulp (XLA's exp against torch's): at most 3e-5 in the 256-wide
embedding of SDXL's time ids up to 1024, 6e-5 in the 320-wide one of timesteps up to 999.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from f2d_jax.models.layers import multi_head_attention

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def conv(features: int, kernel: int = 3, stride: int = 1, dtype=jnp.float32, name: str | None = None) -> nn.Conv:
    """PyTorch's Conv2d(kernel, stride, padding=kernel // 2) on channels-last input."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)), dtype=dtype, name=name)


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
    """(N,) timesteps -> (N, dim) float32 sinusoids, diffusers' get_timestep_embedding (max period 10000)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(embedding, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv (+ the projected time embedding) -> GroupNorm -> SiLU -> conv, plus the input
    (through a 1x1 conv where the width changes). The VAE's blocks take no time embedding."""

    features: int
    groups: int = 32
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    fast_variance: bool = True   # E[x^2] - E[x]^2, else two-pass (the VAE's)

    @nn.compact
    def __call__(self, x, temb=None):
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.epsilon, dtype=self.dtype,  # noqa: E731
                                         use_fast_variance=self.fast_variance, name=name)
        h = conv(self.features, dtype=self.dtype, name="conv1")(nn.silu(norm("norm1")(x)))
        if temb is not None:
            h = h + nn.Dense(self.features, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = conv(self.features, dtype=self.dtype, name="conv2")(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.features:
            x = conv(self.features, kernel=1, dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """A stride-2 3x3 conv; `asymmetric` pads right and bottom only (the VAE's), else one pixel each side."""

    features: int
    asymmetric: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not self.asymmetric:
            return conv(self.features, stride=2, dtype=self.dtype, name="conv")(x)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.features, (3, 3), (2, 2), "VALID", dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(self.features, dtype=self.dtype, name="conv")(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Attention(nn.Module):
    """Multi-head attention with bias-free to_q, to_k, to_v and a to_out_0 back to the query width; keys and
    values from `context` (self-attention without). `upcast` computes it in float32 whatever the dtype."""

    heads: int
    head_dim: int
    upcast: bool = False
    implementation: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        width = self.heads * self.head_dim
        q, k, v = (nn.Dense(width, use_bias=False, dtype=self.dtype, name=name)(source)
                   for name, source in (("to_q", x), ("to_k", context), ("to_v", context)))
        if self.upcast:
            q, k, v = (y.astype(jnp.float32) for y in (q, k, v))
        out = multi_head_attention(q, k, v, self.heads, implementation=self.implementation).astype(self.dtype)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj to twice the width, value * GELU(gate) with PyTorch's exact GELU."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        value, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = GEGLU(4 * self.features, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.features, dtype=self.dtype, name="net_2")(x)


class TransformerLayer(nn.Module):
    """diffusers' BasicTransformerBlock: self-attention (cross-attention with `only_cross_attention`),
    cross-attention to the context, GEGLU feed-forward; each pre-LayerNorm and residual."""

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast: bool = False
    implementation: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        attention = lambda name: Attention(self.heads, self.head_dim, self.upcast, self.implementation,  # noqa: E731
                                           self.dtype, name=name)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = x + attention("attn1")(norm("norm1")(x), context if self.only_cross_attention else None)
        x = x + attention("attn2")(norm("norm2")(x), context)
        return x + FeedForward(x.shape[-1], dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel: GroupNorm (eps 1e-6), proj_in (a 1x1 conv, or a Dense with
    `linear_projection`), `depth` transformer layers over the h*w positions, proj_out, plus the input."""

    heads: int
    depth: int = 1
    linear_projection: bool = False
    groups: int = 32
    layer: Callable[..., nn.Module] = TransformerLayer
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        project = (lambda name: nn.Dense(c, dtype=self.dtype, name=name)) if self.linear_projection else \
            (lambda name: conv(c, kernel=1, dtype=self.dtype, name=name))
        y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        y = y.reshape(b, h * w, c) if self.linear_projection else y
        y = project("proj_in")(y).reshape(b, h * w, c)
        for i in range(self.depth):
            y = self.layer(self.heads, c // self.heads, dtype=self.dtype, name=f"transformer_blocks_{i}")(y, context)
        y = y if self.linear_projection else y.reshape(b, h, w, c)
        return x + project("proj_out")(y).reshape(b, h, w, c)


class UNetBlock(nn.Module):
    """One level of the UNet: `layers` ResNet blocks, each followed by a Transformer2D when `transformer` is
    given (CrossAttn*Block2D), then a downsampler or upsampler. Down blocks return their outputs for the skip
    connections; up blocks take them (`skips`, the last one first) and concatenate one before each ResNet."""

    features: int
    layers: int
    resnet: Callable[..., nn.Module]
    transformer: Callable[..., nn.Module] | None = None
    resample: str | None = None    # "down", "up" or None
    dtype: Any = jnp.float32
    asymmetric_downsample: bool = False   # the VAE's

    @nn.compact
    def __call__(self, x, temb, context, skips: tuple = ()):
        outputs = []
        for i in range(self.layers):
            if skips:
                x, skips = jnp.concatenate([x, skips[-1]], axis=-1), skips[:-1]
            x = self.resnet(self.features, name=f"resnets_{i}")(x, temb)
            if self.transformer is not None:
                x = self.transformer(name=f"attentions_{i}")(x, context)
            outputs.append(x)
        if self.resample == "down":
            x = Downsample(self.features, self.asymmetric_downsample, self.dtype, name="downsamplers_0")(x)
            outputs.append(x)
        elif self.resample == "up":
            x = Upsample(self.features, dtype=self.dtype, name="upsamplers_0")(x)
        return x, tuple(outputs)


class MidBlock(nn.Module):
    """ResNet block, then (Transformer2D or attention, ResNet block) `layers` times."""

    features: int
    resnet: Callable[..., nn.Module]
    attention: Callable[..., nn.Module]
    layers: int = 1

    @nn.compact
    def __call__(self, x, temb=None, context=None):
        x = self.resnet(self.features, name="resnets_0")(x, temb)
        for i in range(self.layers):
            x = self.attention(name=f"attentions_{i}")(x, *(() if context is None else (context,)))
            x = self.resnet(self.features, name=f"resnets_{i + 1}")(x, temb)
        return x


def _per_block(value, blocks: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * blocks


class UNet2DConditionModel(nn.Module):
    """(B, C, h, w) latents, (B,) or scalar timesteps, (B, T, D) context -> (B, C, h, w) prediction.
    SDXL ("text_time") also takes added_cond_kwargs {"text_embeds": (B, P), "time_ids": (B, 6)}."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    attention_head_dim: int | tuple = 8     # diffusers' name for the number of heads
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # Ours: not part of the config.
    attention: str = "auto"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Any = jnp.float32

    OURS = ("attention", "remat", "remat_policy", "dtype")

    @property
    def config(self) -> dict:
        """The module's diffusers config entries (the fields less ours)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(UNet2DConditionModel)
                if f.name not in (*self.OURS, "parent", "name")}

    def _layer(self, module):
        """`module` recomputed in the backward pass under the named policy when `remat` is set."""
        if not self.remat:
            return module
        return nn.remat(module, policy=getattr(jax.checkpoint_policies, self.remat_policy))

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs: dict | None = None):
        levels = len(self.block_out_channels)
        heads = _per_block(self.num_attention_heads or self.attention_head_dim, levels)
        depths = _per_block(self.transformer_layers_per_block, levels)
        only_cross = _per_block(self.only_cross_attention, levels)
        resnet = lambda features, name: self._layer(ResnetBlock)(  # noqa: E731
            features, self.norm_num_groups, self.norm_eps, self.dtype, name=name)

        def transformer(level: int) -> Callable[..., nn.Module]:
            layer = lambda *args, **kwargs: self._layer(TransformerLayer)(  # noqa: E731
                *args, only_cross_attention=only_cross[level], upcast=self.upcast_attention,
                implementation=self.attention, **kwargs)
            return lambda name: Transformer2D(heads[level], depths[level], self.use_linear_projection,
                                              self.norm_num_groups, layer, self.dtype, name=name)

        batch = sample.shape[0]
        t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
        temb_width = 4 * self.block_out_channels[0]
        temb = TimestepEmbedding(temb_width, self.dtype, name="time_embedding")(
            timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift))
        if self.addition_embed_type == "text_time":
            cond = added_cond_kwargs or {}
            time_ids = timestep_embedding(jnp.ravel(cond["time_ids"]), self.addition_time_embed_dim,
                                          self.flip_sin_to_cos, self.freq_shift).reshape(batch, -1)
            added = jnp.concatenate([cond["text_embeds"].astype(jnp.float32), time_ids], axis=-1)
            temb = temb + TimestepEmbedding(temb_width, self.dtype, name="add_embedding")(added)

        x = conv(self.block_out_channels[0], dtype=self.dtype, name="conv_in")(jnp.transpose(sample, (0, 2, 3, 1)))
        context = encoder_hidden_states
        skips = (x,)
        for i, kind in enumerate(self.down_block_types):
            x, outputs = UNetBlock(self.block_out_channels[i], self.layers_per_block, resnet,
                                   transformer(i) if kind == "CrossAttnDownBlock2D" else None,
                                   "down" if i < levels - 1 else None, self.dtype, name=f"down_blocks_{i}")(
                x, temb, context)
            skips += outputs
        if self.mid_block_type is not None:
            x = MidBlock(self.block_out_channels[-1], resnet, transformer(levels - 1),
                         name="mid_block")(x, temb, context)
        for i, kind in enumerate(self.up_block_types):
            level = levels - 1 - i
            count = self.layers_per_block + 1
            x, _ = UNetBlock(self.block_out_channels[level], count, resnet,
                             transformer(level) if kind == "CrossAttnUpBlock2D" else None,
                             "up" if i < levels - 1 else None, self.dtype, name=f"up_blocks_{i}")(
                x, temb, context, skips[-count:])
            skips = skips[:-count]
        x = nn.silu(nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype, name="conv_norm_out")(x))
        x = conv(self.out_channels, dtype=self.dtype, name="conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))

    def example_inputs(self) -> tuple:
        """Zero inputs of the shapes `init` needs (one latent of sample_size, one context token)."""
        sample = jnp.zeros((1, self.in_channels, self.sample_size, self.sample_size), jnp.float32)
        context = jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32)
        added = None
        if self.addition_embed_type == "text_time":
            ids = 6   # original size, crop corner, target size (5 for the refiner: aesthetic score, no target)
            if 5 * self.addition_time_embed_dim + self.cross_attention_dim == self.projection_class_embeddings_input_dim:
                ids = 5
            added = {"text_embeds": jnp.zeros((1, self.projection_class_embeddings_input_dim
                                               - ids * self.addition_time_embed_dim), jnp.float32),
                     "time_ids": jnp.zeros((1, ids), jnp.float32)}
        return sample, jnp.ones((1,), jnp.int32), context, added
