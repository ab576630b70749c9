"""What a new user gets wrong on the command line: every case is one line on stderr, exit code 2,
and nothing left behind in --out; and the options that turn things off or point elsewhere."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtdl_fast.app.cli import main

TINY = ["--tasks", "identity,brightness", "--steps", "2", "--batch-size", "8", "--image-size", "8",
        "--affinity-every", "2", "--budget", "2", "--trunk", "mlp"]


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _npz(path: Path, x, y) -> Path:
    np.savez(path, x=x, y=y)
    return path


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)


def _case(tmp: Path, name: str) -> tuple[list[str], str]:
    """(extra argv, expected fragment of the message) for one bad input, its files made in tmp."""
    if name == "out is a file":
        (tmp / "file").write_text("x")
        return ["--out", str(tmp / "file")], "is a file"
    if name == "out under a file":
        (tmp / "file").write_text("x")
        return ["--out", str(tmp / "file" / "run")], "which is a file"
    if name == "npz is a directory":
        return ["--dataset", "npz", "--data-dir", str(tmp)], "naming an .npz file"
    if name == "folder is a file":
        (tmp / "file").write_text("x")
        return ["--dataset", "folder", "--data-dir", str(tmp / "file")], "folder of class subfolders"
    if name == "empty folder":
        (tmp / "images").mkdir()
        return ["--dataset", "folder", "--data-dir", str(tmp / "images")], "class folder"
    if name == "empty class folder":
        _png(tmp / "images" / "cat" / "a.png", 0)
        (tmp / "images" / "dog").mkdir()
        return ["--dataset", "folder", "--data-dir", str(tmp / "images")], "dog"
    if name == "corrupt image":
        for i in range(3):
            _png(tmp / "images" / "cat" / f"{i}.png", i)
            _png(tmp / "images" / "dog" / f"{i}.png", 10 + i)
        (tmp / "images" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return ["--dataset", "folder", "--data-dir", str(tmp / "images")], "bad.png is not a readable image"
    if name == "x and y of different lengths":
        return ["--dataset", "npz", "--data-dir", str(_npz(tmp / "d.npz", _images(10), np.arange(9) % 2))], \
            "10 images but y has 9 labels"
    if name == "string labels":
        return ["--dataset", "npz", "--data-dir", str(_npz(tmp / "d.npz", _images(10), np.array(["a", "b"] * 5)))], \
            "integer labels"
    if name == "negative labels":
        return ["--dataset", "npz", "--data-dir", str(_npz(tmp / "d.npz", _images(10), np.arange(10) - 1))], \
            "labels must be >= 0, found -1"
    if name == "one class":
        return ["--dataset", "npz", "--data-dir", str(_npz(tmp / "d.npz", _images(10), np.zeros(10, int)))], \
            "at least 2 classes"
    if name == "text npz":
        (tmp / "d.npz").write_text("x,y\n1,2\n")
        return ["--dataset", "npz", "--data-dir", str(tmp / "d.npz")], "not a readable .npz"
    if name == "garbage npz":
        (tmp / "d.npz").write_bytes(os.urandom(300))
        return ["--dataset", "npz", "--data-dir", str(tmp / "d.npz")], "not a readable .npz"
    if name == "lr nan":
        return ["--lr", "nan"], "lr must be a finite number > 0, got nan"
    if name == "lr inf":
        return ["--lr", "inf"], "lr must be a finite number > 0, got inf"
    if name == "cifar10 missing":
        return ["--dataset", "cifar10", "--data-dir", str(tmp)], "nothing is downloaded"
    raise AssertionError(name)


CASES = ["out is a file", "out under a file", "npz is a directory", "folder is a file", "empty folder",
         "empty class folder", "corrupt image", "x and y of different lengths", "string labels", "negative labels",
         "one class", "text npz", "garbage npz", "lr nan", "lr inf", "cifar10 missing"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(name, tmp_path, capsys):
    extra, fragment = _case(tmp_path, name)
    out = ["--out", str(tmp_path / "run")] if "--out" not in extra else []
    code = main(["run", *TINY, *out, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err, err
    assert "allow_pickle" not in err and "download=True" not in err
    assert not (tmp_path / "run").exists(), "nothing may be left behind"


def test_read_only_out_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    real_access = os.access
    # tests may run as root, for whom every directory is writable: ask for the permission bits
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    assert main(["run", *TINY, "--out", str(parent / "run")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "none"])
def test_affinity_every_0_or_none_turns_affinity_off(value, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--affinity-every", value]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["affinity"] is None and results["groups"] is None and results["affinity_steps"] == 0
    assert not (out / "affinity.csv").exists()
    assert "No affinity measured in this run (affinity tracking was off)" in (out / "report.md").read_text()
    assert json.loads((out / "config.json").read_text())["affinity_every"] is None


def test_a_single_task_says_no_affinity_instead_of_a_score(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--tasks", "identity"]) == 0
    report = (out / "report.md").read_text()
    assert "No affinity measured in this run (a single task" in report and "-1e+06" not in report


def test_threads_are_applied_and_recorded(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--threads", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["threads"] == 2


def test_json_files_are_strict_json(tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out)]) == 0

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    strict((out / "config.json").read_text())
    strict((out / "results.json").read_text())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        strict(line)


def test_groups_warns_for_hoa_on_affinity_and_names_npy_tasks(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--tasks", "identity,brightness,invert"]) == 0
    capsys.readouterr()
    assert main(["groups", str(out / "affinity.npy"), "--budget", "2"]) == 0
    printed = capsys.readouterr().out
    assert "brightness" in printed and "invert" in printed
    assert main(["groups", str(out / "affinity.csv"), "--method", "hoa"]) == 0
    assert "HOA expects pairwise losses" in capsys.readouterr().err


def test_eval_takes_data_dir(tmp_path, capsys):
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    data = _npz(tmp_path / "d.npz", x, np.arange(40) % 3)
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), "--dataset", "npz", "--data-dir", str(data)]) == 0
    moved = tmp_path / "moved.npz"
    data.rename(moved)
    capsys.readouterr()
    assert main(["eval", str(out / "checkpoint.pt")]) == 2
    assert main(["eval", str(out / "checkpoint.pt"), "--data-dir", str(moved)]) == 0
    assert "| head identity |" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--model", "aligned", "--align-steps", "1"],
                                   ["--model", "aligned", "--trunk", "resnet"],
                                   ["--model", "soft", "--soft-lambda", "2"], ["--amp", "bf16"],
                                   ["--affinity-baseline", "tag"]])
def test_model_kinds_precision_and_affinity_definition_run_end_to_end(extra, tmp_path):
    out = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(out), *extra]) == 0
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "config.json").read_text())
    acc = np.asarray(results["accuracy_matrices"][0]["matrix"])
    assert ((0 <= acc) & (acc <= 1)).all()
    if "soft" in extra:  # every trunk parameter is per task: no shared update to measure
        assert results["affinity"] is None and config["soft_lambda"] == 2
        return
    assert np.isfinite(np.asarray(results["affinity"], float)).all()
    first_line = (out / "affinity.csv").read_text().splitlines()[0]
    want = "TAG's lookahead affinity" if "tag" in extra else "every source shares"
    assert first_line.startswith("# Z[i, j]") and want in first_line
