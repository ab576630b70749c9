"""The benchmark suite: pytest-benchmark tests (CPU micro-benchmarks), scripts on torch.utils.benchmark and
triton.testing, the results files and the README tables; run as ``python -m benchmarks.<script>``."""
