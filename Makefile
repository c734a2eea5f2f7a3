# hf_kd — two commands on a fresh clone: `make demo` and `make test`.
# Each installs what it needs into .venv first.
#
# Torch: when the venv has no torch, `make setup` installs $(TORCH_SPEC) (the CPU wheel on this
# project's machines). A torch you already have is never replaced: create the venv with
# `make setup VENV_FLAGS=--system-site-packages` to reuse a system (e.g. CUDA) torch, or install
# your torch into .venv first.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hf_kd-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-lowest lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q tests

# The lowest versions pyproject.toml allows (.ci/lowest.txt) in a venv of their own, on a fast subset:
# every module imported, the declared dependencies, training steps (gradient accumulation included), causal-LM
# runs end to end, the runs that must stop. (Image tasks need torchvision with Transformers 5.17: not here.)
LOWEST ?= .venv-lowest
LOWEST_TESTS ?= tests/test_dependencies.py tests/test_causal_lm.py tests/test_faults_learning.py \
	tests/test_trainer.py::test_training_end_to_end tests/test_trainer.py::test_gradient_accumulation_gives_the_same_update

$(LOWEST)/.hf_kd-installed: pyproject.toml .ci/lowest.txt
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(VENV_FLAGS) $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q "$(TORCH_SPEC)" -c .ci/lowest.txt -e ".[dev]"
	touch $@

test-lowest: $(LOWEST)/.hf_kd-installed
	$(LOWEST)/bin/python -c "import importlib, pkgutil, hf_kd; \
		[importlib.import_module(m.name) for m in pkgutil.walk_packages(hf_kd.__path__, 'hf_kd.')]"
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider $(LOWEST_TESTS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup  # each script prints its figures; BENCHMARKS.md records them with machine and settings
	for script in scripts/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) $(LOWEST) outputs .pytest_cache
