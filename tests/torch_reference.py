"""Plain-PyTorch reference models with the official key names, for parity tests.

MSID (timm's VisionTransformer key layout) and Mapping (Face2Diffusion's IMG2TEXTwithEXP) are the
package's own PyTorch models, from f2d_jax.torch; written here from the official description:
torchvision's ResNet and Deep3DFaceRecon's ReconNetWrapper. timm and torchvision themselves are
kept out because they pull a CUDA build of torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from f2d_jax.torch import MSID, Mapping

__all__ = ["MSID", "Mapping", "ReconNet", "randomize"]  # MSID and Mapping: re-exported


# ----------------------------------------------------------------------------- expression (ResNet-50)

class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return F.adaptive_avg_pool2d(x, 1)


class ReconNet(nn.Module):
    """Deep3DFaceRecon's ReconNetWrapper: ResNet backbone + seven 1x1 heads -> 257 coefficients."""

    def __init__(self, layers=(3, 4, 6, 3), width=64):
        super().__init__()
        self.backbone = ResNet(layers, width)
        last = width * 2 ** (len(layers) - 1) * 4
        self.final_layers = nn.ModuleList([nn.Conv2d(last, n, 1) for n in (80, 64, 80, 3, 27, 2, 1)])

    def forward(self, x):  # (B, 3, 224, 224) in [0, 1]
        x = self.backbone(x)
        return torch.cat([layer(x) for layer in self.final_layers], 1).flatten(1)


# ----------------------------------------------------------------------------- helpers

def randomize(module: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Random weights everywhere, norms and BatchNorm running statistics included; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            elif tensor.ndim == 1 and name.endswith("weight"):  # norm scales
                tensor.copy_(1 + scale * torch.randn(tensor.shape, generator=g))
            elif name.endswith("weight"):  # Linear/Conv/Embedding: unit-variance outputs
                tensor.copy_(torch.randn(tensor.shape, generator=g) * tensor[0].numel() ** -0.5)
            else:
                tensor.copy_(scale * torch.randn(tensor.shape, generator=g))
    return module.eval()
