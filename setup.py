"""Builds the `mtdl_fast._C` extension; the package's metadata and dependencies live in pyproject.toml.

The extension is C++ always; CUDA sources (``csrc/*.cu``) are added when torch is a CUDA build and
nvcc is present, or when ``FORCE_CUDA=1``. Build without isolation (``pip install
--no-build-isolation .``) so the extension is compiled against the torch it will run with.
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

cpp = sorted(glob.glob("csrc/*.cpp"))
cu = sorted(glob.glob("csrc/*.cu"))
# -fopenmp: ATen's at::parallel_for compiles to a serial loop without it (the runtime comes from
# libtorch's own libgomp).
cxx_flags = ["-O3", "-fopenmp"] if sys.platform.startswith("linux") else ["-O3"]
if os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None and cu):
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No visible GPU (CI, build hosts): torch cannot pick the architectures itself and fails.
        # A100 and H100 natively, PTX for anything newer.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    extension = CUDAExtension("mtdl_fast._C", cpp + cu, define_macros=[("MTDL_WITH_CUDA", "1")],
                              extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]})
else:
    extension = CppExtension("mtdl_fast._C", cpp, extra_compile_args=cxx_flags)

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
