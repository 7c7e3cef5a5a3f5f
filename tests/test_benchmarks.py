"""benchmarks/accelerator.py's table from canned --json results, and train_step.py's memory-only mode
on the tiny SDXL over 8 simulated devices."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import accelerator  # noqa: E402

GIB = 2 ** 30
PEAK = dict(device="NVIDIA H200", platform="gpu", dtype="bfloat16", size=8192, chain=16, repeats=10, seconds=0.0225,
            flops=2 * 8192 ** 3 * 16, peak_flops=8e14, datasheet_flops=1e15)


def result(framework, seconds, batch=8, devices=1, dtype="bfloat16", **more):
    return dict(framework=framework, seconds=seconds, batch=batch, devices=devices, dtype=dtype, **more)


def canned() -> dict:
    """A run in which PyTorch's torch.compile left no JSON (accelerator.sh wrote one that says so, with
    no preset) and msid_step nothing at all."""
    ours = result("jax", 0.25, devices=2, flops=2e14, peak_flops=1e15, memory=20 * GIB,
                  memory_kind="device peak_bytes_in_use")
    return {
        "peak": PEAK,
        "train_step.ours": dict(preset="sd14", results=[ours], skipped=[]),
        "train_step.eager": dict(preset="sd14", results=[result(
            "torch", 1.0, compiled=False, memory=30 * GIB, memory_kind="torch.cuda.max_memory_allocated")],
            skipped=[]),
        "train_step.compile": dict(results=[], skipped=["train_step.compile: exit status 143, no result"]),
        "sample": dict(preset="sd14", steps=30, repeats=2, skipped=[], results=[
            result("jax", 4.0, memory=9 * GIB, memory_kind="device peak_bytes_in_use"),
            result("torch", 2.0, compiled=False, dtype="float16", memory=3 * GIB,
                   memory_kind="torch.cuda.max_memory_allocated")]),
    }


def test_rows():
    text = accelerator.report(canned())
    lines = text.splitlines()
    assert lines[0] == ("measured bfloat16 matmul peak on NVIDIA H200: 800 TFLOP/s (8192^3 products chained x16, "
                        "best of 10; datasheet: 1000 TFLOP/s)")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    assert tuple(cells[0]) == accelerator.HEADER
    # batch 8 over 2 devices in 0.25 s: 16 images/s per device; 2e14 FLOP per device in 0.25 s against
    # 8e14 (measured) and 1e15 (datasheet)
    assert cells[1] == ["train_step.py sd14, batch 8", "16.00", "8.00 (bf16)", "not measured", "2.00", "-",
                        "100.0% (datasheet 80.0%)", "20.00 GiB (device)", "30.00 GiB (device)"]
    assert cells[2] == ["sample.py sd14, batch 8, 30 steps", "2.00", "4.00 (fp16)", "not measured", "0.50", "-", "-",
                        "9.00 GiB (device)", "3.00 GiB (device)"]
    assert cells[3] == ["msid_step", "no result (see accelerator.log)", *["-"] * 7]
    assert lines[-1] == "train_step: train_step.compile: exit status 143, no result"


def test_unrun_and_rss():
    """msid_step: ours not run (its note says why), PyTorch eager (no "compiled": eager) on the host
    (RSS); the sizes from the results that give them; no measured peak."""
    msid = dict(preset="cpu", skipped=[], results=[
        dict(framework="torch", identities=1_000_000, failed="exit status 1"),
        dict(framework="jax", identities=1_000_000, batch=4, devices=1, not_run="state > 80% of memory"),
        result("torch", 0.5, batch=4, identities=1_000_000, dtype="float32", peak_bytes=None, max_rss=GIB // 2),
        result("torch", 0.25, batch=4, identities=1_000_000, compiled=True, dtype="float32", peak_bytes=GIB,
               max_rss=GIB)])
    cells, notes = accelerator.row("msid_step", [msid], None)
    assert cells == ("msid_step.py cpu, batch 4, 1,000,000 identities", "not measured", "8.00 (fp32)",
                     "16.00 (fp32)", "-", "-", "-", "-", "0.50 GiB (RSS)")
    assert notes == ["msid_step: ours not run: state > 80% of memory"]
    assert accelerator.peak_memory(msid["results"][-1]) == "1.00 GiB (device)"  # msid_step's peak_bytes
    ours = result("jax", 1.0, flops=1e12, peak_flops=None, memory=GIB, memory_kind="process max RSS")
    assert accelerator.mfu_cell(ours, 4e12) == "25.0% (datasheet n/a)"
    assert accelerator.mfu_cell(dict(ours, flops=None), 4e12) == "-"


def test_table_command(tmp_path, capsys):
    """`accelerator.py table DIR`: DIR/raw/*.json merged into results.json; the report printed and in table.md."""
    (tmp_path / "raw").mkdir()
    for name, data in canned().items():
        (tmp_path / "raw" / f"{name}.json").write_text(json.dumps(data))
    assert accelerator.main(["table", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "results.json").read_text()) == canned()
    text = (tmp_path / "table.md").read_text()
    assert capsys.readouterr().out == text == accelerator.report(canned())


def test_op_profile_sorts_executed_ops_by_what_their_hlo_computes(tmp_path):
    """benchmarks/op_profile.py on a canned HLO dump and profile: attention by module path (before
    anything else), convolutions by opcode or a fused convolution, norms by module path, other dots,
    the rest; while loops are containers, not counted."""
    import gzip

    import op_profile

    dump = tmp_path / "hlo"
    dump.mkdir()
    (dump / "module_0003.jit_step.cpu_after_optimizations.txt").write_text("""\
%fused_conv (p0: f32[2,8,8,4], p1: f32[3,3,4,4]) -> f32[2,8,8,4] {
  ROOT %c = f32[2,8,8,4]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, dim_labels=b01f_01io->b01f
}
%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  ROOT %d = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
ENTRY %main (x: f32[2,8,8,4]) -> f32[4,4] {
  %ynn_fusion.8 = f32[4,8,128,1024]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/UNet/up_blocks_3/attentions_0/transformer_blocks_0/attn1/while/body/reduce_max" stack_frame_id=2}
  %conv.1 = f32[2,8,8,4]{3,2,1,0} convolution(%x, %k), window={size=3x3}, metadata={op_name="jit(step)/UNet/conv_in/conv_general_dilated"}
  %fusion.2 = f32[2,8,8,4]{3,2,1,0} fusion(%x, %k), kind=kOutput, calls=%fused_conv, metadata={op_name="jit(step)/UNet/down_blocks_0/resnets_0/conv1/add"}
  %fusion.3 = f32[2,8,8,4]{3,2,1,0} fusion(%x), kind=kLoop, calls=%other, metadata={op_name="jit(step)/UNet/down_blocks_0/resnets_0/norm1/sub"}
  %fusion.4 = f32[4,4]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/UNet/time_embedding/linear_1/dot_general"}
  %while.9 = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body, metadata={op_name="jit(step)/UNet/while"}
  ROOT %add.5 = f32[4,4]{1,0} add(%a, %b), metadata={op_name="jit(step)/add"}
}
""")
    trace = tmp_path / "trace" / "plugins" / "profile" / "run"
    trace.mkdir(parents=True)
    ops = {"ynn_fusion.8": 5e6, "conv.1": 2e6, "fusion.2": 1e6, "fusion.3": 1.5e6, "fusion.4": 0.5e6,
           "while.9": 9e6, "add.5": 0.25e6}
    events = [{"ph": "X", "name": op, "dur": micros / 2, "args": {"hlo_module": "jit_step", "hlo_op": op}}
              for op, micros in ops.items() for _ in range(2)]
    events.append({"ph": "X", "name": "$python", "dur": 1e9})  # not an XLA op
    with gzip.open(trace / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)

    totals = op_profile.breakdown(op_profile.op_times(tmp_path / "trace"), op_profile.read_dumps(dump))
    assert totals == {"attention": 5.0, "convolutions": 3.0, "norms": 1.5, "other matmuls": 0.5, "other": 0.25}


def test_variant_rows_follow_their_benchmark():
    """A variant's runs (train_step-sdxl.*) make a row of their own after the benchmark's, named by its script."""
    results = canned()
    results["train_step-sdxl.ours"] = dict(preset="sdxl", results=[result(
        "jax", 1.0, batch=2, flops=1e14, peak_flops=1e15, memory=40 * GIB, memory_kind="device peak_bytes_in_use")],
        skipped=[])
    lines = [line for line in accelerator.report(results).splitlines() if line.startswith("| ")]
    assert [line.strip("|").split("|")[0].strip() for line in lines[1:]] == [
        "train_step.py sd14, batch 8", "train_step.py sdxl, batch 2", "sample.py sd14, batch 8, 30 steps",
        "msid_step"]


@pytest.mark.slow
def test_memory_only_sdxl_fsdp_over_8_simulated_devices(tmp_path):
    """train_step.py --memory-only: the tiny SDXL's train step compiled from abstract parameters over 8
    simulated CPU devices, the frozen parameters fsdp-sharded. XLA's per-device buffers are positive; each
    device's arguments hold its shard of the frozen parameters and the (replicated) train state, less than
    the whole of both, which replicating the frozen parameters would put on every device."""
    out = tmp_path / "memory.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--preset", "tiny_sdxl", "--memory-only",
               "--devices", "8", "--fsdp", "8", "--batch", "1", "--json", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(out.read_text())
    xla = r["xla_memory"]
    assert (r["devices"], r["mesh"], r["frozen_rule"], r["dtype"]) == (8, {"data": 1, "fsdp": 8}, "fsdp", "bfloat16")
    assert xla["arguments"] > 0 and xla["temporaries"] > 0 and r["xla_total"] == sum(xla.values())
    assert 0 < r["frozen_per_device"] < r["frozen_total"] and r["state_per_device"] == r["state_total"] > 0
    assert r["state_per_device"] + r["frozen_per_device"] <= xla["arguments"] < r["state_total"] + r["frozen_total"]
    assert r["fits_16gb"] and "fits in 16 GiB per device" in done.stdout
