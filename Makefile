# metarec: all set-up on a fresh machine goes through these targets.
#   make demo   - virtualenv + install + fetch ml-100k (offline default) + cold-start meta-learning run
#   make test   - virtualenv + install + the default test suite (offline, ~minutes on 2 cores)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
DEMO_FLAGS ?= --overwrite

.PHONY: setup data demo test test-slow lint format benchmark benchmark-rl clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) -c "from metarec.data import ensure_dataset; print('ml-100k at', ensure_dataset('ml-100k'))"

demo: data
	$(PY) -m experiments.coldstart.main --workdir=$(WORKDIR) $(DEMO_FLAGS)

test: setup
	$(PY) -m pytest -q -n 2

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-slow: setup
	$(PY) -m pytest -q -n 2 -m slow

benchmark: setup
	$(PY) -m benchmarks.meta_step.main --workdir=runs/benchmark

benchmark-rl: setup
	$(PY) -m benchmarks.rl_env.main --workdir=runs/bench_rl

clean:
	rm -rf $(VENV) .pytest_cache runs
