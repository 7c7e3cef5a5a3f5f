"""The command lines a user runs: the demo (offline, without torch), train.py, sample.py."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from f2d_jax import demo

ROOT = Path(__file__).resolve().parent.parent
# Make `import torch` fail, to show that the JAX path never needs it.
NO_TORCH = "import sys; sys.modules['torch'] = None; "


def _run(code_or_args, *, python_code=False):
    args = [sys.executable, "-c", code_or_args] if python_code else [sys.executable, *code_or_args]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


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
def test_demo_bad_input_is_one_line(extra, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert demo.main(extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_demo_no_face(tmp_path, capsys):
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(tmp_path / "wall.png")
    assert demo.main(["--config", str(ROOT / "configs/tiny.py"), "--image", str(tmp_path / "wall.png")]) == 2
    assert capsys.readouterr().err.startswith(f"error: no face found in {tmp_path / 'wall.png'}")


@pytest.mark.parametrize("script", ["train.py", "sample.py", "-m f2d_jax.convert", "-m f2d_jax.demo"])
def test_help(script):
    result = _run([*script.split(), "--help"])
    assert result.returncode == 0 and "usage:" in result.stdout


def test_train_config_errors_are_one_line():
    result = _run(["train.py", "--config", "configs/tiny.py", "--workdir", "/tmp/x", "--config.train.nothing=3"])
    assert result.returncode == 2 and result.stderr.startswith("error: train.nothing is not a config field")
    result = _run(["train.py", "--config", "configs/tiny.py", "--workdir", "/tmp/x", "--bogus"])
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr


def test_sample_missing_photo_is_one_line():
    result = _run(["sample.py", "--image", "a.jpg", "--prompt", "f l", "--out", "o.png"])
    assert result.returncode == 2 and result.stderr == "error: image file not found: a.jpg\n"
