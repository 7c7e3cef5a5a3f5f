# The two quickstart commands. Each creates .venv (Python 3.11 or later) and installs what it needs, at the
# versions constraints.txt pins (the set the tests ran against).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast test-gpu clean

$(VENV)/.installed-%: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$*]" -c constraints.txt
	touch $@

# Offline, tiny random-init models: face photo -> "f l" tokens -> SD text conditioning, a short CGDR
# training run on synthetic faces (checkpoints, metrics, samples in runs/demo), then sample.py from it.
demo: $(VENV)/.installed-faces
	$(PY) -m f2d_jax.demo --config configs/tiny.py
	$(PY) train.py --config configs/tiny.py --workdir runs/demo
	$(PY) sample.py --checkpoint runs/demo --image f2d_jax/assets/face.jpg --prompt "a photo of f l" -n 4 \
		--out runs/demo/sample.png

# The test suite (CPU only, no network; the TPU compiler, libtpu, comes with the dev extra).
test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n 2

# The same without the tests marked slow: a quick test of every module, in a few minutes.
test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n 2 -m "not slow and not gpu"

# The tests compiled for NVIDIA GPUs (marked gpu): XLA's GPU compiler and cuDNN in a venv of their own,
# .venv-gpu (about 1.5 GB more), so that the main one's JAX prints no CUDA start-up lines.
test-gpu:
	$(MAKE) VENV=.venv-gpu .venv-gpu/.installed-dev,gpu
	.venv-gpu/bin/python -m pytest -q -m gpu tests/test_targets.py

clean:
	rm -rf $(VENV) .venv-gpu
