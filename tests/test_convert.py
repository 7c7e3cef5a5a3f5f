"""Weight interop: Flax <-> official PyTorch layouts, strict errors, the weights directory and CLI."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as ref
from f2d_jax import convert
from f2d_jax.convert.__main__ import main as convert_main
from f2d_jax.convert.weights_dir import load_weights_dir, save_weights_dir
from f2d_jax.models import ExpressionEncoder, MappingNetwork, MSIDEncoder

TINY = {
    "msid": (MSIDEncoder(width=32, depth=3, num_heads=2, tap_layers=(0, 2)),
             lambda: ref.MSID(width=32, depth=3, heads=2, taps=(0, 2))),
    "mapping": (MappingNetwork(identity_dim=64, expression_dim=8, hidden_dim=16, token_dim=12),
                lambda: ref.Mapping(identity=64, hidden=16, out=12, exp=8)),
    "expression": (ExpressionEncoder(layers=(1, 1, 1, 1), width=8), lambda: ref.ReconNet((1, 1, 1, 1), 8)),
}


def _random_variables(name, module, seed=0):
    """Random values in every leaf (BatchNorm statistics and null_exp included)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype),
                        convert.checkpoints.abstract_variables(module, name))


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".msgpack"])
@pytest.mark.parametrize("name", ["msid", "mapping", "expression"])
def test_flax_to_file_to_flax_is_bit_exact(tmp_path, name, suffix):
    module, _ = TINY[name]
    variables = _random_variables(name, module)
    path = convert.save(name, variables, tmp_path / f"{name}{suffix}", module)
    _assert_same_tree(convert.load(name, path, module), variables)


@pytest.mark.slow
def test_official_size_round_trip_through_pt(tmp_path):
    for name, module in [("msid", MSIDEncoder()), ("mapping", MappingNetwork())]:
        variables = _random_variables(name, module, seed=1)
        save = {"msid": convert.save_msid, "mapping": convert.save_mapping}[name]
        load = {"msid": convert.load_msid, "mapping": convert.load_mapping}[name]
        _assert_same_tree(load(save(variables, tmp_path / f"{name}.pt")), variables)


@pytest.mark.parametrize("name", ["msid", "mapping", "expression"])
@pytest.mark.slow
def test_exported_pt_loads_strictly_into_the_official_module(tmp_path, name):
    module, torch_module = TINY[name]
    variables = _random_variables(name, module)
    path = convert.save(name, variables, tmp_path / f"{name}.pt", module)
    reference = torch_module()
    reference.load_state_dict(torch.load(path, weights_only=True), strict=True)
    reference.eval()
    shape = {"msid": (2, 112, 112, 3), "mapping": (2, module.identity_dim if name == "mapping" else 0),
             "expression": (2, 224, 224, 3)}[name]
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    ours = module.apply(variables, x)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(x if x.ndim == 2 else x.transpose(0, 3, 1, 2)))
    for a, b in zip(jax.tree.leaves(ours), theirs if isinstance(theirs, tuple) else [theirs]):
        np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_official_keys_survive_import_and_export(tmp_path):
    torch_model = ref.randomize(ref.MSID(), seed=4)
    torch.save(torch_model.state_dict(), tmp_path / "msid.pt")
    exported = convert.torch_state_dict("msid", convert.load_msid(tmp_path / "msid.pt"))
    original = torch_model.state_dict()
    assert list(exported) == list(original) or set(exported) == set(original)
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):  # Flax keeps no counter; exported as 0
            assert exported[key] == 0
        else:
            np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)


def test_mismatches_are_listed(tmp_path):
    state = ref.randomize(ref.Mapping()).state_dict()
    state.pop("null_exp")
    state["i2t_first.extra.weight"] = torch.zeros(3)
    state["i2t_last.fc_out.weight"] = torch.zeros(700, 1536)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(convert.CheckpointMismatchError) as info:
        convert.load_mapping(tmp_path / "bad.pt")
    message = str(info.value)
    assert "bad.pt does not match the model" in message
    assert "1 missing keys: null_exp" in message
    assert "1 unexpected keys: i2t_first.extra.weight" in message
    assert "i2t_last.fc_out.weight (700, 1536) (model wants (768, 1536))" in message
    assert info.value.missing == ["null_exp"]


