# Two entry points: `make train` (set up + train the tiny default model) and `make test`.
# Two tested stacks: Python 3.11 with constraints.txt (the default: the one where PyPI has a CPU torch,
# so every parity test runs) and Python 3.12 with constraints-py312.txt (the newest jax and flax), e.g.
# `make test PYTHON=python3.12`. Each stack has its own venv.
PYTHON ?= $(shell .ci/find-python 3.11 || .ci/find-python 3.12 || command -v python3)
PY_TAG := $(shell $(PYTHON) -c 'import sys; print("py%d%d" % sys.version_info[:2])')
ifeq ($(PY_TAG),py311)
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
# torch first, pinned: a bare `transformers` install would otherwise pull a multi-GB CUDA build.
TORCH_FIRST := torch==2.13.0
else
VENV ?= .venv-$(PY_TAG)
CONSTRAINTS ?= constraints-$(PY_TAG).txt
TORCH_FIRST :=
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINT_FLAG := $(if $(wildcard $(CONSTRAINTS)),-c $(CONSTRAINTS),)

.PHONY: setup train test test-slow test-seqio lint bench bench-peers gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(wildcard $(CONSTRAINTS))
	@test -n "$(CONSTRAINT_FLAG)" || echo "note: no $(CONSTRAINTS) for $(PY_TAG): installing untested newest releases"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_FIRST),$(PY) -m pip install --quiet $(CONSTRAINT_FLAG) $(TORCH_FIRST))
	$(PY) -m pip install --quiet $(CONSTRAINT_FLAG) -e ".[test,hf,lm_eval,datasets,tpu]"
	touch $(STAMP)

train: setup
	$(PY) launch/train.py --config configs/tiny.py

test: setup
	$(PY) -m pytest -q -n 2  # two workers: the tests are mostly single-threaded XLA programs

test-slow: setup
	$(PY) -m pytest -q -n 2 -m slow

# The optional seqio source (seqio + TensorFlow, ~2.4 GB) in a venv of its own.
test-seqio:
	$(PYTHON) -m venv .venv-seqio
	.venv-seqio/bin/python -m pip install --quiet -c constraints-seqio.txt -e ".[test,seqio]"
	.venv-seqio/bin/python -m pytest -q tests/test_data_seqio.py

lint: setup
	$(VENV)/bin/ruff check plamo_jax configs launch tools tests benchmarks

bench: setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_data.py

# The peer comparison (benchmarks/bench_peers.py): MaxText in a Python 3.12 venv of its own, the pinned
# wheel plus its CPU requirement list (the one without Google Cloud clients) less the NVIDIA wheels,
# on the jax of our 3.12 stack. Not run by CI.
MAXTEXT_VENV ?= .venv-maxtext
MAXTEXT_VERSION ?= 0.2.5
MAXTEXT_JAX ?= 0.12.0.1
MAXTEXT_REQUIREMENTS := dependencies/requirements/generated_requirements/decoupled-requirements.txt

$(MAXTEXT_VENV)/.installed:
	$(shell .ci/find-python 3.12) -m venv $(MAXTEXT_VENV)
	$(MAXTEXT_VENV)/bin/python -m pip install --quiet maxtext==$(MAXTEXT_VERSION)
	grep -vE '^(nvidia-|apache-tvm-ffi|jax>=|jaxlib>=)' \
	  $(MAXTEXT_VENV)/lib/python3.12/site-packages/$(MAXTEXT_REQUIREMENTS) > $(MAXTEXT_VENV)/requirements.txt
	$(MAXTEXT_VENV)/bin/python -m pip install --quiet -r $(MAXTEXT_VENV)/requirements.txt \
	  jax==$(MAXTEXT_JAX) jaxlib==$(MAXTEXT_JAX)
	touch $@

bench-peers: setup $(MAXTEXT_VENV)/.installed
	$(PY) benchmarks/bench_peers.py --maxtext-python $(MAXTEXT_VENV)/bin/python --profile

# Wheels for benchmarks/gpu_check.sh on a GPU machine without a package registry (Python 3.12, x86-64,
# whose image has jax, CUDA and most of our needs but not these): saved to .whl/, which the script installs.
GPU_WHEELS := grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 tensorboardX==2.6.5 \
  flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 tensorstore==0.1.86
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf runs .pytest_cache
