"""ArcFace / CosFace heads: the margin arithmetic, the unsharded reference against a plain
log-softmax, and the identity-sharded classifier (and Partial FC) on 8 simulated CPU devices,
which run in a subprocess because the device count is fixed when JAX starts."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from f2d_jax import arcface as af

ROOT = Path(__file__).resolve().parent.parent
COMBINED = (0.9, 0.4, 0.15)


def _data(batch=16, classes=64, dim=32, seed=0):
    """Embeddings near their class centres (so the margin matters), labels 1, 5, 9, ... (two per
    block of 8 classes, i.e. two positives on each of 8 class shards)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    weight = jax.random.normal(k2, (classes, dim))
    labels = (jnp.arange(batch) * 4 + 1) % classes
    return weight[labels] + 1.5 * jax.random.normal(k1, (batch, dim)), labels, weight


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# The 8-device checks: print {name: error} as JSON, the parent asserts them.
_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jax.sharding import Mesh
from f2d_jax import arcface as af
from test_arcface import COMBINED, _data, _rel

emb, labels, weight = _data()
devices = np.array(jax.devices())
assert len(devices) == 8
MESHES = {"model=8": (Mesh(devices, ("model",)), "model", "model"),
          "data=2,model=4": (Mesh(devices.reshape(2, 4), ("data", "model")), "model", "data"),
          "both axes": (Mesh(devices.reshape(2, 4), ("data", "model")), ("data", "model"), ("data", "model"))}
out = {}

def sharded(mesh_name, margins=af.ARCFACE, **kw):
    mesh, class_axis, batch_axis = MESHES[mesh_name]
    w = jax.device_put(weight, af.weight_sharding(mesh, class_axis))
    loss = lambda e, w: af.sharded_margin_loss(e, labels, w, mesh, margins, class_axis=class_axis,
                                               batch_axis=batch_axis, with_accuracy=True, **kw)
    (value, accuracy), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(emb, w)
    assert grads[1].sharding.is_equivalent_to(w.sharding, 2), grads[1].sharding
    return value, accuracy, grads

def reference(margins=af.ARCFACE, **kw):
    loss = lambda e, w: af.margin_loss(e, labels, w, margins, with_accuracy=True, **kw)
    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(emb, weight)

if sys.argv[1] == "parity":
    cases = [("model=8", af.ARCFACE), ("model=8", af.COSFACE), ("model=8", COMBINED),
             ("data=2,model=4", af.ARCFACE), ("data=2,model=4", COMBINED), ("both axes", af.ARCFACE)]
    for mesh_name, margins in cases:
        value, accuracy, grads = sharded(mesh_name, margins)
        (ref, ref_accuracy), ref_grads = reference(margins)
        assert accuracy == ref_accuracy and 0 < ref_accuracy < 1, (accuracy, ref_accuracy)
        out[f"{mesh_name} {margins} loss"] = _rel(value, ref)
        out[f"{mesh_name} {margins} grads"] = max(_rel(g, r) for g, r in zip(grads, ref_grads))
    value, _, grads = sharded("data=2,model=4", straight_through=False)
    (ref, _), ref_grads = reference(straight_through=False)
    out["exact-gradient loss"] = _rel(value, ref)
    out["exact-gradient grads"] = max(_rel(g, r) for g, r in zip(grads, ref_grads))
else:  # Partial FC
    key = jax.random.key(3)
    value, _, grads = sharded("model=8", sample_rate=1.0, key=key)
    (ref, _), ref_grads = reference()
    out["rate 1 loss"] = _rel(value, ref)
    out["rate 1 grads"] = max(_rel(g, r) for g, r in zip(grads, ref_grads))
    for mesh_name in ("model=8", "data=2,model=4"):
        value, _, (_, grad_w) = sharded(mesh_name, sample_rate=0.5, key=key)
        per_shard = (np.abs(np.asarray(grad_w)).sum(1) > 0).reshape(8 if mesh_name == "model=8" else 4, -1)
        rows = np.flatnonzero(per_shard.reshape(-1))
        # The loss is the full loss over the sampled rows only.
        ref = af.margin_loss(emb, jnp.searchsorted(jnp.asarray(rows), labels), weight[rows])
        out[f"{mesh_name} rate 0.5"] = {
            "loss": float(value), "finite": bool(np.isfinite(value)), "rows_per_shard": per_shard.sum(1).tolist(),
            "positives_updated": bool(np.isin(np.asarray(labels), rows).all()), "loss_vs_subset": _rel(value, ref)}
    mesh = MESHES["data=2,model=4"][0]
    w = af.init_weight(jax.random.key(0), 4096, 48, mesh, "model")
    out["init"] = {"spec": str(w.sharding.spec), "shard_shapes": sorted({s.data.shape for s in w.addressable_shards}),
                   "std": float(jnp.std(w))}
