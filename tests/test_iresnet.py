"""Parity of the Flax IResNet (ArcFace) against a plain-PyTorch reference with insightface's
`arcface_torch/backbones/iresnet.py` key layout, loaded through `load_iresnet` from a backbone.pth."""
import jax
import numpy as np
import pytest
import torch
from torch import nn

import torch_reference as ref
from f2d_jax.models.iresnet import IResNet, load_iresnet


class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-05))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class TorchIResNet(nn.Module):
    def __init__(self, layers, width=64, num_features=512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-05)
        self.prelu = nn.PReLU(width)
        inplanes = width
        for stage, blocks in enumerate(layers):
            planes = width * 2 ** stage
            setattr(self, f"layer{stage + 1}",
                    nn.Sequential(*[IBasicBlock(inplanes if i == 0 else planes, planes, 2 if i == 0 else 1)
                                    for i in range(blocks)]))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(8 * width, eps=1e-05)
        self.dropout = nn.Dropout(p=0.2)
        self.fc = nn.Linear(8 * width * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _reference(layers, width, seed):
    model = ref.randomize(TorchIResNet(layers, width), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("prelu.weight"):  # slopes well away from 1, so PReLU is not near-identity
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            elif ".bn3." in name:  # damped residual branches, as in a trained net: outputs stay O(1)
                p.mul_(0.2)
    return model


@pytest.mark.parametrize("name, layers", [("r18", (2, 2, 2, 2)), ("r50", (3, 4, 14, 3))])
def test_iresnet_matches_insightface_layout_reference(tmp_path, parity, name, layers):
    torch_model = _reference(layers, width=8, seed=len(layers) + sum(layers))
    path = tmp_path / "backbone.pth"
    torch.save(torch_model.state_dict(), path)

    model, variables = load_iresnet(path)
    assert model == IResNet(layers=layers, width=8, embedding_dim=512, input_size=112)

    faces = np.random.default_rng(0).uniform(-1, 1, (2, 112, 112, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(model.apply)(variables, faces), np.float64)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(faces).permute(0, 3, 1, 2)).double().numpy()
    assert ours.shape == (2, 512)
    assert np.std(theirs) > 0.1  # a non-degenerate output
    parity(f"iresnet tiny (width 8, {name} layout)", float(np.max(np.abs(ours - theirs))), 1e-4)


def test_iresnet_rejects_other_state_dicts(tmp_path):
    state = _reference((2, 2, 2, 2), width=8, seed=0).state_dict()
    state = {k.replace("features.", "embedding."): v for k, v in state.items()}
    path = tmp_path / "not_a_backbone.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys: .*features\.running_mean") as error:
        load_iresnet(path)
    assert "embedding.weight" in str(error.value)  # reported as unexpected

    path = tmp_path / "vit.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "blocks.0.norm1.weight": torch.ones(8)}, path)
    with pytest.raises(ValueError, match=r"missing keys: .*conv1\.weight"):
        load_iresnet(path)