def test_msid_with_other_taps_is_a_listed_mismatch(tmp_path):
    torch.save(ref.MSID(width=32, depth=3, heads=2, taps=(0, 2)).state_dict(), tmp_path / "msid.pt")
    with pytest.raises(convert.CheckpointMismatchError, match=r"6 missing keys: norms\.layer_1\.0\.bias.*\n.*6 unexpected keys: norms\.layer_2\.0"):
        convert.load_msid(tmp_path / "msid.pt", MSIDEncoder(width=32, depth=3, num_heads=2, tap_layers=(0, 1)))


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight file at .*nothing.pt"):
        convert.load_mapping(tmp_path / "nothing.pt")
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown weight format '\.h5'"):
        convert.load_mapping(tmp_path / "weights.h5")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken.pt is not a readable PyTorch checkpoint: it is damaged, truncated "
                                         r"or of another format \(UnpicklingError\)$"):
        convert.load_mapping(tmp_path / "broken.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole module, not a state dict
    with pytest.raises(ValueError, match="module.pt pickles Python objects beside its tensors"):
        convert.load_mapping(tmp_path / "module.pt")
    state = ref.Mapping(identity=128, hidden=64, out=32).state_dict()
    state["i2t_last.layers.1.0.bias"][3] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(convert.NonFiniteWeightsError, match=r"mapping weights .*inf.pt: 1 tensor\(s\) hold NaN or "
                                                            r"infinite values \(i2t_last.layers.1.0.bias\)"):
        convert.load_mapping(tmp_path / "inf.pt", MappingNetwork(identity_dim=128, hidden_dim=64, token_dim=32))
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        convert.load_expression(tmp_path / "no_tensors.pt")


def _broken_safetensors(tmp_path, how: str):
    """An empty .safetensors file, or a real mapping checkpoint cut in half."""
    path = tmp_path / f"{how}.safetensors"
    if how == "empty":
        path.write_bytes(b"")
    else:
        module, _ = TINY["mapping"]
        whole = convert.save("mapping", _random_variables("mapping", module), tmp_path / "whole.safetensors", module)
        path.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    return path


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_broken_safetensors_is_a_value_error(tmp_path, how):
    path = _broken_safetensors(tmp_path, how)
    with pytest.raises(ValueError, match=f"{path.name} could not be read as safetensors .empty, truncated"):
        convert.load("mapping", path)


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_cli_broken_safetensors_is_one_error_line(tmp_path, capsys, how):
    path = _broken_safetensors(tmp_path, how)
    for argv in (["inspect", str(path)], ["import", "--msid", str(path), "--out", str(tmp_path / "w")],
                 ["import", "--mapping", str(path), "--out", str(tmp_path / "w")]):
        assert convert_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path} could not be read as safetensors") and len(err.splitlines()) == 1
    assert not (tmp_path / "w" / "f2d_weights.json").exists()


def test_bfloat16_safetensors_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)}, tmp_path / "bf16.safetensors")
    state = convert.read_state_dict(tmp_path / "bf16.safetensors")
    assert state["w"].dtype == np.float32
    np.testing.assert_array_equal(state["w"], [1.5, -2.0, 3.25])


def test_weights_directory_round_trip_and_incomplete_directory(tmp_path):
    models = {name: (module, _random_variables(name, module)) for name, (module, _) in TINY.items()}
    save_weights_dir(tmp_path / "w", models)
    loaded = load_weights_dir(tmp_path / "w")
    for name, (module, variables) in models.items():
        assert loaded[name][0] == module
        _assert_same_tree(loaded[name][1], variables)
    (tmp_path / "w" / "f2d_weights.json").unlink()
    with pytest.raises(FileNotFoundError, match="not an f2d-jax weights directory"):
        load_weights_dir(tmp_path / "w")


