"""Smoke test of benchmarks/bench_affinity.py: the quick CPU run (B=16, K=4, one repeat), not written."""
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_affinity.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_affinity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_affinity", mod)
    spec.loader.exec_module(mod)
    return mod


def test_quick_cpu_run_times_every_contender_and_passes_the_guard(tmp_path):
    bench = _load()
    threads = torch.get_num_threads()
    results_before = {p: p.stat().st_mtime for p in bench.C.RESULTS_DIR.glob("*")} if bench.C.RESULTS_DIR.exists() else {}
    t0 = time.perf_counter()
    section = bench.run(quick=True, device="cpu", verbose=False)
    assert time.perf_counter() - t0 < 60
    assert torch.get_num_threads() == threads          # the thread setting is restored

    assert section["quick"] is True
    cfg = section["config"]
    assert cfg["batch"] == bench.QUICK_BATCH and cfg["K"] == bench.QUICK_TASKS

    # The correctness guard ran and passed before anything was timed.
    guard = section["guard"]
    assert guard["passed"] is True and section["targets"]["guard_passed"] is True
    assert guard["max_abs_diff_batched exact"] <= bench.GUARD_ATOL

    contenders = section["contenders"]
    cpu_contenders = [n for n in bench.CONTENDERS if n != bench.EXACT_NOFUSE]
    for name in cpu_contenders:
        res = contenders[name]
        assert res["status"] == "ok", (name, res)
        assert res["median_s"] > 0 and math.isfinite(res["median_s"]), name
        assert res["repeats"] >= 1
    assert contenders[bench.EXACT_NOFUSE]["status"] == "skipped"   # CUDA only

    # Peak memory of the chunk sweep, each chunk size's Z checked against the naive loop.
    sweep = section["chunk_sweep"]
    assert [r["chunk_size"] for r in sweep] == [None, 2, 1]          # 5 >= K=4 is dropped
    for row in sweep:
        assert row["status"] == "ok", row
        assert row["median_s"] > 0
        assert row["max_abs_diff_vs_naive"] <= bench.GUARD_ATOL
        assert row["peak_bytes"] is None or row["peak_bytes"] > 0

    # Ratios, targets and FLOPs are filled in.
    r = section["ratios"]
    assert r["naive_over_batched_exact"] > 0 and r["first_order_over_plain_step"] > 0
    assert 0 < r["reduction_over_batched_exact"] < 1
    assert set(section["targets"]) >= {"cpu_batched_exact_ge_1.5x_naive", "reduction_lt_1pct_of_step"}
    assert section["flops"]["flops"][bench.EXACT] > 0
    flops = section["flops"]["flops"]
    assert flops[bench.EXACT] > flops[bench.PLAIN] > 0
    # Counted with grouped-convolution weight gradients once, the batched paths do the loop's work.
    assert abs(flops[bench.EXACT] / flops[bench.NAIVE] - 1) < 0.01
    assert abs(flops[bench.FIRST_ORDER] / flops[bench.PLAIN] - 1) < 0.01

    # The table names every contender, and nothing was written.
    for name in cpu_contenders:
        assert f"| {name} |" in section["table"]
    after = {p: p.stat().st_mtime for p in bench.C.RESULTS_DIR.glob("*")} if bench.C.RESULTS_DIR.exists() else {}
    assert after == results_before


def test_write_merges_under_affinity_key(tmp_path):
    bench = _load()
    path = tmp_path / "dev.json"
    path.write_text('{"augment": {"kept": true}}\n')
    section = {"env": {"device": "cpu"}, "table": "| t |", "x": 1}
    out = bench.write(section, path)
    import json

    data = json.loads(out.read_text())
    assert data["augment"] == {"kept": True} and data["affinity"]["x"] == 1
    assert (tmp_path / "dev-affinity.md").read_text() == "| t |\n"


def test_flop_count_of_grouped_conv_backward_matches_separate_convs():
    bench = _load()
    x = torch.randn(2, 8, 10, 10)
    w = torch.randn(8, 2, 3, 3)

    def grouped():
        wg = w.clone().requires_grad_()
        torch.nn.functional.conv2d(x, wg, groups=4).sum().backward()

    def separate():
        for i in range(4):
            wi = w[2 * i:2 * i + 2].clone().requires_grad_()
            torch.nn.functional.conv2d(x[:, 2 * i:2 * i + 2], wi).sum().backward()

    assert bench.count_flops(grouped) == bench.count_flops(separate) > 0


def test_spec_peaks_match_gpu_names():
    bench = _load()
    peaks, desc = bench.C.spec_peak_tflops("NVIDIA H100 80GB HBM3")
    assert desc == "H100 SXM" and peaks["bf16"] > 900 and peaks["fp32"] == 67.0
    assert bench.C.spec_peak_tflops("NVIDIA H100 PCIe")[1] == "H100 PCIe"
    assert bench.C.spec_peak_tflops("AMD EPYC") == (None, None)