print("RESULT " + json.dumps(out))
"""


def _eight_devices(which: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _SCRIPT, which], env=env, capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_margin_arithmetic_by_hand():
    cos = jnp.array([[0.6, 0.2], [0.2, -0.95]])
    target = jnp.array([[1, 0], [0, 1]])
    # ArcFace: s cos(theta + m) = s (cos cos m - sin sin m), sin = 0.8 for cos = 0.6.
    arc = 64.0 * (0.6 * math.cos(0.5) - 0.8 * math.sin(0.5))
    np.testing.assert_allclose(arc, 9.1525828, rtol=1e-7)
    logits = af.margin_logits(cos, target)
    np.testing.assert_allclose(logits[0], [arc, 64 * 0.2], rtol=1e-6)
    np.testing.assert_allclose(logits[1, 0], 64 * 0.2, rtol=1e-6)
    # theta + m > pi: no threshold (insightface's current CombinedMarginLoss): cos(theta + m) itself.
    np.testing.assert_allclose(logits[1, 1], 64 * math.cos(math.acos(-0.95) + 0.5), rtol=1e-5)
    np.testing.assert_allclose(af.margin_logits(cos, target, af.COSFACE)[0], [64 * 0.2, 64 * 0.2], rtol=1e-6)
    np.testing.assert_allclose(af.margin_logits(cos, target, COMBINED, scale=30.0)[0, 0],
                               30 * (math.cos(0.9 * math.acos(0.6) + 0.4) - 0.15), rtol=1e-6)
    # Gradient w.r.t. the target cosine: s (straight-through, as insightface) or exact.
    grad = lambda **kw: jax.grad(lambda c: af.margin_logits(c, jnp.array(True), **kw))(jnp.float32(0.6))  # noqa: E731
    np.testing.assert_allclose(grad(), 64.0, rtol=1e-6)
    np.testing.assert_allclose(grad(straight_through=False), 64 * math.sin(math.acos(0.6) + 0.5) / 0.8, rtol=1e-5)
    # cos = +-1 stays finite (clipped before arccos).
    edge = af.margin_logits(jnp.array([1.0, -1.0]), jnp.array([True, True]))
    assert np.isfinite(edge).all()
    assert np.isfinite(jax.grad(lambda c: af.margin_logits(c, jnp.array(True), straight_through=False))(1.0))


@pytest.mark.parametrize("margins", [af.ARCFACE, af.COSFACE, COMBINED])
@pytest.mark.parametrize("straight_through", [True, False])
def test_reference_matches_plain_log_softmax(margins, straight_through):
    emb, labels, weight = _data()

    def plain(e, w):
        cos = (e / jnp.linalg.norm(e, axis=1, keepdims=True)) @ (w / jnp.linalg.norm(w, axis=1, keepdims=True)).T
        onehot = jax.nn.one_hot(labels, w.shape[0])
        logits = af.margin_logits(cos, onehot, margins, straight_through=straight_through)
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=1)), jnp.mean(cos.argmax(1) == labels)

    (ref, ref_acc), ref_grads = jax.jit(jax.value_and_grad(plain, (0, 1), has_aux=True))(emb, weight)
    (loss, acc), grads = jax.jit(jax.value_and_grad(
        lambda e, w: af.margin_loss(e, labels, w, margins, straight_through=straight_through, with_accuracy=True),
        (0, 1), has_aux=True))(emb, weight)
    assert _rel(loss, ref) < 1e-6 and acc == ref_acc
    assert max(_rel(g, r) for g, r in zip(grads, ref_grads)) < 1e-5


def test_sharded_on_one_device_and_argument_checks():
    emb, labels, weight = _data()
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    loss = jax.jit(lambda e, w: af.sharded_margin_loss(e, labels, w, mesh))(emb, weight)
    assert _rel(loss, af.margin_loss(emb, labels, weight)) < 1e-6
    assert af.num_sampled(8, 0.5) == 4 and af.num_sampled(10, 0.25) == 3 and af.num_sampled(8, 1.0) == 8
    with pytest.raises(ValueError, match="PRNG key"):
        af.sharded_margin_loss(emb, labels, weight, mesh, sample_rate=0.5)
    with pytest.raises(ValueError, match="not in the mesh"):
        af.sharded_margin_loss(emb, labels, weight, mesh, class_axis="fsdp")
    with pytest.raises(ValueError, match="sample_rate"):
        af.num_sampled(8, 0.0)


@pytest.mark.slow
def test_sharded_loss_matches_unsharded_on_8_devices(parity):
    errors = _eight_devices("parity")
    for mesh_name in ("model=8", "data=2,model=4", "both axes"):
        for what in ("loss", "grads"):
            error = max(v for k, v in errors.items() if k.startswith(mesh_name + " ") and k.endswith(what))
            parity(f"arcface sharded {what} vs unsharded ({mesh_name})", error, 1e-5)
    parity("arcface sharded exact-gradient loss+grads vs unsharded", max(errors["exact-gradient loss"],
                                                                         errors["exact-gradient grads"]), 1e-5)


@pytest.mark.slow
def test_partial_fc_on_8_devices(parity):
    out = _eight_devices("partial_fc")
    parity("arcface partial FC rate 1 vs full (model=8)", max(out["rate 1 loss"], out["rate 1 grads"]), 1e-5)
    for mesh_name, shards in (("model=8", 8), ("data=2,model=4", 4)):
        result = out[f"{mesh_name} rate 0.5"]
        assert result["finite"]
        # ceil(0.5 * local classes) rows per shard get a gradient, every positive among them.
        assert result["rows_per_shard"] == [64 // shards // 2] * shards
        assert result["positives_updated"]
        parity(f"arcface partial FC 0.5 vs loss on sampled rows ({mesh_name})", result["loss_vs_subset"], 1e-5)
    assert out["init"]["spec"] in ("P('model', None)", "PartitionSpec('model', None)")
    assert out["init"]["shard_shapes"] == [[1024, 48]]
    assert abs(out["init"]["std"] - 0.01) < 5e-4
