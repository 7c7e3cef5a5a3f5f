"""The package as a user installs it: a wheel with the assets, the named configs and the console
scripts, working from a directory outside the checkout."""
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("f2d-train", "f2d-sample", "f2d-convert", "f2d-eval", "f2d-prepare", "f2d-identities", "f2d-verify",
           "f2d-demo")


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    # The wheel, built offline with the test environment's setuptools.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("f2d_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("f2d_jax/assets/face.jpg", "f2d_jax/assets/bpe_simple_vocab_16e6.txt.gz",
                 "f2d_jax/assets/eval_prompts.txt", "f2d_jax/configs/tiny.py", "f2d_jax/configs/f2d_sd14.py",
                 "f2d_jax/configs/msid_arcface.py", "f2d_jax/configs/msid_tiny.py", "f2d_jax/cli/sample.py"):
        assert name in names, name
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert all(f"{script} = " in zipfile.ZipFile(wheel).read(entry_points).decode() for script in SCRIPTS)

    # A fresh virtual environment that reuses the test environment's packages (a .pth line adds their
    # folder, without its .pth files: the checkout's editable install stays out) and gets the wheel alone.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=600)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*command):
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    located = run(python, "-c", "import f2d_jax; print(f2d_jax.__file__)")
    assert located.startswith(str(site)), located
    demo = run(env_dir / "bin" / "f2d-demo")
    assert "MSID       identity features          (1, 128)" in demo and "; config tiny)" in demo
    assert "CLIP       text embedding             (1, 77, 32)" in demo
    loaded = run(python, "-c", "from f2d_jax.config import config_names, load_config\n"
                               "for name in config_names(): print(name, len(load_config(name)))")
    assert loaded.split()[::2] == ["f2d_flux", "f2d_sd14", "f2d_sd15", "f2d_sd21", "f2d_sdxl", "msid_arcface",
                                  "msid_tiny", "tiny", "tiny_flux", "tiny_sd2", "tiny_sdxl"]
    for script in SCRIPTS:
        assert "usage: " in run(env_dir / "bin" / script, "--help"), script
