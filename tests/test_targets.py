"""Compiled for the chips: the tiny configs' programs built from abstract parameters and compiled for TPU
slices by libtpu on this CPU host (and, with the `gpu` extra, for H100s by XLA's GPU compiler: the tests
marked `gpu`, which `make test-gpu` runs), what the compiler says of them, the kernels in them, a batch too
large reported as not fitting, and the command line's mistakes."""
import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from f2d_jax import compiled, targets
from f2d_jax.config import load_config

TPU_KERNEL = "tpu_custom_call"   # a Mosaic (Pallas) kernel in the compiled program
CUDNN_ATTENTION = "__cudnn$fmha"  # cuDNN's fused attention


@pytest.fixture(autouse=True, scope="module")
def default_matmul_precision():
    """The precision programs compile with (conftest asks "highest" for the CPU parity tests; Mosaic multiplies
    bfloat16 at the default one only)."""
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", None)
    yield
    jax.config.update("jax_default_matmul_precision", before)


def _compile(build, target="v5e-4", batch=2):
    return compiled.compile_all(targets.parse(target), build, batch, log=lambda msg: None)


def test_targets_name_slices_and_gpus():
    """Devices, hosts and slices as the chips' own compilers describe them."""
    for name, (devices, hosts, kind) in {"v5e-8": (8, 1, "TPU v5 lite"), "v5e-16": (16, 4, "TPU v5 lite"),
                                         "2xv5e-16": (32, 8, "TPU v5 lite"), "v4-8": (4, 1, "TPU v4"),
                                         "v5p-16": (8, 2, "TPU v5"), "v6e-4": (4, 1, "TPU v6 lite")}.items():
        found = targets.devices(targets.parse(name))
        assert (len(found), len({d.process_index for d in found}), found[0].device_kind) == (devices, hosts, kind)
        assert {d.platform for d in found} == {"tpu"}
    assert targets.parse("2xh100x8").num_devices == 16 and targets.parse("h100").num_devices == 1
    with pytest.raises(ValueError, match=r"^unknown target 'v5e-3': v5e comes as v5e-\{1, 4, 8, 16, 32, 64, 128, "
                                         r"256\}; known targets: v4-\{8,16,"):
        targets.parse("v5e-3")
    with pytest.raises(ValueError, match=r"^unknown target 'v7-8'; known targets: .*2xv5e-256, 2xh100x8$"):
        targets.parse("v7-8")


def test_the_platform_and_dtype_come_from_the_mesh_not_the_host():
    from jax.sharding import Mesh

    from f2d_jax.models import attention as attn
    from f2d_jax.bundle import compute_dtype

    mesh = Mesh(np.asarray(targets.devices(targets.parse("v5e-4"))), ("data",))
    assert targets.platform() == "cpu" and compute_dtype("auto") == jnp.float32
    assert targets.platform(mesh) == "tpu" and compute_dtype("auto", targets.platform(mesh)) == jnp.bfloat16
    q = jax.ShapeDtypeStruct((1, 77, 2, 64), jnp.bfloat16)
    seen = {}

    def resolve(q):
        seen["platform"], seen["attention"] = targets.platform(), attn.resolve("auto", q, q)
        return q

    jax.eval_shape(targets.on_mesh(resolve, mesh), q)
    assert seen == {"platform": "tpu", "attention": "pallas"}
    assert attn.resolve("auto", q, q) == "cpu"  # off the mesh, the host's


@pytest.fixture(scope="module")
def tiny_train():
    """The tiny config's train step in bfloat16 (dtype "auto"), compiled for a v5e-4."""
    from f2d_jax.train.loop import target_programs

    config = load_config("tiny", ["train.compute_dtype=auto"])
    return _compile(functools.partial(target_programs, config))[0]


@pytest.mark.slow
def test_the_train_step_compiles_for_a_tpu_slice_with_the_pallas_kernel(tiny_train):
    row = tiny_train
    assert (row["program"], row["target"], row["devices"], row["batch_per_device"]) == ("train step", "v5e-4", 4, 2)
    assert row["fits"] and row["memory"] == 16 * 2 ** 30 and row["note"] == ""
    assert 0 < row["arguments"] < row["total"] < 2 ** 27 and row["temporaries"] > 0
    text = row["compiled"].as_text()
    assert text.count(TPU_KERNEL) >= row["kernels"] >= 6  # flash attention forward and backward: UNet self-
    # and cross-attention, CLIP
    assert "bf16" in text and row["flops"] > 0
    # the batch is split over the 4 chips: the kernels run per chip (shard_map), no all-gather of activations
    assert "all-gather" not in text


