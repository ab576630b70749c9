# Two entry points for a fresh machine: `make demo` and `make test`. Both create the venv and
# install everything the project needs (torch from this machine's disk, the rest from PyPI).
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP     := $(VENV)/.installed

export CUDA_HOME

.PHONY: install demo test bench clean

$(STAMP): setup.py requirements.txt requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mtdl_fast run

test: $(STAMP)
	$(PY) -m pytest -q tests

# The whole benchmark suite on this machine's GPU (else its CPU): benchmarks/results/<device>.json,
# tables, plots, and README.md's performance section regenerated from every results file. Pass
# options through BENCH_ARGS, e.g. `make bench BENCH_ARGS="--only step --threads 2"`.
bench: $(STAMP)
	$(PY) -m mtdl_fast bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info mtdl_fast/_C*.so
