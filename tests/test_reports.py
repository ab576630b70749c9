"""mtdl_fast.app.reports: report.md and its PNG figures from plain data (no model, no GPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib import image as mpimg

from mtdl_fast.app import reports

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["identity", "horizontal_flip", "rotate", "color_jitter"]


def synthetic_results(k: int = 4) -> dict:
    rng = np.random.default_rng(0)
    names = NAMES[:k]
    z = rng.normal(0.0, 2e-3, size=(k, k))
    z[np.diag_indices(k)] = 1e-2
    z[1, 3] = np.nan  # one cell not measured
    acc = np.clip(0.6 + 0.3 * np.eye(k) + rng.normal(0, 0.03, size=(k, k)), 0, 1)
    metrics = []
    for step in range(0, 120, 2):
        losses = [2.3 * math.exp(-step / (40 + 10 * j)) + 0.1 for j in range(k)]
        metrics.append({"step": step, "loss": float(sum(losses)), "losses": losses,
                        "images_per_s": 1000.0 + step})
    metrics.append({"step": 120, "eval_accuracy": 0.8})  # a non-training row: skipped by the curves
    return {
        "names": names,
        "config": {"dataset": "digits", "steps": 120, "lr": 0.05, "batch_size": 64,
                   "tasks": names, "model": {"name": "cnn", "width": 32}, "seed": 0},
        "affinity": z,
        "affinity_steps": 12,
        "groups": {"groups": [[0, 1], [2, 3]], "serving": [0, 0, 1, 1], "score": 0.00123,
                   "method": "tag-exhaustive"},
        "accuracy": {"rows": [f"head {n}" for n in names] + ["model"], "cols": names,
                     "matrix": np.vstack([acc, acc.mean(0, keepdims=True)]),
                     "title": "All tasks together: accuracy of each head on each distribution"},
        "accuracy_matrices": [{"rows": ["group 0", "group 1"], "cols": names,
                               "matrix": acc[:2], "title": "TAG groups"}],
        "protocol": {
            "columns": [*names, "mean"], "seeds": [0, 1, 2],
            "accuracy": {"all together": {"mean": [0.9, 0.8, 0.77, 0.78, 0.8125], "ci": [0.01] * 5},
                         "TAG groups": {"mean": [0.91, 0.82, 0.8, 0.806, 0.834], "ci": [0.02] * 5},
                         "each alone": {"mean": [0.88, 0.79, 0.75, None, 0.79], "ci": [float("nan")] * 5}},
            "differences": {"TAG groups - all together": {"mean": [0.01, 0.02, 0.03, 0.026, 0.0215],
                                                          "ci": [0.005] * 5},
                            "TAG groups - each alone": {"mean": [0.03, 0.03, 0.05, 0.0, 0.044],
                                                        "ci": [0.1] * 5}},
            "rank_agreement": {"TAG exact": {"per_seed": [0.5, 0.6, 0.7], "mean": 0.6, "ci": 0.248}},
            "groups": {0: {"TAG": [[0, 1], [2, 3]], "HOA": [[0, 2], [1, 3]]}},
        },
        "pair_error": 1 - acc,
        "hoa_groups": {"groups": [[0, 2], [1, 3]]},
        "skipped_steps": 0,
        "metrics": metrics,
        "throughput": {"images_per_s": 12345.6, "device": "cpu"},
        "timing": {"seconds": 75.25},
    }


def check_png(path, min_bytes: int = 2000) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert img.shape[0] > 100 and img.shape[1] > 100, img.shape
    assert float(img[..., :3].std()) > 0.01  # not a blank canvas
    return img


def test_full_report(tmp_path):
    results = synthetic_results()
    path = reports.write_report(tmp_path, results)
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")

    for name in NAMES:
        assert name in text
    # Sections in order.
    heads = ["# mtdl-fast run report", "## Configuration", "## Throughput", "## Accuracy",
             "## Inter-task affinity (TAG)", "## Pairwise errors (HOA)", "## Task groups", "## Grouping analysis",
             "## Training curves"]
    positions = [text.index(h) for h in heads]
    assert positions == sorted(positions)
    # Config, throughput, timing.
    assert "| lr | 0.05 |" in text
    assert "| model.name | cnn |" in text
    assert "12,345.6 images/s on cpu" in text
    assert "75.2 s (0:01:15)" in text
    assert "per step (the engine's step alone, median over 60 steps)" in text
    # Groups: members, serving group, TAG member score (mean affinity from the other members).
    z = results["affinity"]
    assert "| 0 | identity, horizontal_flip |" in text
    assert "| 1 | rotate, color_jitter |" in text
    assert f"| identity | 0 | identity, horizontal_flip | {z[1, 0]:.3e} |" in text
    assert f"| color_jitter | 1 | rotate, color_jitter | {z[2, 3]:.3e} |" in text
    assert "method: tag-exhaustive; score: 0.00123" in text
    assert "HOA groups (from the pairwise errors): {identity, rotate}; {horizontal_flip, color_jitter}" in text
    assert "| head identity |" in text and "| model |" in text
    assert "steps skipped for a non-finite loss: 0" in text
    # Grouping analysis: mean ± 95% half-width, None -> n/a, an undefined interval -> the mean alone.
    assert "| all together | 0.900 ± 0.010 | 0.800 ± 0.010 | 0.770 ± 0.010 | 0.780 ± 0.010 | 0.812 ± 0.010 |" in text
    assert "| each alone | 0.880 | 0.790 | 0.750 | n/a | 0.790 |" in text
    assert "On average the TAG groups beat training all together (+0.021 ± 0.005)" in text
    assert "are not distinguishable from training each alone" in text
    assert "| TAG exact | 0.600 ± 0.248 | +0.50, +0.60, +0.70 |" in text
    # NaN affinity cell is n/a in the table.
    row = next(line for line in text.splitlines() if line.startswith("| horizontal_flip |") and "n/a" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "horizontal_flip" and cells[4] == "n/a", cells
    # Figures: linked relatively, present, valid PNGs.
    for png in ["accuracy.png", "accuracy_1.png", "affinity.png", "curves.png", "settings.png"]:
        assert f"]({png})" in text
        check_png(tmp_path / png)
    assert str(tmp_path) not in text
    # Deterministic: the same results give the same text (figure-free fields, to keep this fast).
    text_only = {key: results[key] for key in ("names", "config", "groups", "timing")}
    first = reports.write_report(tmp_path / "a", text_only).read_text(encoding="utf-8")
    assert reports.write_report(tmp_path / "b", dict(text_only)).read_text(encoding="utf-8") == first


def test_minimal_report(tmp_path):
    path = reports.write_report(tmp_path / "run", {"names": ["a", "b"]})
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# mtdl-fast run report\n")
    assert "`a`, `b`" in text
    assert "##" not in text
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["report.md"]
    with pytest.raises(ValueError):
        reports.write_report(tmp_path, {"affinity": np.zeros((2, 2))})


def test_affinity_not_tracked(tmp_path):
    # The trainer passes a (1, 1) placeholder and 0 steps when no tracker ran: no figure, no error.
    text = reports.write_report(tmp_path, {"names": NAMES, "affinity": np.zeros((1, 1)),
                                           "affinity_steps": 0}).read_text(encoding="utf-8")
    assert "not measured in this run" in text
    assert not (tmp_path / "affinity.png").exists()
    text = reports.write_report(tmp_path, {"names": NAMES, "affinity": np.zeros((2, 2))}).read_text(encoding="utf-8")
    assert "does not match the 4 task names" in text


def test_markdown_table_exact():
    table = reports.markdown_table(np.array([[1.0, 0.25], [np.nan, -2.0]]), ["r0", "r|1"], ["x", "y"],
                                   fmt="{:.2f}", corner="c")
    assert table == ("| c | x | y |\n"
                     "|---|---:|---:|\n"
                     "| r0 | 1.00 | 0.25 |\n"
                     "| r\\|1 | n/a | -2.00 |")
    assert reports.markdown_table([[1, 0.5]], ["a"], ["x", "y"], fmt="{:.1f}") == (
        "|  | x | y |\n|---|---:|---:|\n| a | 1.0 | 0.5 |")
    assert reports.markdown_table([[None, "ok"]], ["a"], ["x", "y"]) == (
        "|  | x | y |\n|---|---:|---:|\n| a | n/a | ok |")
    with pytest.raises(ValueError):
        reports.markdown_table([[1.0]], ["a", "b"], ["x"])


def test_plot_affinity_nan_and_edge_cases(tmp_path):
    # All NaN (no colour range to take) and K above the annotation limit render.
    reports.plot_affinity(np.full((3, 3), np.nan), ["a", "b", "c"], tmp_path / "nan.png")
    k = reports.ANNOTATE_MAX + 1
    big = np.random.default_rng(1).normal(size=(k, k))
    reports.plot_affinity(big, [f"t{i}" for i in range(k)], tmp_path / "big.png")
    for name in ["nan", "big"]:
        check_png(tmp_path / f"{name}.png", min_bytes=1000)
    # A NaN cell among values is drawn grey, not as a colour of the map.
    reports.plot_affinity(np.array([[np.nan, 1.0], [-1.0, 0.0]]), ["a", "b"], tmp_path / "mixed.png")
    img = check_png(tmp_path / "mixed.png")[..., :3]
    grey = np.abs(img - 0xD0 / 255).max(axis=-1) < 0.02
    assert grey.sum() > 1000  # the NaN cell's area, at least
    with pytest.raises(ValueError):
        reports.plot_affinity(np.zeros((2, 3)), ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError):
        reports.plot_affinity(np.zeros((2, 2)), ["a"], tmp_path / "bad.png")


def test_group_member_scores():
    z = np.arange(9, dtype=float).reshape(3, 3)
    s = reports.group_member_scores(z, [0, 2])
    assert s == {0: z[2, 0], 2: z[0, 2]}
    s = reports.group_member_scores(z, [0, 1, 2])
    assert s[1] == pytest.approx((z[0, 1] + z[2, 1]) / 2)
    assert math.isnan(reports.group_member_scores(z, [1])[1])


def test_curves_without_per_task_losses(tmp_path):
    reports.plot_curves([{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)], tmp_path / "c.png")
    check_png(tmp_path / "c.png")
    reports.plot_curves([], tmp_path / "empty.png")
    check_png(tmp_path / "empty.png", min_bytes=1000)


def test_smoothing_averages_at_the_ends_too():
    y = np.array([1.0, 2.0, 3.0, 4.0, 10.0, np.nan, 7.0])
    s = reports._smooth(y, 3)
    np.testing.assert_allclose(s, [1.5, 2.0, 3.0, 17 / 3, 7.0, 8.5, 7.0])
    noisy = np.where(np.arange(101) % 2 == 0, 1.0, 0.0)
    ends = reports._smooth(noisy, 21)[[0, -1]]
    assert np.all(np.abs(ends - 0.5) < 0.1)  # not the raw 1.0 of the end points


def test_report_describes_the_data_and_warns_on_tiny_test_sets(tmp_path):
    results = synthetic_results()
    results["data"] = {"dataset": "digits", "classes": 10, "train": 1437, "test": 360, "evaluated": 40,
                       "image": [1, 16, 16], "preprocessing": "resized to 16x16"}
    text = reports.write_report(tmp_path, results).read_text(encoding="utf-8")
    assert "- digits: 10 classes, 1437 training and 360 test images of shape (1, 16, 16)" in text
    assert "over 40 test images" in text and "**warning**: 40 test images is a small test set" in text
    results["data"]["evaluated"] = 360
    assert "warning" not in reports.write_report(tmp_path, results).read_text(encoding="utf-8")


@pytest.mark.parametrize("names,why", [(["identity"], "a single task"), (["a", "b"], "tracking was off")])
def test_no_affinity_is_said_not_drawn(tmp_path, names, why):
    text = reports.write_report(tmp_path, {"names": names, "affinity": None, "groups": None}).read_text()
    assert "No affinity measured in this run" in text and why in text
    assert "-1e+06" not in text and "| group |" not in text
