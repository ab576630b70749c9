"""pytest-benchmark configuration of the micro-benchmarks (``benchmarks/test_*.py``).

    python -m pytest benchmarks --benchmark-enable --benchmark-json benchmarks/results/<device>-cpu.json
    python -m pytest benchmarks --benchmark-enable --quick     # smallest sizes: a smoke run

Every record gets its thread count, load average, date and command; an existing ``--benchmark-json``
file keeps the records this run does not make (the scripts', or tests left out with ``-k``).
"""
import json
import os
import shlex
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the host-overhead benchmark's Triton path on a CPU

from benchmarks import common  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--quick", action="store_true", help="smallest benchmark sizes (a smoke run)")
    parser.addoption("--device", default="cpu", help="device of the reductions and host-overhead benchmarks")


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--quick"))


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(autouse=True)
def measurement_conditions(benchmark, request: pytest.FixtureRequest):
    """One thread unless the test sets another; the conditions are recorded after the measurement."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load = common.load_average()
    yield
    benchmark.extra_info.update(common.conditions(load))
    benchmark.extra_info["command"] = "python -m pytest " + shlex.join(request.config.invocation_params.args)
    torch.set_num_threads(threads)


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info.update(common.machine_info(torch.device(config.getoption("--device"))))


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)  # every round's time: kilobytes per record, read by nothing here
    path = config.getoption("benchmark_json")
    if path and Path(path).exists():
        kept = json.loads(Path(path).read_text())["benchmarks"]
        output_json["benchmarks"] = common.merged(kept, output_json["benchmarks"])