@pytest.mark.slow
def test_the_train_step_compiles_for_two_pod_slices():
    """Two v5e-256 slices joined over the data-centre network: 512 chips on 128 hosts, the batch over all of
    them, the gradients summed across the slices."""
    from f2d_jax.train.loop import target_programs

    row = _compile(functools.partial(target_programs, load_config("tiny")), target="2xv5e-256", batch=1)[0]
    assert (row["devices"], row["batch_per_device"], row["fits"]) == (512, 1, True) and row["kernels"] >= 6
    assert "all-reduce" in row["compiled"].as_text()
    found = targets.devices(targets.parse("2xv5e-256"))
    assert len({d.process_index for d in found}) == 128 and {d.slice_index for d in found} == {0, 1}


@pytest.mark.slow
def test_sampling_and_msid_programs_compile_for_a_tpu_slice():
    from f2d_jax.pretrain.loop import target_programs as msid_programs
    from f2d_jax.sampling.pipeline import target_programs

    step, decode = _compile(functools.partial(target_programs, load_config("tiny")))
    assert (step["program"], decode["program"]) == ("denoising step", "decode")
    assert step["fits"] and decode["fits"] and TPU_KERNEL in step["compiled"].as_text()
    msid = _compile(functools.partial(msid_programs, load_config("msid_tiny")), batch=8)[0]
    assert msid["program"] == "MSID ArcFace step" and msid["fits"] and TPU_KERNEL in msid["compiled"].as_text()


@pytest.mark.slow
def test_a_batch_too_large_is_reported_as_not_fitting_and_fit_finds_the_largest(tmp_path, capsys):
    from f2d_jax.pretrain.loop import target_programs as msid_programs
    from f2d_jax.train.loop import target_programs

    # libtpu's own answer: a program larger than the chip does not compile
    big = _compile(functools.partial(target_programs, load_config("tiny")), batch=8192)[0]
    assert not big["fits"] and big["compiled"] is None and big["temporaries"] > 16 * 2 ** 30
    assert big["note"].startswith("Ran out of memory on HBM")
    # --fit against a chip whose memory lies between what the tiny MSID step holds at batch 1 and at 2 per device
    # (libtpu's own figures, which change with its releases; libtpu compiles for a v5e and the fit is judged by
    # the smaller memory; the search's prediction is tested below)
    build = functools.partial(msid_programs, load_config("msid_tiny"))
    one, two = (compiled.compile_all(targets.parse("v5e-4"), build, batch, log=lambda msg: None)[0]["total"]
                for batch in (1, 2))
    assert one < two
    memory = (one + two) // 2
    small = dataclasses.replace(targets.parse("v5e-4"), chip=dataclasses.replace(targets.CHIPS["v5e"], memory=memory))
    rows = compiled.compile_all(small, build, 4, fit=True, log=lambda msg: None)
    [largest] = [row for row in rows if row["largest"]]
    found = largest["batch_per_device"]
    assert largest["fits"] and largest["total"] <= memory and [row["batch_per_device"] for row in rows] == [1, 2, 4]
    above = next(row for row in rows if row["batch_per_device"] == found + 1)  # the search ends between neighbours
    assert not above["fits"] and above["total"] > memory
    assert compiled.report(rows, tmp_path / "figures.json") == 0
    assert compiled.report([above], tmp_path / "figures.json") == 1
    assert f"| MSID ArcFace step | v5e-4 | 4 | {found + 1} | " in capsys.readouterr().out
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert set(figures[0]) == {"program", "target", "devices", "batch_per_device", "arguments", "outputs",
                               "temporaries", "total", "memory", "chip_memory", "fits", "flops", "kernels", "compile_s",
                               "note", "largest"}
    assert figures[0]["fits"] is False and figures[0]["batch_per_device"] == found + 1


