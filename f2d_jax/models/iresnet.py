"""ArcFace face recognizer: insightface's IResNet (`recognition/arcface_torch/backbones/iresnet.py`).

Matches `iresnet18/34/50/100/200` there, key for key: a 3x3 stem (conv1, bn1, prelu), four stages
of `IBasicBlock` (BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a 1x1 conv + BN
shortcut in each stage's first, strided, block), then bn2, dropout (identity at inference), a
flatten in PyTorch's (C, H, W) order, fc and the `features` BatchNorm1d. All BatchNorms use
eps=1e-5. Input: (B, 112, 112, 3) ArcFace-aligned RGB crops in [-1, 1] ((uint8 / 255 - 0.5) / 0.5).
Output: (B, 512) embeddings, not normalized.

`load_iresnet(path)` reads an insightface `backbone.pth` (or .safetensors), infers the depth,
width and embedding size from it, and returns the module with its Flax variables.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from f2d_jax.convert.io import read_state_dict
from f2d_jax.convert.layout import TorchLayout, cast_like, from_torch
from f2d_jax.models.expression import _conv
from f2d_jax.models.layers import BatchNorm

ARCHITECTURES = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}

# arcface_torch's training checkpoints (checkpoint_gpu_*.pt) nest the backbone under this entry;
# a plain backbone.pth has no such entry and is read as it is.
_TRAINING_CHECKPOINT_ENTRY = "state_dict_backbone"

_norm = functools.partial(BatchNorm, use_running_average=True, epsilon=1e-5)


class PReLU(nn.Module):
    """torch.nn.PReLU(num_parameters=C): a learned negative slope per channel (last axis)."""

    init_slope: float = 0.25

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.constant(self.init_slope), (x.shape[-1],))
        return jnp.where(x >= 0, x, weight.astype(x.dtype) * x)


class IBasicBlock(nn.Module):
    """insightface's pre-norm basic block; no activation after the residual sum."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = functools.partial(_norm, dtype=self.dtype)
        out = _conv(self.planes, 3, dtype=self.dtype, name="conv1")(norm(name="bn1")(x))
        out = PReLU(name="prelu")(norm(name="bn2")(out))
        out = norm(name="bn3")(_conv(self.planes, 3, self.stride, self.dtype, name="conv2")(out))
        if self.stride != 1 or x.shape[-1] != self.planes:  # insightface's condition for a 1x1 shortcut
            x = norm(name="downsample_1")(_conv(self.planes, 1, self.stride, self.dtype, name="downsample_0")(x))
        return out + x


class IResNet(nn.Module):
    """(B, input_size, input_size, 3) faces in [-1, 1] -> (B, embedding_dim) ArcFace embeddings."""

    layers: tuple[int, ...] = ARCHITECTURES["r50"]
    width: int = 64
    embedding_dim: int = 512
    input_size: int = 112
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = functools.partial(_norm, dtype=self.dtype)
        x = _conv(self.width, 3, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
        x = PReLU(name="prelu")(norm(name="bn1")(x))
        for stage, blocks in enumerate(self.layers):
            for j in range(blocks):
                x = IBasicBlock(self.width * 2 ** stage, stride=2 if j == 0 else 1, dtype=self.dtype,
                                name=f"layer{stage + 1}_{j}")(x)
        x = norm(name="bn2")(x)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # flatten as (C, H, W), like torch.flatten
        x = nn.Dense(self.embedding_dim, dtype=self.dtype, name="fc")(x)
        return norm(name="features")(x)


def iresnet_config(state) -> dict[str, Any]:
    """IResNet fields inferred from an insightface state dict; defaults (r50) for what it lacks,
    so that loading a file that is not an IResNet reports its missing and unexpected keys."""
    config: dict[str, Any] = {}
    stages = [{int(m[1]) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.", k))} for s in range(1, 5)]
    if all(stages):
        config["layers"] = tuple(max(blocks) + 1 for blocks in stages)
    conv1, fc = state.get("conv1.weight"), state.get("fc.weight")
    if conv1 is not None and conv1.ndim == 4:
        config["width"] = int(conv1.shape[0])
    if fc is not None and fc.ndim == 2:
        config["embedding_dim"] = int(fc.shape[0])
        side = math.isqrt(int(fc.shape[1]) // (8 * config.get("width", 64)))  # fc input: 8 * width * (size/16)^2
        if side > 0:
            config["input_size"] = 16 * side
    return config


def load_iresnet(path) -> tuple[IResNet, dict[str, Any]]:
    """An insightface ArcFace `backbone.pth` (.pth/.pt/.safetensors) -> (IResNet, its Flax variables).

    Raises ValueError (CheckpointMismatchError) listing missing, unexpected and mis-shaped keys
    when the file is not an IResNet backbone.
    """
    state = read_state_dict(path, key=_TRAINING_CHECKPOINT_ENTRY)  # also strips DataParallel's "module."
    model = IResNet(**iresnet_config(state))
    example = jnp.zeros((1, model.input_size, model.input_size, 3))
    target = jax.eval_shape(model.init, jax.random.key(0), example)
    variables = from_torch(state, target, TorchLayout(), what=f"IResNet (ArcFace) backbone {path}")
    return model, cast_like(variables, target)
