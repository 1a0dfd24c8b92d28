# Two commands do all set-up on a fresh machine:
#   make mnist   the main job: the MNIST comparison (cpu profile), then its table
#   make test    lint + the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is pinned for development and CI (this project's machines give pip its CPU build;
# an unpinned torch pulls a newer CUDA build). TORCH may add pip options, e.g.
# TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for the CPU build.
TORCH ?= torch==2.13.0
# Triton for the tests, which run the CUDA kernels through its interpreter on the CPU: pinned to
# the version the lent GPU machines have (3.6.0), which runs them compiled. Empty: none.
TRITON ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),triton==3.6.0)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) $(TRITON)
	$(PY) -m pip install --quiet -e ".[experiments,dev]"
	touch $@

install: $(VENV)/.installed

# The MNIST comparison with the cpu profile, one seed per loss; prints the table. Each loss
# runs at its tuned settings (src/spherical_losses/experiments/tuned/mnist-cpu.json) where a
# tune saved them, else at the profile's (each run's config.json says which).
mnist: $(VENV)/.installed
	$(VENV)/bin/spherical-losses compare --task mnist --profile cpu \
		--losses log_softmax,taylor,spherical,z_loss --seeds 1 --out runs

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not slow"

# The long drift and full-data tests (several minutes): 100,000-step float32 runs, full CIFAR-10.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

.PHONY: install mnist test test-slow
