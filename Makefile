# Kasmina — every target that needs the environment bootstraps it first.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.kasmina-setup-stamp
BENCH_STAMP := $(VENV)/.kasmina-bench-stamp
# Run the Triton kernels through the interpreter on machines without a GPU.
INTERP := TRITON_INTERPRET=1

.PHONY: setup demo test test-fast bench bench-gpu gpu-wheels proto lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e ".[dev,demo]"
	touch $(STAMP)

demo: setup
	$(BIN)/kasmina demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pytest perf -q --benchmark-only --benchmark-columns=min,median,mean,ops $(PYTEST_ARGS)

# The GPU table also times Liger-Kernel: the bench extra. perf/gpu_check.sh is the whole GPU
# check (install, CUDA tests, table, perf/results/) for a machine whose torch is preinstalled.
bench-gpu: $(BENCH_STAMP)
	$(BIN)/python perf/bench_gpu.py $(BENCH_ARGS)

# Wheels a GPU machine without network needs for perf/gpu_check.sh (into perf/wheels, ignored).
gpu-wheels: setup
	PYTHON=$(BIN)/python bash perf/gpu_wheels.sh

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e ".[bench]"
	touch $(BENCH_STAMP)

proto: setup
	$(BIN)/python -m kasmina.leyline.regen

lint: setup
	$(BIN)/ruff check kasmina kernels tests perf
	$(BIN)/ruff format --check kasmina kernels tests perf

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
