# Two entry points: `make train` (set up + train the tiny default model) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-slow test-seqio lint bench clean

setup: $(STAMP)

# torch first, pinned: a bare `transformers` install would otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,hf,lm_eval,datasets]"
	touch $(STAMP)

train: setup
	$(PY) launch/train.py --config configs/tiny.py

test: setup
	$(PY) -m pytest -q -n 2  # two workers: the tests are mostly single-threaded XLA programs

test-slow: setup
	$(PY) -m pytest -q -m slow

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

clean:
	rm -rf runs .pytest_cache
