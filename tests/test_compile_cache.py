"""The persistent compilation cache of the commands: where it is, how it is turned off, a folder that
cannot be written, and sample.py reading what its previous run compiled."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from f2d_jax import compile_cache, demo
from f2d_jax.compile_cache import default_dir, enable

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture
def jax_settings(monkeypatch):
    """JAX's cache settings as they were before the test, afterwards; no F2D_JAX_COMPILE_CACHE in it."""
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    before = {name: getattr(jax.config, name) for name in SETTINGS}
    yield
    for name, value in before.items():
        jax.config.update(name, value)


@pytest.mark.parametrize("command", ["f2d_jax.cli.sample", "f2d_jax.cli.train", "f2d_jax.demo",
                                     "f2d_jax.eval.__main__ generate", "f2d_jax.eval.__main__ score",
                                     "f2d_jax.data.prepare", "f2d_jax.pretrain.verify"])
def test_the_commands_that_compile_take_the_flag(command, capsys):
    module, *argv = command.split()
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(module).main([*argv, "--help"])
    assert exit.value.code == 0 and "--compile-cache DIR|off" in capsys.readouterr().out


def test_the_default_folder_is_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_dir() == tmp_path / "xdg" / "f2d_jax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dir() == tmp_path / "home" / ".cache" / "f2d_jax" / "jax"


def test_a_flag_an_environment_variable_or_the_default(tmp_path, monkeypatch, jax_settings):
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert enable() == str(tmp_path / "xdg" / "f2d_jax" / "jax") == jax.config.jax_compilation_cache_dir
    assert (tmp_path / "xdg" / "f2d_jax" / "jax").is_dir()
    assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECONDS
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert enable() == str(tmp_path / "env") == jax.config.jax_compilation_cache_dir
    assert enable(str(tmp_path / "flag")) == str(tmp_path / "flag") == jax.config.jax_compilation_cache_dir
    assert jax.config.jax_enable_compilation_cache


def test_jaxs_own_setting_is_kept(tmp_path, monkeypatch, jax_settings):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "own"))  # as JAX_COMPILATION_CACHE_DIR does
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    assert enable() == str(tmp_path / "own")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0
    assert enable(str(tmp_path / "flag")) == str(tmp_path / "flag")  # an f2d setting comes first


@pytest.mark.parametrize("where", ["flag", "environment"])
def test_off(where, tmp_path, monkeypatch, jax_settings):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "own"))
    if where == "environment":
        monkeypatch.setenv(compile_cache.ENV, "off")
    assert enable("OFF" if where == "flag" else None) is None
    assert not jax.config.jax_enable_compilation_cache


@pytest.mark.slow
def test_a_folder_that_cannot_be_written_is_a_warning_and_the_command_runs(tmp_path, capsys, jax_settings):
    (tmp_path / "file").write_text("a file, not a folder")
    folder = tmp_path / "file" / "cache"
    assert demo.main(["--config", "tiny", "--compile-cache", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert err == f"warning: the compilation cache {folder} cannot be written (Not a directory); this run " \
                  "compiles without it\n"
    assert "CLIP       text embedding" in out and not jax.config.jax_enable_compilation_cache


@pytest.mark.slow
def test_sample_py_reads_what_its_first_run_compiled(tmp_path):
    """The first run writes the cache's entries, the second compiles nothing afresh: each program it
    compiles is a cache hit, the sampling step's too, with the progress bar on (JAX logs each
    compilation and each cache hit with JAX_LOG_COMPILES)."""
    cache = tmp_path / "cache"
    env = {**os.environ, compile_cache.ENV: str(cache), "JAX_LOG_COMPILES": "1"}
    env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
    command = [sys.executable, str(ROOT / "sample.py"), "--config", "tiny", "--image", "f2d_jax/assets/face.jpg",
               "--prompt", "a photo of f l", "-n", "1", "--steps", "2", "--out", str(tmp_path / "grid.png")]

    def run() -> str:
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "sampling 1 image" in result.stderr  # the progress bar
        return result.stderr

    def compiled(log: str) -> int:
        return log.count("Finished XLA compilation of ")

    first = run()
    assert "Persistent compilation cache hit for " not in first
    entries = sorted(cache.glob("*-cache"))
    assert len(entries) > 10  # the encoders, the models' initialization, the prompt embedding, ...
    second = run()
    assert second.count("Persistent compilation cache hit for ") == compiled(second) == compiled(first)
    assert "Persistent compilation cache hit for 'jit_steps'" in second
    assert sorted(cache.glob("*-cache")) == entries  # nothing new to write
