"""Plain-PyTorch reference models with the official key names, for parity tests.

Written from the official architectures' descriptions (timm's VisionTransformer key layout,
torchvision's ResNet, Face2Diffusion's IMG2TEXTwithEXP, Deep3DFaceRecon's ReconNetWrapper);
timm and torchvision themselves are kept out because they pull a CUDA build of torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- MSID (timm ViT)

class PatchEmbed(nn.Module):
    def __init__(self, patch, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, patch)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, hidden), nn.Linear(hidden, width), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, mlp, nn.GELU())

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MSID(nn.Module):
    """timm VisionTransformer keys + the official `norms.layer_{i}` taps."""

    def __init__(self, image_size=112, patch=8, width=384, depth=12, heads=12, mlp_ratio=4, taps=(2, 5, 8, 11)):
        super().__init__()
        self.taps = taps
        self.patch_embed = PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads, int(width * mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.norms = nn.ModuleDict({f"layer_{i}": nn.Sequential(nn.BatchNorm1d(width), nn.LayerNorm(width))
                                    for i in taps})

    def forward(self, x):  # (B, 3, H, W) in [-1, 1]
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(self.norms[f"layer_{i}"](x[:, 0]))
        return torch.cat(feats, 1)


# ----------------------------------------------------------------------------- mapping network

class MappingMLP(nn.Module):
    def __init__(self, dim_in, hidden, dim_out, n_layer=2, dropout=0.1):
        super().__init__()
        dims = [dim_in] + [hidden] * n_layer
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.Dropout(dropout), nn.LeakyReLU(0.2))
                                      for a, b in zip(dims[:-1], dims[1:])])
        self.fc_out = nn.Linear(hidden, dim_out)

    def forward(self, x):
        return self.fc_out(self.layers(x))


class Mapping(nn.Module):
    """IMG2TEXTwithEXP: the official mapping network's structure and keys."""

    def __init__(self, identity=1536, hidden=1536, out=768, n_layer=2, dropout=0.1, exp=64):
        super().__init__()
        self.i2t_first = MappingMLP(identity + exp, hidden, out, n_layer, dropout)
        self.i2t_last = MappingMLP(identity + exp, hidden, out, n_layer, dropout)
        self.null_exp = nn.Parameter(torch.zeros(exp))

    def forward(self, x, exp=None, mask=None):
        if exp is None:
            exp = self.null_exp[None]
        mask = torch.ones(len(x)) if mask is None else mask
        mask = mask.reshape(-1, 1)
        exp = exp * mask + self.null_exp[None] * (1 - mask)
        x = torch.cat([x, exp.expand(len(x), -1)], -1)
        return self.i2t_first(x), self.i2t_last(x)


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
