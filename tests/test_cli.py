"""What every command does with a user's mistake and with Ctrl-C: one line, exit status 2 for a mistake
(found before any long work), 130 for an interrupt, whenever it comes."""
import math
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FACE = str(ROOT / "f2d_jax" / "assets" / "face.jpg")


def _interrupt(args: list[str], after: float, cwd) -> subprocess.CompletedProcess:
    """Run a console script (f2d_jax.cli.commands) with `args`, Ctrl-C after `after` seconds."""
    script, *rest = args
    code = f"import sys; from f2d_jax.cli.commands import {script}; sys.exit({script}({rest!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(after)
    assert proc.poll() is None, f"{script} ended before the interrupt: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _assert_interrupted(result: subprocess.CompletedProcess) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    assert [line for line in lines if line.startswith("interrupted")] == lines[-1:], result.stderr[-3000:]


LONG_TRAIN = ["train", "--config", "tiny", "--workdir", "WORKDIR", "--config.train.steps=100000",
              "--config.log.sample_every=0"]


@pytest.mark.parametrize("after", [0.3, 1.5, 3.0, pytest.param(6.0, marks=pytest.mark.slow)])
def test_ctrl_c_while_train_starts_is_one_line_and_130(tmp_path, after):
    """While modules import, the config loads, the models build and the step compiles."""
    args = [str(tmp_path / "run") if a == "WORKDIR" else a for a in LONG_TRAIN]
    _assert_interrupted(_interrupt(args, after, tmp_path))


