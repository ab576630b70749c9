"""Smoke test of the benchmark suite's machinery at tiny sizes on the CPU: the pytest-benchmark tests
(guards included) into a results file, the step and affinity scripts merging into it, the GPU sweeps'
records with a CPU timer, the README tables drawn from the files (and README.md current), and
``make gpu-check DRY_RUN=1``'s step list with every script and test importing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import affinity, common, gpu_sweeps, readme, run, step
from mtdl_fast.app.data import load_sample_photos
from mtdl_fast.app.reports import markdown_table

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def _record(case: str, contender: str, seconds: float, **extra) -> dict:
    return common.record("g", case, contender, [seconds, seconds * 1.1, seconds * 0.9], **extra)


def test_readme_is_current():
    """README.md's performance block is what benchmarks/results gives (else: python -m benchmarks.readme)."""
    assert readme.update(ROOT / "README.md", check=True) is False


def test_tables_take_ratios_floors_and_targets_from_the_records(tmp_path):
    rows = [_record("B=8", "ours", 0.002, role="reference", items=8, bytes=4e6, target="<= 3x floor"),
            _record("B=8", "floor", 0.001, role="floor", bytes=8e6),
            _record("B=8", "peer", 0.008, items=8, target=">= 5x ref", columns={"ops": 12}, note="checked"),
            _record("B=8", "slow peer", 0.05, target=">= 5x peer"),
            _record("other", "alone", 0.5, target="< 0.3 s", floor_s=0.25)]
    lines = readme.table(rows).splitlines()
    assert lines[0] == "| case | contender | ms/call | images/s | GB/s | x floor | x ref | ops | target | note |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|---|---|"
    assert lines[2] == "| B=8 | ours | 2 | 4,000 | 2 | 2x | 1x | - | <= 3x floor: met |  |"
    assert lines[4] == "|  | peer | 8 | 1,000 | - | 8x | 4x | 12 | >= 5x ref: **NOT met** | checked |"
    assert "| >= 5x peer: met |" in lines[5]
    assert lines[6].startswith("| other | alone | 500 | - | - | 2x | - |") and "< 0.3 s: **NOT met**" in lines[6]
    with pytest.raises(ValueError, match="target"):
        readme.judge("about 5", rows[0], rows, None, None)


def test_markdown_table_aligns_columns_and_checks_the_alignment():
    assert markdown_table([["a", "1"]], ["r"], ["x", "y"], align="lr").splitlines()[1] == "|---|---|---:|"
    with pytest.raises(ValueError, match="align"):
        markdown_table([["a", "1"]], ["r"], ["x", "y"], align="l")
    with pytest.raises(TypeError, match="align"):
        markdown_table([["a", "1"]], ["r"], ["x", "y"], align=["l", "r"])


def test_quick_suite_writes_one_results_file_the_readme_renders(tmp_path):
    results = tmp_path / "tiny-cpu.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *run.CPU_BENCH_TESTS, "--quick",
                           "--benchmark-enable", "--benchmark-min-rounds=1", "--benchmark-max-time=0.01",
                           f"--benchmark-json={results}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common.merge(results, step.run(CPU, batch=2, every=2, budget_s=0.001), CPU)
        common.merge(results, affinity.run(CPU, batch=2, k=2, budget_s=0.001), CPU)
    finally:
        torch.set_num_threads(threads)
    x = load_sample_photos(32, 2, seed=0)
    timer = lambda fn: [1e3 * t for t in common.time_call(fn, 0.001)]  # noqa: E731
    common.merge(results, [gpu_sweeps.augment_record("mtdl-fast torch", x, timer, 10.0, None),
                           gpu_sweeps.ce_record("torch twin", 4, CPU, timer, 10.0)], CPU)
    groups = {r["group"].split(" (")[0].split(",")[0] for r in json.loads(results.read_text())["benchmarks"]}
    assert groups == {"augment", "augment in DataLoader workers", "grouping", "reductions",
                      "host overhead of the Triton path", "training step", "affinity", "augment sweeps",
                      "lookahead cross-entropy sweep"}
    text = readme.render(tmp_path)
    assert "finds the exhaustive optimum" in text and "Z equals the naive loop's" in text
    assert "summed per-task gradients == one backward" in text and "identity and flip views exact" in text
    assert "| tasks(x), kernel launches stubbed |" in text and "No GPU results file yet" in text


def test_gpu_check_dry_run_lists_budgets_within_8_minutes_and_everything_imports(capsys):
    assert run.main(["gpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "build mtdl_fast._C" in out and "tests/test_kernel_fused_views.py" in out
    assert sum(s.budget_s for s in run.gpu_plan()) <= 8 * 60
    assert "ok: 4 scripts import" in out
