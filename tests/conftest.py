"""Shared test set-up: CPU JAX with exact float32 matmuls, one compilation cache for the session's
commands (not the user's: F2D_JAX_COMPILE_CACHE names a folder removed at the end, unless it was set
before), and the parity report.

Parity figures recorded with the `parity` fixture are listed after the run (also under
pytest-xdist: workers append them to a file the controller reads).
"""
import json
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

_LOG = "F2D_PARITY_LOG"
_CACHE = "F2D_JAX_COMPILE_CACHE"
_session_cache = None


def pytest_configure(config):
    global _session_cache
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist); workers inherit these
        fd, path = tempfile.mkstemp(prefix="f2d-parity-", suffix=".jsonl")
        os.close(fd)
        os.environ[_LOG] = path
        if _CACHE not in os.environ:
            _session_cache = os.environ[_CACHE] = tempfile.mkdtemp(prefix="f2d-jax-cache-")


def pytest_unconfigure(config):
    if _session_cache:
        shutil.rmtree(_session_cache, ignore_errors=True)


@pytest.fixture
def parity():
    """`parity(name, max_abs_err, tolerance)` asserts the error and records it for the report."""
    def check(name: str, error: float, tolerance: float):
        with open(os.environ[_LOG], "a") as f:
            f.write(json.dumps([name, float(error), tolerance]) + "\n")
        assert error <= tolerance, f"{name}: max abs error {error:.3g} > {tolerance:.3g}"
    return check


def pytest_terminal_summary(terminalreporter, config):
    path = os.environ.get(_LOG)
    if hasattr(config, "workerinput") or not path or not os.path.exists(path):
        return
    with open(path) as f:
        rows = sorted(json.loads(line) for line in f)
    os.unlink(path)
    if rows:
        terminalreporter.section("parity against PyTorch (max abs error, float32)")
        for name, error, tolerance in rows:
            terminalreporter.write_line(f"{name:<64s} {error:.2e}  (tolerance {tolerance:.0e})")
