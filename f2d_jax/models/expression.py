"""Expression encoder: Deep3DFaceRecon's ResNet-50 regressor of 257 3DMM coefficients.

Matches `ReconNetWrapper('resnet50')` of Deep3DFaceRecon_pytorch (torchvision's ResNet-50
without its fc, then seven 1x1 convolutions whose outputs are concatenated): id 80 | exp 64 |
tex 80 | angle 3 | gamma 27 | translation 3. Input: its own 224x224 alignment
(`f2d_jax.faces.expression_crop`) as RGB in [0, 1]. Face2Diffusion uses coefficients 80:144.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from f2d_jax.models.layers import BatchNorm

COEFFICIENT_SIZES = (80, 64, 80, 3, 27, 2, 1)  # id, exp, tex, angle, gamma, (tx, ty), tz
EXPRESSION = slice(80, 144)


def expression_code(coefficients):
    """(..., 257) coefficients -> (..., 64) expression code."""
    return coefficients[..., EXPRESSION]


def _conv(features, kernel, stride=1, dtype=jnp.float32, name=None):
    pad = (kernel - 1) // 2  # PyTorch's symmetric padding, not "SAME" (asymmetric when strided)
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, kernel_init=nn.initializers.kaiming_normal(), name=name)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 convolution)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = functools.partial(BatchNorm, use_running_average=True, epsilon=1e-5, dtype=self.dtype)
        out = nn.relu(norm(name="bn1")(_conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)))
        out = nn.relu(norm(name="bn2")(_conv(self.planes, 3, self.stride, self.dtype, name="conv2")(out)))
        out = norm(name="bn3")(_conv(4 * self.planes, 1, dtype=self.dtype, name="conv3")(out))
        if self.downsample:
            x = norm(name="downsample_1")(_conv(4 * self.planes, 1, self.stride, self.dtype, name="downsample_0")(x))
        return nn.relu(out + x)


class ResNet(nn.Module):
    """torchvision's ResNet with bottlenecks, up to the global average pool: (B, H, W, 3) -> (B, 32 * width)."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _conv(self.width, 7, 2, self.dtype, name="conv1")(x.astype(self.dtype))
        x = nn.relu(BatchNorm(use_running_average=True, epsilon=1e-5, dtype=self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for stage, blocks in enumerate(self.layers):
            planes = self.width * 2 ** stage
            for j in range(blocks):
                stride = 2 if (stage > 0 and j == 0) else 1
                x = Bottleneck(planes, stride, downsample=(j == 0), dtype=self.dtype,
                               name=f"layer{stage + 1}_{j}")(x)
        return jnp.mean(x, axis=(1, 2))


class ExpressionEncoder(nn.Module):
    """(B, 224, 224, 3) aligned faces in [0, 1] -> (B, 257) 3DMM coefficients."""

    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        features = ResNet(self.layers, self.width, self.dtype, name="backbone")(images)[:, None, None, :]
        heads = [nn.Conv(n, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros, name=f"final_layers_{i}")
                 for i, n in enumerate(COEFFICIENT_SIZES)]
        return jnp.concatenate([head(features) for head in heads], axis=-1).reshape(images.shape[0], -1)