@pytest.mark.slow
def test_cli_import_export_inspect(tmp_path, capsys):
    mapping = ref.randomize(ref.Mapping(), seed=5)
    torch.save(mapping.state_dict(), tmp_path / "mapping.pt")
    recon = ref.randomize(ref.ReconNet(), seed=6)
    torch.save({"net_recon": recon.state_dict(), "epoch": 20}, tmp_path / "epoch_20.pth")
    assert convert_main(["import", "--mapping", str(tmp_path / "mapping.pt"), "--expression",
                         str(tmp_path / "epoch_20.pth"), "--out", str(tmp_path / "weights")]) == 0
    assert convert_main(["export", str(tmp_path / "weights"), "--out", str(tmp_path / "exported"),
                         "--format", "safetensors"]) == 0
    for name, module in [("mapping.safetensors", mapping), ("net_recon.safetensors", recon)]:
        back = convert.read_state_dict(tmp_path / "exported" / name)
        module.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    capsys.readouterr()
    assert convert_main(["inspect", str(tmp_path / "exported" / "mapping.safetensors")]) == 0
    assert "i2t_first.layers.0.0.weight" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    torch.save(ref.Mapping(hidden=8).state_dict(), tmp_path / "small.pt")
    assert convert_main(["import", "--mapping", str(tmp_path / "small.pt"), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mapping weights") and "shape mismatches" in err and "Traceback" not in err
    assert convert_main(["import", "--out", str(tmp_path / "w")]) == 2
    assert "nothing to import" in capsys.readouterr().err
    assert not (tmp_path / "w" / "f2d_weights.json").exists()


def test_cli_import_with_config_sizes(tmp_path):
    torch.save(ref.randomize(ref.MSID(width=32, depth=4, heads=2, taps=(0, 1, 2, 3))).state_dict(),
               tmp_path / "msid.pt")
    assert convert_main(["import", "--msid", str(tmp_path / "msid.pt"), "--config", "configs/tiny.py",
                         "--out", str(tmp_path / "w")]) == 0
    module, variables = load_weights_dir(tmp_path / "w")["msid"]
    assert module == MSIDEncoder(width=32, depth=4, num_heads=2, tap_layers=(0, 1, 2, 3))
    assert module.apply(variables, jnp.zeros((1, 112, 112, 3))).shape == (1, 128)


def _convert_imports(path: Path) -> set[str]:
    """The f2d_jax.convert modules that the file imports, at the top or inside a function."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
    return {t.split(".")[2] for t in targets if t.startswith("f2d_jax.convert.")}


def test_convert_modules_import_one_way():
    modules = {p.stem: _convert_imports(p) for p in Path(convert.__file__).parent.glob("*.py")
               if not p.stem.startswith("__")}
    assert modules["weights_dir"] >= {"checkpoints"}
    assert [(a, b) for a in modules for b in modules[a] if a in modules.get(b, ())] == []


def test_cli_import_adds_to_a_weights_directory(tmp_path, capsys):
    torch.save(ref.randomize(ref.MSID(width=32, depth=4, heads=2, taps=(0, 1, 2, 3))).state_dict(),
               tmp_path / "msid.pt")
    for seed in (1, 2):
        torch.save(ref.randomize(ref.Mapping(identity=128, hidden=64, out=32), seed=seed).state_dict(),
                   tmp_path / f"mapping{seed}.pt")
    out = tmp_path / "w"

    def run(*argv):
        return convert_main(["import", *argv, "--config", "configs/tiny.py", "--out", str(out)])

    assert run("--msid", str(tmp_path / "msid.pt")) == 0
    assert run("--mapping", str(tmp_path / "mapping1.pt")) == 0
    loaded = load_weights_dir(out)
    assert sorted(loaded) == ["mapping", "msid"]
    _assert_same_tree(loaded["mapping"][1], convert.load_mapping(tmp_path / "mapping1.pt", loaded["mapping"][0]))
    _assert_same_tree(loaded["msid"][1], convert.load_msid(tmp_path / "msid.pt", loaded["msid"][0]))

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert run("--mapping", str(tmp_path / "mapping2.pt")) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} already holds mapping; pass --overwrite to replace it\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert run("--mapping", str(tmp_path / "mapping2.pt"), "--overwrite") == 0
    loaded = load_weights_dir(out)
    assert sorted(loaded) == ["mapping", "msid"]
    _assert_same_tree(loaded["mapping"][1], convert.load_mapping(tmp_path / "mapping2.pt", loaded["mapping"][0]))


def test_io_imports_neither_jax_nor_flax():
    script = ("import sys; from f2d_jax.convert import io; "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax'}))")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_cli_prints_a_mismatch_whole(tmp_path, capsys):
    torch.save(ref.Mapping(hidden=8).state_dict(), tmp_path / "small.pt")
    with pytest.raises(convert.CheckpointMismatchError) as info:
        convert.load_mapping(tmp_path / "small.pt")
    assert convert_main(["import", "--mapping", str(tmp_path / "small.pt"), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {info.value}\n" and len(err.splitlines()) > 1


def test_cli_name_os_errors_missing_torch_and_ctrl_c(tmp_path, capsys, monkeypatch):
    import f2d_jax.convert.__main__ as convert_cli
    from f2d_jax.convert import io

    with pytest.raises(SystemExit):
        convert_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: f2d-convert ")

    torch.save(ref.Mapping(identity=128, hidden=64, out=32).state_dict(), tmp_path / "mapping.pt")
    (tmp_path / "taken").write_text("")
    assert convert_main(["import", "--mapping", str(tmp_path / "mapping.pt"), "--config", "configs/tiny.py",
                         "--out", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'taken'} cannot be written: {tmp_path / 'taken'} is "
                                       "a file, not a directory\n")

    def no_torch():
        raise ImportError("reading or writing PyTorch .pt files needs torch")

    monkeypatch.setattr(io, "_torch", no_torch)
    assert convert_main(["inspect", str(tmp_path / "mapping.pt")]) == 2
    assert capsys.readouterr().err == "error: reading or writing PyTorch .pt files needs torch\n"

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_cli, "_inspect", interrupted)
    assert convert_main(["inspect", str(tmp_path / "mapping.pt")]) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"
