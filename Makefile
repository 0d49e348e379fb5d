# make demo: the whole pipeline on Digits-LT.  make test: the test suite.  Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned to the CPU build on this disk for development; the package itself accepts torch>=2.4.
TORCH  ?= torch==2.13.0
# Triton runs the fused kernels on a GPU, and in its interpreter on a CPU (the tests use that here).
TRITON ?= triton==3.8.0
STAMP  := $(VENV)/.installed
NATIVE := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)

.PHONY: demo test bench bench-pytest clean

demo: $(STAMP)
	$(BIN)/ltdd demo

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q tests

# every native operator against its reference on this machine's CPU; ratios printed, rows in bench/results/
bench: $(STAMP)
	$(BIN)/ltdd bench ops --device cpu --backend native --json bench/results/cpu-$$(date +%F).json

# the same cases under pytest-benchmark, reference and fast side by side (BENCH_DEVICE=cuda on a GPU)
bench-pytest: $(STAMP)
	$(BIN)/pip install -q pytest-benchmark
	$(BIN)/python -m pytest bench --benchmark-group-by=param:case --benchmark-columns=min,median,max

# Reinstalled when the build description or native sources change; Python sources are installed editable.
$(STAMP): setup.py pyproject.toml Makefile $(NATIVE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel ninja
	$(BIN)/pip install -q "$(TORCH)" "$(TRITON)" numpy pytest
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation -e .
	touch $@

clean:
	rm -rf build $(VENV) *.egg-info ltdd_fast/_C*.so