def test_a_compiler_failure_is_a_row_that_does_not_fit(monkeypatch, capsys):
    """A compiler that fails (XLA:GPU finding no GEMM tiling at some huge batch) gives a row that does not fit,
    with the compiler's first line, so that a --fit search goes on below it."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    x = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, jax.P()))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 2))  # 8 bytes each
    program = compiled.TargetProgram("sine", jax.jit(lambda x, keys: (jnp.sin(x), keys)), (x, keys), 4, mesh)

    def fail(self, *options):
        raise jax.errors.JaxRuntimeError("INTERNAL: Couldn't find output tile sizes\nmore")

    monkeypatch.setattr(jax.stages.Lowered, "compile", fail)
    row = compiled.compile_program(program, targets.parse("h100"))
    assert not row["fits"] and row["compiled"] is None and row["arguments"] == 16 + 16
    assert row["note"] == "the compiler failed: INTERNAL: Couldn't find output tile sizes"
    assert compiled.report([row]) == 1
    assert "sine, batch 4 per device: the compiler failed: INTERNAL: Couldn't" in capsys.readouterr().out


def test_the_fit_search_finds_the_largest_batch_in_few_compiles():
    """`next_batch` on a memory that grows linearly with the batch (as a program's does, nearly): the batch
    is found after the start, its double, the line's prediction and its neighbour."""
    for start, largest in [(8, 11), (8, 3), (4, 37), (1, 1), (8, 8), (8, 300)]:
        tried, batch = {}, start
        while batch is not None:
            tried[batch] = (batch <= largest, batch - largest - 0.5)
            batch = compiled.next_batch(tried)
        assert max(b for b, (ok, _) in tried.items() if ok) == largest and len(tried) <= 5, (start, largest, tried)
    tried, batch = {}, 8
    while batch is not None:  # not even one example fits
        tried[batch] = (False, 1.0)
        batch = compiled.next_batch(tried)
    assert sorted(tried) == [1, 2, 4, 8]
    tried, batch = {}, 16
    while batch is not None:  # the compiler fails from batch 200 on (no memory figure): halved toward the last fit
        tried[batch] = (batch <= 150, batch - 150.5) if batch < 200 else (False, None)
        batch = compiled.next_batch(tried)
    assert max(b for b, (ok, _) in tried.items() if ok) == 150 and len(tried) <= 8, tried
    tried, batch = {}, 8
    while batch is not None:  # memory jumps after 20 (the line from the last fit keeps guessing just below a miss)
        tried[batch] = (batch <= 20, -10.0 if batch <= 20 else 0.1 + 0.01 * (batch - 21))
        batch = compiled.next_batch(tried)
    assert max(b for b, (ok, _) in tried.items() if ok) == 20 and len(tried) <= 8, tried


@pytest.mark.slow
def test_the_commands_compile_for_a_target_and_refuse_an_unknown_one(tmp_path, capsys):
    from f2d_jax.cli import commands

    assert commands.train(["--config", "tiny", "--target", "v5e-4", "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("compiled for, not run on:\n| program | target | devices | batch/device |")
    assert "| train step | v5e-4 | 4 | 2 | " in out and json.loads((tmp_path / "t.json").read_text())[0]["fits"]
    assert commands.sample(["--config", "tiny", "--target", "v5e-4", "--batch-size", "8", "--json",
                            str(tmp_path / "s.json")]) == 0
    assert "| denoising step | v5e-4 | 4 | 2 | " in capsys.readouterr().out
    figures_tables(tmp_path / "t.json", tmp_path / "s.json", capsys)
    assert commands.evaluate(["generate", "--config", "tiny", "--target", "v5e-4"]) == 0
    assert "| decode | v5e-4 | 4 | 2 | " in capsys.readouterr().out
    for command in (["train", "--config", "tiny"], ["sample", "--config", "tiny"],
                    ["evaluate", "generate", "--config", "tiny"]):
        name, *args = command
        assert getattr(commands, name)([*args, "--target", "v5e-3"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: unknown target 'v5e-3': v5e comes as") and err.count("\n") == 1
    assert commands.train(["--config", "tiny", "--target", "v5e-16", "--config.train.batch_size=8"]) == 2
    assert capsys.readouterr().err == ("error: train.batch_size=8 is not a multiple of the 16 devices of v5e-16: set "
                                       "--config.train.batch_size (batch per device x 16) or pass --fit\n")
    assert commands.train(["--config", "msid_tiny", "--target", "v5e-4", "--config.arcface.num_identities=0"]) == 2
    assert "set --config.arcface.num_identities" in capsys.readouterr().err


def figures_tables(train_json, sample_json, capsys):
    """benchmarks/compiled_figures.py: the memory table and images/s at 40% and 60% of the chip's peak."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import compiled_figures

    assert compiled_figures.main([str(train_json), str(sample_json), "--steps", "10"]) == 0
    out = capsys.readouterr().out
    train, (step, decode) = json.loads(train_json.read_text())[0], json.loads(sample_json.read_text())
    peak = targets.CHIPS["v5e"].peak_flops
    per_image = {"t": train["flops"] / 2, "s": (10 * step["flops"] + decode["flops"]) / 2}
    assert f"| t | v5e-4 | 2 | training image | {per_image['t'] / 1e9:,.0f} | {0.4 * peak / per_image['t']:,.1f} | " \
           f"{0.6 * peak / per_image['t']:,.1f} |" in out
    assert f"| s | v5e-4 | 2 | sampled image (10 steps) | {per_image['s'] / 1e9:,.0f} | " \
           f"{0.4 * peak / per_image['s']:,.1f} |" in out
    assert f"| s | decode | v5e-4 | 2 | {decode['arguments'] / targets.GiB:.2f} |" in out
    # a --fit search's rows: its first batch, the largest that fits and the next that does not
    search = [{**train, "batch_per_device": b, "fits": b <= 4, "largest": b == 4} for b in (2, 3, 4, 5, 8)]
    shown = [line.split(" | ")[3] for line in compiled_figures.memory_table({"f": search}).splitlines()[2:]]
    assert shown == ["2", "4 (largest)", "5"]


def test_a_compiler_that_is_not_installed_says_what_to_install(capsys, monkeypatch):
    from f2d_jax.cli import commands

    monkeypatch.setattr(targets, "_has_module", lambda name: False)
    for target, extra in (("h100x8", "XLA's GPU compiler and cuDNN: pip install 'f2d-jax[gpu]'"),
                          ("v5e-8", "libtpu: pip install 'f2d-jax[tpu]'")):
        assert commands.train(["--config", "tiny", "--target", target]) == 2
        assert capsys.readouterr().err == f"error: compiling for {target} needs {extra}\n"


# ----------------------------------------------------------------------------- GPU (make test-gpu)

@pytest.mark.gpu
def test_the_train_step_compiles_for_h100s_with_cudnn_attention():
    from f2d_jax.train.loop import target_programs

    config = load_config("tiny", ["train.compute_dtype=auto"])
    row = _compile(functools.partial(target_programs, config), target="h100x8", batch=1)[0]
    assert row["fits"] and row["devices"] == 8 and row["memory"] == int(0.75 * targets.CHIPS["h100"].memory)
    assert CUDNN_ATTENTION in row["compiled"].as_text() and row["kernels"] > 0
    # SDXL's structure with the batch and the frozen weights over an fsdp axis of 8: cuDNN runs per device
    config = load_config("tiny_sdxl", ["train.compute_dtype=auto", "mesh.data=1", "mesh.fsdp=8", "mesh.frozen=fsdp"])
    row = _compile(functools.partial(target_programs, config), target="h100x8", batch=1)[0]
    assert row["fits"] and row["kernels"] > 0


@pytest.mark.gpu
def test_sampling_compiles_for_an_h100():
    from f2d_jax.sampling.pipeline import target_programs

    step, decode = _compile(functools.partial(target_programs, load_config("tiny"), dtype="bfloat16"),
                            target="h100", batch=2)
    assert step["fits"] and decode["fits"] and CUDNN_ATTENTION in step["compiled"].as_text()


def test_the_flops_count_a_pallas_kernel_once_per_grid_step():
    """The flash kernel's matmuls are in its body, which runs once per block: counted so, the forward pass
    is the textbook attention's 2 matmuls (the backward pass computes the probabilities again: 4.5 for 3)."""
    from f2d_jax.models import attention as attn

    q = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.float32)
    one_matmul = 2 * 2 * 2 * 256 * 256 * 64

    def counted(implementation, backward):
        f = functools.partial(attn.attention, implementation=implementation)
        fn = jax.grad(lambda q, k, v: f(q, k, v).sum(), argnums=(0, 1, 2)) if backward else f
        return compiled.matmul_flops(fn, q, q, q) / one_matmul

    assert counted("reference", False) == counted("pallas", False) == 2
    assert (counted("reference", True), counted("pallas", True)) == (6, 9)
