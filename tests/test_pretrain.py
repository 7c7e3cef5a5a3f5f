"""MSID pretraining (config.task = "msid_arcface"): the tiny config learns its synthetic
identities, resumes exactly, exports to the official msid.pt layout, and trains the same with
the classifier split over 8 simulated devices."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from f2d_jax.cli.sample import main as sample_main
from f2d_jax.config import load_config
from f2d_jax.convert import load
from f2d_jax.convert.__main__ import main as convert_main
from f2d_jax.models.msid import MSIDEncoder
from f2d_jax.pretrain.data import SyntheticIdentities
from f2d_jax.pretrain.verify import main as verify_main
from f2d_jax.train.launch import run
from f2d_jax.train.state import learning_rate
from f2d_jax.workdir import load_trained

ROOT = Path(__file__).resolve().parent.parent
MSID_TINY = str(ROOT / "configs" / "msid_tiny.py")


def _metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_polynomial_schedule():
    schedule = learning_rate({"lr": 1.0, "warmup_steps": 10, "schedule": "polynomial", "power": 2.0}, 110)
    np.testing.assert_allclose([schedule(5), schedule(10), schedule(60), schedule(110)], [0.5, 1.0, 0.25, 0.0],
                               atol=1e-6)


def test_synthetic_identities_are_deterministic_and_pairs_held_out():
    source = SyntheticIdentities(4, 64, seed=0)
    batch = source.get([5, 6])
    assert batch["image"].shape == (2, 112, 112, 3) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["label"], [1, 2])
    np.testing.assert_array_equal(source.get([5])["image"][0], batch["image"][0])
    images, issame = source.verification_pairs(10)
    assert images.shape == (20, 112, 112, 3) and issame.sum() == 5
    assert not any((images[0] == source.get([i])["image"][0]).all() for i in range(64))


@pytest.mark.slow
def test_msid_tiny_trains_resumes_and_exports(tmp_path, capsys):
    overrides = ["train.steps=20", "checkpoint.every=10", "log.every=5", "log.verify_every=10"]
    config = load_config(MSID_TINY, overrides)
    assert config.task == "msid_arcface"
    full = tmp_path / "full"
    assert run(config, full) == 0
    err = capsys.readouterr().err
    assert "compiled the train step in" in err
    metrics = _metrics(full)
    train = [m for m in metrics if "loss" in m]
    verification = [m for m in metrics if "verification/synthetic" in m]
    assert [m["step"] for m in train] == [5, 10, 15, 20]
    assert [m["step"] for m in verification] == [10, 20]
    for name in ("loss", "accuracy", "grad_norm", "lr", "step_time", "examples_per_second"):
        assert all(np.isfinite(m[name]) for m in train), name
    print("losses", [round(m["loss"], 3) for m in train], "accuracy", [round(m["accuracy"], 3) for m in train],
          "verification", [m["verification/synthetic"] for m in verification])
    assert train[-1]["loss"] < 0.8 * train[0]["loss"]
    assert verification[-1]["verification/synthetic"] > 0.85  # chance: 0.5 (0.915 when written)
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["10", "20"]

    # Resume: a run interrupted at step 10 continues to the same parameters.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "10", resumed / "checkpoints" / "10")
    assert run(config, resumed) == 0
    assert "resumed from" in capsys.readouterr().err
    _, trained, step = load_trained(full)
    _, again, _ = load_trained(resumed)
    assert step == 20 and set(trained) == {"msid", "classifier"}
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(trained), jax.tree.leaves(again)):
        np.testing.assert_allclose(y, x, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))

    # Export: msid.pt in the official layout, loading to the trained features.
    assert convert_main(["export", str(full), "--out", str(tmp_path / "export")]) == 0
    exported = tmp_path / "export" / "msid.pt"
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["msid.pt"]
    model = MSIDEncoder(**config.model.msid)
    variables = load("msid", exported, model)
    faces = jnp.asarray(SyntheticIdentities(16, 16).get(range(4))["image"], jnp.float32) / 127.5 - 1
    np.testing.assert_allclose(model.apply(variables, faces), model.apply(trained["msid"], faces), atol=1e-5)
    # The running statistics trained (they start at mean 0, variance 1).
    assert np.abs(np.asarray(trained["msid"]["batch_stats"]["tap_0"]["batch_norm"]["mean"])).max() > 1e-3

    # Sampling from it is refused with what the run holds and what to do with it.
    face = str(ROOT / "f2d_jax" / "assets" / "face.jpg")
    assert sample_main(["--checkpoint", str(full), "--image", face, "--prompt", "a photo of f l",
                        "--out", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {full} is an MSID pretraining run (task msid_arcface): it holds MSID weights, "
                          f"not a mapping network. Export them with `f2d-convert export {full} --out DIR` and give "
                          "DIR/msid.pt as --msid"), err
    assert not (tmp_path / "out.png").exists()
    assert convert_main(["package", str(full), "--out", str(tmp_path / "model")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {full} is an MSID pretraining run (task msid_arcface)")
    assert not (tmp_path / "model").exists()


def _train(workdir, *overrides, devices=1):
    import os
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, str(ROOT / "train.py"), "--config", MSID_TINY, "--workdir", str(workdir),
               "--config.train.steps=3", "--config.log.every=1", "--config.log.verify_every=0", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return _metrics(workdir)


@pytest.mark.slow
def test_classifier_split_over_8_devices_matches_one_device(tmp_path):
    single = _train(tmp_path / "single")
    sharded = _train(tmp_path / "sharded", "--config.mesh.data=4", "--config.mesh.fsdp=2",
                     "--config.mesh.params=fsdp", devices=8)
    assert [m["step"] for m in sharded] == [1, 2, 3]
    for a, b in zip(single, sharded):
        for name in ("loss", "accuracy", "grad_norm"):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, err_msg=f"{name} at step {a['step']}")
    # (Parameters are not compared: Adam's first steps turn float32 noise in near-zero gradients into
    # updates of size lr; the step-3 loss, a function of the step-2 update (the first with lr > 0), is compared above.)


# ------------------------------------------------------------------ real data formats and the verify command

@pytest.fixture(scope="module")
def identity_data(tmp_path_factory):
    """16 synthetic identities x 16 images as (a folder per identity -> f2d_identities dataset, the
    same images as an insightface pack, a .bin of 200 held-out pairs)."""
    from f2d_jax.data.identities import build_identities
    from f2d_jax.data.recordio import encode_image, write_face_recordio
    from f2d_jax.data.verification import write_bin

    root = tmp_path_factory.mktemp("identities")
    synthetic = SyntheticIdentities(16, 256, seed=0)
    batch = synthetic.get(range(256))
    for i, (image, label) in enumerate(zip(batch["image"], batch["label"])):
        path = root / "faces" / f"id{label:02d}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_image(image, ".png"))
    build_identities(root / "faces", root / "dataset", progress=False)
    write_face_recordio(root / "pack", batch["image"], batch["label"])   # grouped by label, as the folders
    write_bin(root / "pairs.bin", *synthetic.verification_pairs(200))
    return root


def _data_config(data_dir, pairs, *overrides):
    return load_config(MSID_TINY, [f"data.dir={data_dir}", f"data.verification=('{pairs}',)",
                                   "arcface.num_identities=0", "log.every=1", *overrides])


@pytest.mark.slow
def test_trains_on_an_identity_dataset_with_partial_fc_and_a_pack_alike(identity_data, tmp_path, capsys):
    """The tiny MSID learns 16 identities from an f2d_identities dataset with Partial FC (half the
    classes scored per step), verified on a .bin; the same images as a RecordIO pack train identically."""
    pairs = identity_data / "pairs.bin"
    config = _data_config(identity_data / "dataset", pairs, "arcface.sample_rate=0.5", "train.steps=30",
                          "log.verify_every=30", "checkpoint.every=30")
    workdir = tmp_path / "dataset"
    assert run(config, workdir) == 0
    metrics = _metrics(workdir)
    accuracy = [m["verification/pairs"] for m in metrics if "verification/pairs" in m]
    train = [m for m in metrics if "loss" in m]
    with capsys.disabled():
        print("\nlosses", [round(m["loss"], 3) for m in train[::5]], "verification", accuracy)
    assert len(accuracy) == 1 and accuracy[0] > 0.8  # chance: 0.5
    saved, params, _ = load_trained(workdir)
    assert saved["arcface"]["num_identities"] == 16 and params["classifier"].shape == (16, 128)

    pack = _data_config(identity_data / "pack", pairs, "arcface.sample_rate=0.5", "train.steps=3",
                        "log.verify_every=0")
    assert run(pack, tmp_path / "pack") == 0
    for a, b in zip(train[:3], _metrics(tmp_path / "pack")):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-6)

    # The verify command gives the accuracy training logged, from the workdir and from msid.pt.
    capsys.readouterr()
    out = tmp_path / "verify.json"
    assert verify_main(["--msid", str(workdir), str(pairs), "--json", str(out)]) == 0
    assert "pairs    200" in capsys.readouterr().out
    result = json.loads(out.read_text())["sets"]["pairs"]
    assert result["pairs"] == 200 and result["accuracy"] == pytest.approx(accuracy[0], abs=1e-9)
    assert convert_main(["export", str(workdir), "--out", str(tmp_path / "export")]) == 0
    assert verify_main(["--msid", str(tmp_path / "export" / "msid.pt"), "--config", MSID_TINY, str(pairs),
                        "--json", str(out)]) == 0
    assert json.loads(out.read_text())["sets"]["pairs"]["accuracy"] == pytest.approx(accuracy[0], abs=1e-9)

    # Its errors.
    capsys.readouterr()
    not_bin = tmp_path / "notes.bin"
    not_bin.write_text("not a pickle")
    for argv, message in [
        (["--msid", str(workdir), str(tmp_path / "lfw.bin")], f"no verification file at {tmp_path / 'lfw.bin'}"),
        (["--msid", str(tmp_path / "nothing"), str(pairs)], f"--msid {tmp_path / 'nothing'} does not exist"),
        (["--msid", str(workdir), str(not_bin)], "not an insightface verification .bin"),
        (["--msid", str(tmp_path / "export" / "msid.pt"), str(pairs)],   # (then the mismatched keys)
         f"--msid {tmp_path / 'export' / 'msid.pt'} does not fit MSID of the sizes of the official "
         "msid_base_patch8_112 (other sizes: pass their config with --config): msid weights"),
        (["--msid", str(workdir), "--folds", "300", str(pairs)], "has 200 pairs, fewer than --folds 300"),
    ]:
        assert verify_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err.splitlines()[0], err


def test_data_dir_errors(identity_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    pairs = identity_data / "pairs.bin"
    for data_dir, overrides, message in [
        (tmp_path / "empty", (), f"data.dir {tmp_path / 'empty'} is not an identity dataset: give an f2d_identities "
                                 "dataset (built with `f2d-identities"),
        (tmp_path / "missing", (), f"data.dir {tmp_path / 'missing'} is missing"),
        (identity_data / "dataset", ("arcface.num_identities=10",),
         f"{identity_data / 'dataset'} has 16 identities but arcface.num_identities=10; raise it"),
    ]:
        assert run(_data_config(data_dir, pairs, *overrides), tmp_path / "run") == 2
        err = capsys.readouterr().err
        assert f"error: {message}" in err, err


# ------------------------------------------------------------------ parity of the training loss with PyTorch

@pytest.mark.slow
def test_msid_arcface_loss_and_gradients_match_pytorch(tmp_path, parity):
    """The pretraining objective (MSID in train mode -> ArcFace s=64 m=0.5 over the classifier ->
    cross-entropy) against the official MSID in plain torch with insightface's CombinedMarginLoss
    (cos clamped, the margin under no_grad): loss, every gradient, and the updated running statistics."""
    import torch
    import torch.nn.functional as F

    import torch_reference as ref
    from f2d_jax import convert
    from f2d_jax.arcface import sharded_margin_loss
    from f2d_jax.pretrain.step import to_unit_range
    from f2d_jax.sharding import AXES

    sizes = dict(width=48, depth=4, num_heads=4, tap_layers=(1, 3))
    torch_msid = ref.randomize(ref.MSID(width=48, depth=4, heads=4, taps=(1, 3)), seed=3).train()
    torch.save(torch_msid.state_dict(), tmp_path / "msid.pt")
    model = MSIDEncoder(**sizes)
    variables = convert.load_msid(tmp_path / "msid.pt", model)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 112, 112, 3), dtype=np.uint8)
    labels = np.array([0, 3, 3, 7, 1, 9, 0, 5], np.int32)
    weight = rng.normal(0, 0.05, (10, model.features)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), AXES)

    def loss_fn(params, batch_stats, classifier):
        embeddings, updates = model.apply({"params": params, "batch_stats": batch_stats}, to_unit_range(images),
                                          train=True, mutable=["batch_stats"])
        loss = sharded_margin_loss(embeddings, jnp.asarray(labels), classifier, mesh, (1.0, 0.5, 0.0), 64.0,
                                   class_axis=AXES, batch_axis=AXES)
        return loss, updates["batch_stats"]

    (loss, stats), (grads, grad_w) = jax.jit(jax.value_and_grad(loss_fn, (0, 2), has_aux=True))(
        variables["params"], variables["batch_stats"], jnp.asarray(weight))

    w = torch.nn.Parameter(torch.from_numpy(weight))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    cos = F.linear(F.normalize(torch_msid(x)), F.normalize(w)).clamp(-1, 1)
    target = torch.from_numpy(labels).long()
    with torch.no_grad():   # insightface CombinedMarginLoss, m1 = 1, m3 = 0: arccos, + m2, cos, in place
        chosen = cos.gather(1, target[:, None])
        delta = torch.cos(torch.acos(chosen) + 0.5) - chosen
    theirs = F.cross_entropy(64.0 * cos.scatter_add(1, target[:, None], delta), target)
    theirs.backward()

    # Our gradients and running statistics in the official layout, key by key.
    ours = convert.torch_state_dict("msid", {"params": grads, "batch_stats": stats}, model)
    # (Relative to the largest gradient of the model: some are 0 up to rounding, e.g. the last block's fc2 bias,
    # a constant shift of the tapped CLS token that the train-mode BatchNorm subtracts again.)
    named = [(k, p.grad.numpy()) for k, p in torch_msid.named_parameters() if not k.startswith("norm.")]
    scale = max(np.max(np.abs(g)) for _, g in named)
    grad_errors = [float(np.max(np.abs(ours[k] - g))) / scale for k, g in named]
    stat_errors = [float(np.max(np.abs(ours[k] - b.numpy()))) for k, b in torch_msid.named_buffers()
                   if k.endswith(("running_mean", "running_var"))]
    assert len(grad_errors) == len(list(torch_msid.parameters())) - 2 and len(stat_errors) == 4  # all but norm.*
    parity("MSID pretraining ArcFace loss (train-mode MSID)", abs(float(loss) - theirs.item()), 1e-4)
    parity("MSID pretraining gradients, MSID (worst, relative to the largest)", max(grad_errors), 1e-4)
    parity("MSID pretraining gradient, classifier (relative to max)",
           float(np.max(np.abs(grad_w - w.grad.numpy())) / np.max(np.abs(w.grad.numpy()))), 1e-4)
    parity("MSID pretraining running statistics after the step", max(stat_errors), 1e-4)
