"""The command lines a user runs: the demo (offline, without torch), train.py, sample.py; configs by
name and by path; the mistakes each command refuses in one line; reading a run writes nothing."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from f2d_jax import demo
from f2d_jax.config import config_names, load_config
from f2d_jax.workdir import RunLock

ROOT = Path(__file__).resolve().parent.parent
# Make `import torch` fail, to show that the JAX path never needs it.
NO_TORCH = "import sys; sys.modules['torch'] = None; "


def _run(code_or_args, *, python_code=False):
    args = [sys.executable, "-c", code_or_args] if python_code else [sys.executable, *code_or_args]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_runs_offline_without_torch():
    result = _run(NO_TORCH + "from f2d_jax.demo import main; sys.exit(main(['--config', 'configs/tiny.py']))",
                  python_code=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "identity features          (1, 128)" in out
    assert "'f l' tokens (null exp)    (1, 2, 32)" in out
    assert "'f' at position 1" in out
    assert "text embedding             (1, 77, 32)" in out


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "a photo of a person"], "error: the prompt has no identifier 'f l'"),
    (["--image", "missing.jpg"], "error: image file not found: missing.jpg"),
    (["--config", "configs/nothing.py"], "error: no config file at configs/nothing.py"),
])
@pytest.mark.slow
def test_demo_bad_input_is_one_line(extra, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert demo.main(extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_demo_no_face(tmp_path, capsys):
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(tmp_path / "wall.png")
    assert demo.main(["--config", str(ROOT / "configs/tiny.py"), "--image", str(tmp_path / "wall.png")]) == 2
    # advice a command-line user can follow (nothing about Python arguments)
    assert capsys.readouterr().err == (f"error: no face found in {tmp_path / 'wall.png'}; use a photo with a clear, "
                                       "roughly frontal face\n")


@pytest.mark.parametrize("script", ["train.py", "sample.py", "-m f2d_jax.convert", "-m f2d_jax.demo"])
def test_help(script):
    result = _run([*script.split(), "--help"])
    assert result.returncode == 0 and "usage:" in result.stdout


def test_train_config_errors_are_one_line():
    result = _run(["train.py", "--config", "configs/tiny.py", "--workdir", "/tmp/x", "--config.train.nothing=3"])
    assert result.returncode == 2 and result.stderr.startswith("error: --config.train.nothing: train has no field "
                                                               "'nothing' (its fields: batch_size, ")
    result = _run(["train.py", "--config", "configs/tiny.py", "--workdir", "/tmp/x", "--bogus"])
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr


@pytest.mark.slow
def test_sample_missing_photo_is_one_line():
    result = _run(["sample.py", "--config", "tiny", "--image", "a.jpg", "--prompt", "f l", "--out", "o.png"])
    assert result.returncode == 2 and result.stderr == "error: image file not found: a.jpg\n"


# ----------------------------------------------------------------------------- configs by name and by path

def test_named_configs_load_anywhere_and_match_their_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_names() == ["f2d_flux", "f2d_sd14", "f2d_sd15", "f2d_sd21", "f2d_sdxl", "msid_arcface", "msid_tiny",
                              "tiny", "tiny_flux", "tiny_sd2", "tiny_sdxl"]
    for name in config_names():
        assert load_config(name).to_dict() == load_config(ROOT / "configs" / f"{name}.py").to_dict()
    with pytest.raises(FileNotFoundError, match=r"^no config file at nothing, and no named config 'nothing' "
                                                r"\(named configs: f2d_flux, f2d_sd14, f2d_sd15, f2d_sd21, f2d_sdxl, "
                                                r"msid_arcface, msid_tiny, tiny, tiny_flux, tiny_sd2, tiny_sdxl\)$"):
        load_config("nothing")


@pytest.mark.slow
def test_the_pipeline_builds_from_a_named_config(tmp_path, monkeypatch):
    from f2d_jax.sampling import F2DPipeline

    monkeypatch.chdir(tmp_path)
    pipe = F2DPipeline.from_config("tiny")
    assert pipe.config.data.resolution == 64 and pipe.models.encoders.msid.width == 32


def test_a_copied_config_loads_without_the_checkout(tmp_path):
    for name in ("tiny", "msid_tiny"):
        shutil.copy(ROOT / "f2d_jax" / "configs" / f"{name}.py", tmp_path / f"my_{name}.py")
    code = ("import sys; sys.modules['configs'] = None; from f2d_jax.config import load_config; "
            "print(load_config('my_tiny.py').train.steps, load_config('my_msid_tiny.py').task)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout == "60 msid_arcface\n", result.stderr


def test_overrides_take_their_fields_types():
    config = load_config("tiny", ["weights.sd=123", "train.prompts=('f l', 'a photo of f l')", "optim.weight_decay=0"])
    assert config.weights.sd == "123" and config.train.prompts == ("f l", "a photo of f l")
    assert config.optim.weight_decay == 0.0 and isinstance(config.optim.weight_decay, float)
    for override, message in [
        ("train.steps=abc", "train.steps=abc does not fit the field: train.steps holds an integer, like its default 60"),
        ("train.steps=1.5", "train.steps=1.5 does not fit the field: train.steps holds an integer"),
        ("optim.lr=fast", "optim.lr=fast does not fit the field: optim.lr holds a number, like its default 0.001"),
        ("train.remat_unet=yes", "train.remat_unet=yes does not fit the field: train.remat_unet holds True or False"),
        # nan and inf read as the numbers they name, which then fail the fields' ranges
        ("optim.lr=nan", "optim.lr=nan: it must be more than 0"),
        ("log.sample_guidance=inf", "log.sample_guidance=inf: it must be a finite number"),
        ("optim.b1=-inf", "optim.b1=-inf: it must be at least 0 and below 1"),
    ]:
        with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
            load_config("tiny", [override])


@pytest.mark.parametrize("command", [["train.py", "--workdir", "{tmp}/run"], ["-m", "f2d_jax.demo"],
                                     ["-m", "f2d_jax.data.prepare", "--images", "{tmp}", "--out", "{tmp}/data"]],
                         ids=["train", "demo", "prepare"])
def test_an_override_of_the_wrong_type_is_one_line_in_every_command(command, tmp_path):
    command = [arg.format(tmp=tmp_path) for arg in command]
    result = _run([*command, "--config", "tiny", "--config.train.steps=abc"])
    assert result.returncode == 2
    assert result.stderr == ("error: train.steps=abc does not fit the field: train.steps holds an integer, like its "
                             "default 60\n")


# ----------------------------------------------------------------------------- train.py refuses before loading

@pytest.mark.parametrize("setting, message", [
    ("--config.train.batch_size=0", "train.batch_size=0: it must be at least 1"),
    ("--config.train.steps=0", "train.steps=0: it must be at least 1"),
    ("--config.data.workers=-1", "data.workers=-1: it must be at least 0"),
    ("--workdir={file}", "--workdir {file} cannot be written: {file} is a file, not a directory"),
    ("--workdir={file}/run", "--workdir {file}/run cannot be written: {file} is a file, not a directory"),
])
@pytest.mark.slow
def test_train_refuses_impossible_settings_before_loading(setting, message, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("not a directory")
    result = _run(["train.py", "--config", "tiny", "--workdir", str(tmp_path / "run"), setting.format(file=file)])
    assert result.returncode == 2
    assert result.stderr == f"error: {message.format(file=file)}\n"  # alone: nothing was loaded before it
    assert not (tmp_path / "run").exists()


def test_a_workdir_in_use_is_refused_and_a_crashed_runs_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom f2d_jax.workdir import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        result = _run(["train.py", "--config", "tiny", "--workdir", str(tmp_path), "--config.train.steps=1"])
        assert result.returncode == 2
        assert result.stderr.startswith(f"error: {tmp_path} is in use by another training run (process "
                                        f"{holder.pid} on {socket.gethostname()}, started "), result.stderr
        assert result.stderr.endswith("); wait for it to end, or use another --workdir\n")
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()  # as a crash would: its lock file stays, the operating system released the lock
        holder.wait()
    notes = []
    with RunLock(tmp_path, notes.append):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and notes[0].startswith(
        f"note: {tmp_path / 'run.lock'} was left by a run that is no longer running (process {holder.pid} on ")
    assert not (tmp_path / "run.lock").exists()


# ----------------------------------------------------------------------------- reading never writes

@pytest.mark.slow
def test_reading_a_mistyped_or_empty_workdir_is_an_error_that_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for workdir in (tmp_path / "typo", empty):
        message = f"error: {workdir} is not a train.py workdir (no checkpoints folder in it)\n"
        sample = _run(["sample.py", "--checkpoint", str(workdir), "--image", "f2d_jax/assets/face.jpg", "--prompt",
                       "a photo of f l", "--out", str(tmp_path / "out.png")])
        assert sample.returncode == 2 and sample.stderr.endswith(message), sample.stderr
        assert not (workdir / "checkpoints").exists() and not (tmp_path / "out.png").exists()
    evaluate = _run(["-m", "f2d_jax.eval", "generate", "--config", str(empty), "--faces", "tests/data/faces",
                     "--out", str(tmp_path / "gen"), "--prompts", "f2d_jax/assets/eval_prompts.txt"])
    assert evaluate.returncode == 2 and evaluate.stderr.endswith(
        f"error: {empty} is not a train.py workdir (no checkpoints folder in it)\n"), evaluate.stderr
    assert list(empty.iterdir()) == []


def test_sampling_evaluation_and_conversion_do_not_import_the_training_package():
    code = ("import sys, f2d_jax.sampling, f2d_jax.eval.generate, f2d_jax.eval.score, f2d_jax.convert.__main__, "
            "f2d_jax.workdir; print(sorted(m for m in sys.modules if m.startswith('f2d_jax.train')))")
    result = _run(code, python_code=True)
    assert result.returncode == 0 and result.stdout == "[]\n", result.stderr
    # Nor may they, or their commands, as their imports say: those inside functions too, which run only later.
    from test_layers import PACKAGE, reachable

    reached = reachable(PACKAGE, ["f2d_jax.sampling", "f2d_jax.eval.generate", "f2d_jax.eval.score", "f2d_jax.workdir",
                                  "f2d_jax.convert.__main__", "f2d_jax.eval.__main__", "f2d_jax.cli.sample",
                                  "f2d_jax.cli.app"])

    def chain(module: str) -> str:
        return f"{chain(reached[module])} -> {module}" if reached[module] else module

    training = [chain(m) for m in reached if m.split(".")[:2] in (["f2d_jax", "train"], ["f2d_jax", "pretrain"])]
    assert training == []
