"""Test configuration. TRITON_INTERPRET must be set before triton is first imported so the
Triton kernels run on the CPU; on a machine with a GPU the kernels run natively instead."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on: the GPU when present, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
