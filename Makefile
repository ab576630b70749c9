# Two entry points for a fresh machine: `make demo` and `make test`. Both create the venv and
# install everything the project needs (torch from this machine's disk, the rest from PyPI).
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP     := $(VENV)/.installed

export CUDA_HOME

.PHONY: install demo test lint bench clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q --no-build-isolation -e ".[app,dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mtdl_fast run

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# Every CPU benchmark on this machine (one core: about 15 minutes), the results file, the README tables.
bench: $(STAMP)
	$(PY) -m benchmarks.run cpu

# On a CUDA machine without network, with its own python3 and torch: build _C, run the CUDA tests and the
# GPU benchmarks (under 8 minutes on an H100/H200). DRY_RUN=1 lists the steps and checks they import.
.PHONY: gpu-check
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) -m benchmarks.run gpu $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf build *.egg-info mtdl_fast/_C*.so
