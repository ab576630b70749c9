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

clean:
	rm -rf build *.egg-info mtdl_fast/_C*.so
