"""Stable Diffusion's and FLUX.1's VAE in Flax: diffusers' AutoencoderKL, computing what PyTorch computes.

The fields are diffusers' config.json options; the parameter tree is diffusers' Flax layout
(`encoder/down_blocks_0/resnets_0/conv1/kernel`, `.../mid_block/attentions_0/query/kernel`), which every
msgpack, safetensors and PyTorch .bin folder loads into (`weights.normalize_vae_state` renames PyTorch's
attention projections). The mid-block attention runs through `f2d_jax.models.attention` (one head as
wide as the block), its GroupNorms and the ResNet blocks' with PyTorch's epsilon of 1e-6 and two-pass
variances (closer to PyTorch's decode than the one-pass form: 1.9e-5 against 2.4e-5 on the tiny VAE).
FLUX.1's VAE (`sd_config.FLUX_VAE`) has 16 latent channels and neither 1x1 convolution around the latent
(use_quant_conv, use_post_quant_conv False: no `quant_conv` / `post_quant_conv` parameters, as diffusers');
its shift_factor, like scaling_factor, is kept for the pipeline, which normalizes latents as
(z - shift_factor) * scaling_factor (`f2d_jax.models.flux_latents`).

`encode` takes (B, 3, H, W) images in [-1, 1] and returns the posterior's channels-last mean and log
variance (clipped to [-30, 20], as diffusers'); `decode` takes (B, C, h, w) latents and returns
(B, 3, H, W) images.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from f2d_jax.models.layers import GroupNorm, multi_head_attention
from f2d_jax.models.unet import MidBlock, ResnetBlock, UNetBlock, conv

DOWN_BLOCKS = ("DownEncoderBlock2D",)
UP_BLOCKS = ("UpDecoderBlock2D",)


class Posterior(NamedTuple):
    """The encoder's diagonal Gaussian, channels-last (B, h, w, C)."""

    mean: Any
    logvar: Any


class AttentionBlock(nn.Module):
    """GroupNorm, one-head self-attention over the h*w positions (query, key, value, proj_attn), plus the input."""

    groups: int = 32
    implementation: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(y) for name in ("query", "key", "value"))
        y = multi_head_attention(q, k, v, 1, implementation=self.implementation).astype(self.dtype)
        return x + nn.Dense(c, dtype=self.dtype, name="proj_attn")(y).reshape(b, h, w, c)


class _Coder(nn.Module):
    """The encoder (`down`: conv_in, down blocks, mid block, GroupNorm, SiLU, conv_out to `out_channels`) or
    the decoder (conv_in, mid block, up blocks in reverse width order, GroupNorm, SiLU, conv_out)."""

    down: bool
    out_channels: int
    block_out_channels: tuple
    layers_per_block: int
    groups: int
    attention: str
    dtype: Any

    @nn.compact
    def __call__(self, x):
        resnet = lambda features, name: ResnetBlock(features, self.groups, 1e-6, self.dtype, False,  # noqa: E731
                                                    name=name)
        attention = lambda name: AttentionBlock(self.groups, self.attention, self.dtype, name=name)  # noqa: E731
        mid = MidBlock(self.block_out_channels[-1], resnet, attention, name="mid_block")
        widths = self.block_out_channels if self.down else self.block_out_channels[::-1]
        x = conv(widths[0], dtype=self.dtype, name="conv_in")(x)
        if not self.down:
            x = mid(x)
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            name, layers = (f"down_blocks_{i}", self.layers_per_block) if self.down else \
                (f"up_blocks_{i}", self.layers_per_block + 1)
            resample = None if last else ("down" if self.down else "up")
            x, _ = UNetBlock(width, layers, resnet, None, resample, self.dtype, True, name=name)(x, None, None)
        if self.down:
            x = mid(x)
        x = nn.silu(GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="conv_norm_out")(x))
        return conv(self.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    sample_size: int = 512
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # Ours: not part of the config.
    attention: str = "auto"
    dtype: Any = jnp.float32

    OURS = ("attention", "dtype")

    @property
    def config(self) -> dict:
        """The module's diffusers config entries (the fields less ours)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(AutoencoderKL)
                if f.name not in (*self.OURS, "parent", "name")}

    def setup(self):
        coder = lambda down, out: _Coder(down, out, tuple(self.block_out_channels), self.layers_per_block,  # noqa: E731
                                         self.norm_num_groups, self.attention, self.dtype)
        self.encoder = coder(True, 2 * self.latent_channels)
        if self.use_quant_conv:
            self.quant_conv = conv(2 * self.latent_channels, kernel=1, dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv(self.latent_channels, kernel=1, dtype=self.dtype)
        self.decoder = coder(False, self.out_channels)

    def encode(self, images) -> Posterior:
        moments = self.encoder(jnp.transpose(images, (0, 2, 3, 1)))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents):
        x = jnp.transpose(latents, (0, 2, 3, 1))
        if self.use_post_quant_conv:
            x = self.post_quant_conv(x)
        x = self.decoder(x)
        return jnp.transpose(x, (0, 3, 1, 2))

    def __call__(self, images):
        """Encode and decode the posterior's mean (what `init` traces: every parameter)."""
        return self.decode(jnp.transpose(self.encode(images).mean, (0, 3, 1, 2)))

    def example_inputs(self) -> tuple:
        return (jnp.zeros((1, self.in_channels, self.sample_size, self.sample_size), jnp.float32),)
