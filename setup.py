"""Build mtdl_fast: the Python package, its Triton kernels and the `mtdl_fast._C` extension.

The extension is C++ always; CUDA sources (``csrc/*.cu``) are added when torch is a CUDA build and
nvcc is present, or when ``FORCE_CUDA=1``. ``MTDL_NO_EXTENSION=1`` skips the extension entirely
(the package then runs on its pure-PyTorch fallbacks and says so once at import).
"""
import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("MTDL_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    want_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None)
    if want_cuda and cu:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No visible GPU (CI, build hosts): torch cannot pick the architectures itself and fails.
            # A100 and H100 natively, PTX for anything newer.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        ext = CUDAExtension(
            "mtdl_fast._C",
            cpp + cu,
            define_macros=[("MTDL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
        )
    else:
        ext = CppExtension("mtdl_fast._C", cpp, extra_compile_args=["-O3"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="mtdl-fast",
    version="0.1.0",
    description="Kernel-backed engine for Multi-Task Distribution Learning",
    python_requires=">=3.10",
    packages=["mtdl_fast", "mtdl_fast.functional", "mtdl_fast.kernels", "mtdl_fast.app", "mtdl_fast.research"],
    package_dir={"mtdl_fast.kernels": "kernels"},
    install_requires=["torch>=2.11", "torchvision>=0.26", "triton>=3.6", "numpy"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["mtdl-fast=mtdl_fast.app.cli:main"]},
)
