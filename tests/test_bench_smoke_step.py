"""Smoke tests of benchmarks/bench_step.py (a tiny CPU run, not written) and of the README renderer
benchmarks/render_readme.py (idempotent, numbers from the files, loud on malformed files)."""
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"


def _load(name: str):
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("bench_step")


@pytest.fixture(scope="module")
def render():
    return _load("render_readme")


@pytest.fixture(scope="module")
def tiny_run(bench):
    """One tiny CPU run shared by the tests: B=4, K=2, (d) with affinity every 2 steps, short budget."""
    results = bench.C.RESULTS_DIR
    before = {p: p.stat().st_mtime for p in results.glob("*")} if results.exists() else {}
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    section = bench.run(quick=True, device="cpu", batch=4, tasks=2, every=2, budget_s=0.02, verbose=False)
    wall = time.perf_counter() - t0
    after = {p: p.stat().st_mtime for p in results.glob("*")} if results.exists() else {}
    return {"section": section, "wall": wall, "threads_before": threads, "threads_after": torch.get_num_threads(),
            "results_untouched": before == after}


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_tiny_run_structure_and_numbers(bench, tiny_run):
    section = tiny_run["section"]
    assert tiny_run["wall"] < 120                       # seconds on an idle core; generous for a shared one
    assert tiny_run["threads_after"] == tiny_run["threads_before"]
    assert tiny_run["results_untouched"]                # run() never writes

    assert set(section) >= {"env", "quick", "config", "guard", "variants", "components", "flops", "peak",
                            "ratios", "targets", "notes", "table"}
    cfg = section["config"]
    assert (cfg["batch"], cfg["K"], cfg["affinity_every_d"]) == (4, 2, 2)
    assert section["env"]["device"] == "cpu" and section["env"]["threads"] == 1
    assert section["guard"]["passed"] is True

    variants = section["variants"]
    assert list(variants) == bench.VARIANTS
    for name, r in variants.items():
        assert r["status"] == "ok", (name, r)
        for key in ("s_per_step", "ms_per_step", "images_per_s", "views_per_s", "median_s", "useful_TFLOPs_per_s",
                    "frac_measured_matmul"):
            assert _positive(r[key]), (name, key, r[key])
        assert r["images_per_s"] == pytest.approx(4 / r["s_per_step"])
        assert r["views_per_s"] == pytest.approx(2 * r["images_per_s"])
        # Every call's loss is recorded: finite, and training on the fixed batch lowers it.
        expected_calls = r["warmup_calls"] + r["repeats"]
        assert len(r["losses"]) == expected_calls * r["steps_per_call"]
        assert r["loss_finite"] and all(math.isfinite(v) for v in r["losses"]), name
        assert r["loss_decreased"] or r["loss_finite"], name
    assert variants[bench.EXACT10]["steps_per_call"] == 2      # timed over whole affinity cycles
    assert variants[bench.EXACT10]["affinity_steps"] >= 1
    assert variants[bench.EXACT1]["affinity_steps"] == variants[bench.EXACT1]["engine_steps"]
    assert variants[bench.FIRST]["affinity_mode"] == "first_order"
    assert variants[bench.NO_AFF].get("affinity_steps") is None
    decreased = [n for n, r in variants.items() if r["loss_decreased"]]
    assert len(decreased) >= len(variants) - 1, {n: (r["loss_first"], r["loss_last"]) for n, r in variants.items()}
    # K=2 are identity and horizontal_flip: deterministic, so torchvision's views equal mtdl-fast's and
    # every variant takes the same first two training steps from the same initial parameters.
    assert bench.task_names(2) == ["identity", "horizontal_flip"]
    ref = variants[bench.BASELINE]["losses"][:2]
    for name, r in variants.items():
        assert r["losses"][:2] == pytest.approx(ref, abs=1e-5), name
    assert variants[bench.EXACT10]["label"] == "(d) mtdl-fast, exact every 2 steps"

    for name, r in section["components"].items():
        assert r["status"] == "ok" and _positive(r["ms"]), name

    flops = section["flops"]
    assert _positive(flops["step_flops"]) and _positive(flops["forward_flops"])
    assert 2.0 < flops["step_over_forward"] <= 3.0      # backward ~ 2x forward, no input gradient of layer 1
    assert _positive(section["peak"]["measured_matmul"]["TFLOPs"])
    assert section["peak"]["spec_TFLOPs"] is None       # no published CPU peak

    ratios = section["ratios"]
    for name in bench.VARIANTS[1:]:
        assert _positive(ratios[f"{name}_vs_baseline"]), name
    assert ratios[f"{bench.EXACT10}_overhead_over_no_affinity"] is not None
    # GPU targets are not judged on the CPU.
    assert section["targets"] == {"gpu_mtdl_no_affinity_ge_5x_baseline": None,
                                  "gpu_exact_every_10_le_15pct_over_no_affinity": None}
    for r in variants.values():
        assert f"| {r['label']} |" in section["table"]


def test_torchvision_baseline_covers_the_default_tasks(bench):
    import mtdl_fast as mf

    transforms = bench.torchvision_transforms(list(mf.DEFAULT_TASKS), 32)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    views = bench.torchvision_views(x, transforms)
    assert len(views) == len(mf.DEFAULT_TASKS)
    for v in views:
        assert v.shape == (3, 3, 32, 32) and v.dtype == torch.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    assert torch.equal(views[0], x.float() / 255)                      # identity
    assert torch.equal(views[1], (x.float() / 255).flip(-1))           # horizontal flip
    with pytest.raises(ValueError, match="no torchvision equivalent"):
        bench.torchvision_transforms(["invert"], 32)