@pytest.mark.parametrize("args", [
    ["sample", "--config", "tiny", "--image", FACE, "--prompt", "a photo of f l", "--out", "out.png", "--steps",
     "1000"],
    ["evaluate", "generate", "--config", "tiny", "--faces", str(ROOT / "f2d_jax" / "assets"), "--steps", "1000",
     "--out", "gen"],
    ["demo", "--config", "tiny"],
    ["convert", "import", "--msid", "msid.pt", "--out", "weights"],
    ["prepare", "--images", str(ROOT / "f2d_jax" / "assets"), "--out", "data"],
    ["identities", "--source", str(ROOT / "f2d_jax" / "assets"), "--out", "ids"],
    ["verify", "--msid", "msid.pt", "lfw.bin"],
    ["app", "--port", "PORT"],
], ids=lambda args: args[0])
def test_ctrl_c_while_any_command_starts_is_one_line_and_130(tmp_path, args):
    # The input files exist (empty), so that no command stops at its first check before the interrupt.
    for name in ("msid.pt", "lfw.bin"):
        (tmp_path / name).write_bytes(b"")
    args = [str(_free_port()) if a == "PORT" else a for a in args]
    _assert_interrupted(_interrupt(args, 0.6, tmp_path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_interrupt_dropped_by_a_garbage_collection_callback_still_stops_the_command(tmp_path):
    """Python reports a KeyboardInterrupt raised in a gc callback (JAX registers one) as "Exception ignored"
    and goes on; a command stops all the same."""
    code = ("import gc, sys, time\nfrom f2d_jax import cli\n"
            "@cli.command\ndef main(argv=None):\n"
            "    slow = [True]\n"
            "    def callback(phase, info):\n"
            "        if phase == 'start' and slow.pop() if slow else False:\n"
            "            print('collecting', flush=True)\n            time.sleep(2)\n"
            "    gc.callbacks.append(callback)\n"
            "    deadline = time.time() + 30\n"
            "    while time.time() < deadline:\n        gc.collect()\n        time.sleep(0.01)\n"
            "    return 0\n"
            "sys.exit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "collecting\n"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # while the callback runs
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "\ninterrupted\n")


def test_an_interrupt_that_breaks_an_import_in_c_code_still_stops_the_command(tmp_path):
    """Ctrl-C while a C extension initializes (jaxlib) comes out as "ImportError: Encountered an error while
    initializing the extension": after a Ctrl-C, that is the interrupt; without one, an error stays an error."""
    code = ("import signal, sys\nfrom f2d_jax import cli\n"
            "@cli.command\ndef main(argv=None):\n"
            "    try:\n        if argv: signal.raise_signal(signal.SIGINT)\n"
            "    except KeyboardInterrupt:\n        pass\n"
            "    raise ImportError('Encountered an error while initializing the extension.')\n"
            "sys.exit(main(sys.argv[1:]))\n")
    interrupted = subprocess.run([sys.executable, "-c", code, "x"], capture_output=True, text=True, timeout=60)
    assert (interrupted.returncode, interrupted.stderr) == (130, "\ninterrupted\n")
    failed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and failed.stderr.endswith("ImportError: Encountered an error while initializing "
                                                             "the extension.\n")


# ----------------------------------------------------------------------------- train: a config no run can use

@pytest.mark.parametrize("override, message", [
    ("data.resolution=60", "data.resolution=60: it must be a positive multiple of 8, and of the model's own multiple"),
    ("data.resolution=0", "data.resolution=0: it must be a positive multiple of 8"),
    ("data.resolution=72", "data.resolution=72: it must be a multiple of 16 for this Stable Diffusion (the tiny "
                           "random one)"),
    ("train.trainable=[", "train.trainable='[' is not a regular expression: unterminated character set at position 0"),
    ("train.compute_dtype=bogus", "train.compute_dtype='bogus': it must be one of auto, float32, bfloat16, float16"),
    ("seed=18446744073709551616", "seed=18446744073709551616: it must be at least 0 and at most 4294967295"),
    ("seed=-1", "seed=-1: it must be at least 0 and at most 4294967295"),
    ("optim.lr=-1", "optim.lr=-1.0: it must be more than 0"),
    ("optim.lr=nan", "optim.lr=nan: it must be more than 0"),
    ("train.p_uncond=2", "train.p_uncond=2.0: it must be at least 0 and at most 1"),
    ("optim.schedule=linear", "optim.schedule='linear': it must be one of constant, cosine, polynomial"),
    ("mesh.fsdp=0", "mesh.fsdp=0: it must be -1 (the devices left) or at least 1"),
    ("train.nosuch=3", "--config.train.nosuch: train has no field 'nosuch' (its fields: batch_size, cgdr_lambda, "),
    ("nosuch=3", "--config.nosuch: the config has no field 'nosuch' (its fields: checkpoint, data, log, "),
    ("train.steps.x=1", "--config.train.steps.x: train.steps has no field 'x' (it is a value, not a section)"),
    ("weights.msid=/nonexistent.pt", "weights.msid: no weight file at /nonexistent.pt"),
])
def test_train_refuses_a_config_it_cannot_run_in_one_line(tmp_path, capsys, override, message):
    from f2d_jax.cli.train import main

    assert main(["--config", "tiny", "--workdir", str(tmp_path / "run"), f"--config.{override}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # refused before the workdir was made


def test_every_ranged_setting_of_every_named_config_is_checked():
    """A value outside each range of f2d_jax.config.RANGES, for every named config that has the setting."""
    from f2d_jax.config import RANGES, config_names, load_config

    checked = set()
    for name in config_names():
        config = load_config(name)
        for key, (ok, wording) in RANGES.items():
            default = config
            for part in key.split("."):
                default = default.get(part) if default is not None and part in default else None
            if default is None:
                continue
            candidates = [-1, 0, 2, 2 ** 40] + ([-0.5, float("nan")] if isinstance(default, float) else [])
            bad = next(v for v in candidates if not (math.isfinite(v) and ok(v)))
            with pytest.raises(ValueError, match=f"^{re.escape(key)}={re.escape(repr(type(default)(bad)))}: it must "
                                                 f"be {re.escape(wording)}$"):
                load_config(name, [f"{key}={bad}"])
            checked.add(key)
    assert checked == set(RANGES), sorted(set(RANGES) - checked)  # every rule is some config's


def test_a_config_file_that_fails_is_one_line_naming_its_line(tmp_path, capsys):
    from f2d_jax.cli.train import main

    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "name.py").write_text("from f2d_jax.configs import tiny\n\n\ndef get_config():\n    config = "
                                      "tiny.get_config()\n    config.seed = undefined\n    return config\n")
    for file, message in (("syntax.py", "line 1: invalid syntax"),
                          ("name.py", "line 6: NameError: name 'undefined' is not defined")):
        assert main(["--config", str(tmp_path / file), "--workdir", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err == f"error: config file {tmp_path / file}, {message}\n"


def test_an_override_without_a_value_names_the_flag(tmp_path, capsys):
    from f2d_jax.cli.train import main

    with pytest.raises(SystemExit) as exited:
        main(["--config", "tiny", "--workdir", str(tmp_path / "run"), "--config.train.steps"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith("error: --config.train.steps has no value: write "
                                            "--config.train.steps=VALUE\n")


@pytest.mark.parametrize("command", [
    ["demo", "--config", "msid_tiny"],
    ["sample", "--config", "msid_tiny", "--image", FACE, "--prompt", "a photo of f l", "--out", "o.png"],
    ["evaluate", "generate", "--config", "msid_tiny", "--faces", str(ROOT / "f2d_jax" / "assets"), "--out", "g"],
    ["prepare", "--config", "msid_tiny", "--images", str(ROOT / "f2d_jax" / "assets"), "--out", "d"],
    ["app", "--config", "msid_tiny"],
], ids=lambda command: command[0])
def test_an_msid_pretraining_config_given_to_a_face2diffusion_command_is_one_line(tmp_path, capsys, monkeypatch,
                                                                                   command):
    from f2d_jax.cli import commands

    monkeypatch.chdir(tmp_path)
    assert getattr(commands, command[0])(command[1:]) == 2
    assert capsys.readouterr().err.endswith(
        "error: msid_tiny is an MSID pretraining config (task msid_arcface), for f2d-train only; give a "
        "Face2Diffusion config such as tiny or f2d_sd14\n")
    assert list(tmp_path.iterdir()) == []
