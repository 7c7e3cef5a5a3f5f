"""Parity of the Flax models against plain-PyTorch references with the official key layouts,
through the same checkpoint loading code users run (random weights, float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from f2d_jax import convert
from f2d_jax.models import ExpressionEncoder, MappingNetwork, MSIDEncoder, expression_code

TINY_MSID = dict(width=48, depth=6, num_heads=4, tap_layers=(1, 3, 5))


def _save_torch(module, path):
    torch.save(module.state_dict(), path)
    return path


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("sizes", [pytest.param({}, marks=pytest.mark.slow), TINY_MSID], ids=["official", "tiny"])
def test_msid_matches_timm_layout_reference(tmp_path, parity, sizes):
    cfg = {**dict(width=384, depth=12, num_heads=12, tap_layers=(2, 5, 8, 11)), **sizes}
    torch_model = ref.randomize(ref.MSID(width=cfg["width"], depth=cfg["depth"], heads=cfg["num_heads"],
                                         taps=cfg["tap_layers"]), seed=1)
    path = _save_torch(torch_model, tmp_path / "msid.pt")
    model = MSIDEncoder(**sizes)
    variables = convert.load_msid(path, model)

    faces = np.random.default_rng(0).uniform(-1, 1, (3, 112, 112, 3)).astype(np.float32)
    ours = jax.jit(model.apply)(variables, faces)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(faces).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == (3, model.features)
    parity(f"MSID features ({'official' if not sizes else 'tiny'} sizes)", _max_err(ours, theirs), 1e-4)


def test_msid_default_is_official_size():
    variables = jax.eval_shape(MSIDEncoder().init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    out = jax.eval_shape(MSIDEncoder().apply, variables, jnp.zeros((2, 112, 112, 3)))
    assert out.shape == (2, 1536)
    n = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert n == sum(p.numel() for p in ref.MSID().parameters())


@pytest.mark.slow
def test_msid_train_mode_updates_batch_stats():
    model = MSIDEncoder(**TINY_MSID)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    faces = np.random.default_rng(1).uniform(-1, 1, (4, 112, 112, 3)).astype(np.float32)
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, faces)
    assert not np.allclose(updates["batch_stats"]["tap_1"]["batch_norm"]["mean"],
                           variables["batch_stats"]["tap_1"]["batch_norm"]["mean"])


@pytest.mark.parametrize("with_expression", [False, True])
def test_mapping_matches_official_reference(tmp_path, parity, with_expression):
    torch_model = ref.randomize(ref.Mapping(), seed=2)
    variables = convert.load_mapping(_save_torch(torch_model, tmp_path / "mapping.pt"))
    rng = np.random.default_rng(0)
    identity = rng.normal(size=(4, 1536)).astype(np.float32)
    expression = rng.normal(size=(4, 64)).astype(np.float32) if with_expression else None
    mask = np.array([1, 0, 1, 0], np.float32) if with_expression else None

    first, last = MappingNetwork().apply(variables, identity, expression, mask)
    with torch.no_grad():
        t_first, t_last = torch_model(torch.from_numpy(identity),
                                      None if expression is None else torch.from_numpy(expression),
                                      None if mask is None else torch.from_numpy(mask))
    assert first.shape == last.shape == (4, 768)
    label = "with expression + mask" if with_expression else "null expression"
    parity(f"mapping (first, last), {label}", max(_max_err(first, t_first), _max_err(last, t_last)), 1e-4)


@pytest.mark.slow
def test_mapping_mask_semantics_and_dropout():
    model = MappingNetwork(identity_dim=8, expression_dim=4, hidden_dim=16, token_dim=6)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8)))
    variables = jax.tree.map(lambda x: x + 0.3, variables)  # a non-zero null_exp
    identity = jax.random.normal(jax.random.key(1), (2, 8))
    expression = jax.random.normal(jax.random.key(2), (2, 4))
    masked = model.apply(variables, identity, expression, jnp.array([0.0, 0.0]))
    null = model.apply(variables, identity)
    np.testing.assert_array_equal(masked[0], null[0])
    kept = model.apply(variables, identity, expression)
    assert not np.allclose(kept[0], null[0])
    # Dropout only when training, and then it needs and uses an rng.
    eval_a = model.apply(variables, identity, expression)
    np.testing.assert_array_equal(eval_a[0], kept[0])
    train = model.apply(variables, identity, expression, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train[0], kept[0])


@pytest.mark.parametrize("sizes", [pytest.param({}, marks=pytest.mark.slow), dict(layers=(1, 1, 1, 1), width=8)],
                         ids=["resnet50", "tiny"])
def test_expression_matches_torchvision_layout_reference(tmp_path, parity, sizes):
    torch_model = ref.randomize(ref.ReconNet(**sizes), seed=3)
    # The official file is Deep3DFaceRecon's training checkpoint with the network under "net_recon".
    path = tmp_path / "epoch_20.pth"
    torch.save({"net_recon": torch_model.state_dict(), "epoch": 20}, path)
    model = ExpressionEncoder(**sizes)
    variables = convert.load_expression(path, model)

    images = np.random.default_rng(0).uniform(0, 1, (2, 224, 224, 3)).astype(np.float32)
    ours = jax.jit(model.apply)(variables, images)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == (2, 257) and expression_code(ours).shape == (2, 64)
    scale = float(np.max(np.abs(theirs)))
    parity(f"expression coefficients ({'ResNet-50' if not sizes else 'tiny ResNet'}, |max| {scale:.1f})",
           _max_err(ours, theirs), 1e-4)
