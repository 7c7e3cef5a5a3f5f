"""What every command does with a user's mistake and with Ctrl-C: one line, exit status 2 for a mistake
(found before any long work), 130 for an interrupt, whenever it comes."""
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


@pytest.mark.parametrize("after", [0.3, 1.5, 3.0, 6.0])
def test_ctrl_c_while_train_starts_is_one_line_and_130(tmp_path, after):
    """While modules import, the config loads, the models build and the step compiles."""
    args = [str(tmp_path / "run") if a == "WORKDIR" else a for a in LONG_TRAIN]
    _assert_interrupted(_interrupt(args, after, tmp_path))


@pytest.mark.parametrize("args", [
    ["sample", "--config", "tiny", "--image", FACE, "--prompt", "a photo of f l", "--out", "out.png", "--steps", "1000"],
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