def test_write_merges_step_section_with_table_and_plot(bench, tiny_run, tmp_path):
    path = tmp_path / "dev.json"
    path.write_text('{"augment": {"kept": true}}\n')
    out = bench.write(tiny_run["section"], path)
    data = json.loads(out.read_text())
    assert data["augment"] == {"kept": True}
    assert data["step"]["variants"]["baseline"]["status"] == "ok"
    assert isinstance(data["step"]["command"], str) and data["step"]["command"]   # recorded by _common
    assert (tmp_path / "dev-step.md").read_text() == tiny_run["section"]["table"] + "\n"
    png = tmp_path / "dev-step.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# README renderer
# ----------------------------------------------------------------------------------------------

README_TEXT = """# Project

Intro prose that must survive.

## Performance

Hand-written explanation.

<!-- perf:begin -->
stale text 123
<!-- perf:end -->

Closing prose.
"""


@pytest.fixture
def results_dir(tmp_path, bench, tiny_run):
    """A results folder: the recorded CPU file plus a GPU-named file holding the tiny step section."""
    d = tmp_path / "results"
    d.mkdir()
    for p in (BENCH_DIR / "results").glob("*.json"):
        shutil.copy(p, d / p.name)
    bench.C.merge_results(d / "nvidia-test-gpu.json", "step", tiny_run["section"])
    return d


def test_renderer_is_idempotent_and_takes_numbers_from_the_files(render, results_dir, tiny_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    assert render.render_readme(readme, results_dir) is True
    first = readme.read_text()
    assert render.render_readme(readme, results_dir) is False      # second pass: nothing to change
    assert readme.read_text() == first
    assert render.render_readme(readme, results_dir, check=True) is False
    assert render.replace_block(first, render.render_block(render.load_results(results_dir), tmp_path)) == first

    # Prose outside the markers is kept; the stale block is gone.
    assert first.startswith("# Project\n\nIntro prose that must survive.\n\n## Performance\n\nHand-written explanation.")
    assert first.endswith("<!-- perf:end -->\n\nClosing prose.\n")
    assert "stale text 123" not in first
    block = first[first.index("<!-- perf:begin -->"):first.index("<!-- perf:end -->")]
    # Every results file is named, with its device; the step numbers are the file's.
    assert "`results/nvidia-test-gpu.json`" in block
    for path in results_dir.glob("*.json"):
        data = json.loads(path.read_text())
        for section in data.values():
            assert section["env"]["device_name"] in block
    step = tiny_run["section"]["variants"]
    assert render.fmt(step["baseline"]["images_per_s"]) in block
    assert "End-to-end training step" in block and "Quick smoke run, not a measurement" in block
    cpu = json.loads((results_dir / "cpu-amd-epyc.json").read_text())
    assert render.fmt(cpu["affinity"]["contenders"]["naive loop"]["median_s"] * 1e3) in block


def test_repository_readme_is_rendered_from_the_recorded_results(render):
    """README.md's performance block is what the renderer makes of benchmarks/results (re-render
    with `python benchmarks/render_readme.py` after recording results)."""
    assert render.render_readme(ROOT / "README.md", BENCH_DIR / "results", check=True) is False


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.write_text('{"affinity": {"env": '), "not valid JSON"),
    (lambda p: p.write_text('[1, 2]'), "top level is list"),
    (lambda p: _edit(p, lambda d: d["affinity"].pop("contenders")), "missing key 'contenders'"),
    (lambda p: _edit(p, lambda d: d["augment"]["env"].pop("device_name")), "missing key 'device_name'"),
    (lambda p: _edit(p, lambda d: d["augment"]["configs"][0]["contenders"]["mtdl-fast torch"].update(ms="fast")),
     "'ms' is str"),
    (lambda p: _edit(p, lambda d: d.update(grouping=[])), "section 'grouping' is list"),
])
def test_renderer_fails_loudly_on_a_malformed_results_file(render, results_dir, tmp_path, mutate, message, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README_TEXT)
    bad = results_dir / "cpu-amd-epyc.json"
    mutate(bad)
    with pytest.raises(render.ResultsError, match=message) as info:
        render.render_readme(readme, results_dir)
    assert "cpu-amd-epyc.json" in str(info.value)
    assert readme.read_text() == README_TEXT                          # nothing written
    code = render.main(["--readme", str(readme), "--results-dir", str(results_dir)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("render_readme: error: ") and "cpu-amd-epyc.json" in err and len(err.splitlines()) == 1


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("text, message", [
    ("# no markers\n", "exactly one"),
    ("<!-- perf:end -->\n<!-- perf:begin -->\n", "comes before"),
    ("<!-- perf:begin -->\n<!-- perf:begin -->\n<!-- perf:end -->\n", "exactly one"),
])
def test_renderer_refuses_a_readme_without_one_pair_of_markers(render, results_dir, tmp_path, text, message):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(render.ResultsError, match=message):
        render.render_readme(readme, results_dir)
    assert readme.read_text() == text


def test_plots_of_every_section(render, results_dir):
    path = results_dir / "cpu-amd-epyc.json"
    sections = {"augment", "affinity", "grouping", "step"} & set(json.loads(path.read_text()))
    assert {"augment", "affinity", "grouping"} <= sections
    pngs = render.plot_results(path)
    assert sorted(p.name for p in pngs) == sorted(f"cpu-amd-epyc-{name}.png" for name in sections)
    assert [p.name for p in render.plot_results(results_dir / "nvidia-test-gpu.json")] == ["nvidia-test-gpu-step.png"]
    for p in [*pngs]:
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_cli_bench_refuses_an_unknown_benchmark(capsys):
    from mtdl_fast.app.cli import main

    assert main(["bench", "--device", "cpu", "--only", "step,nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
