"""Triton kernels (installed as `mtdl_fast.kernels`). One file per fused operation; kernels know
nothing of tasks: they take tensors and a parameter table whose layout the kernel file defines."""
