"""The main job end to end at toy size: run directory contents, exact resume, checkpoint integrity,
and the CLI's one-line errors (exit code 2, nothing overwritten)."""
import json
import os
import signal

import numpy as np
import pytest
import torch

from mtdl_fast.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mtdl_fast.app.cli import main
from mtdl_fast.app.trainer import RunConfig, run

TINY = ["--tasks", "identity,rotate,brightness", "--steps", "6", "--batch-size", "16", "--image-size", "8",
        "--affinity-every", "2", "--checkpoint-every", "3", "--budget", "2", "--trunk", "mlp"]


def tiny_config(**overrides) -> RunConfig:
    base = dict(tasks=["identity", "rotate", "brightness"], steps=6, batch_size=16, image_size=8, affinity_every=2,
                checkpoint_every=3, budget=2, trunk="mlp", eval_size=64)
    base.update(overrides)
    return RunConfig(**base)


def test_run_writes_the_whole_run_directory(tmp_path):
    assert main(["run", "--out", str(tmp_path / "run"), *TINY]) == 0
    out = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "affinity.npy", "affinity.csv", "groups.json", "results.json",
                 "report.md", "affinity.png", "accuracy.png", "curves.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    affinity = np.load(out / "affinity.npy")
    assert affinity.shape == (3, 3) and np.isfinite(affinity).all()
    groups = json.loads((out / "groups.json").read_text())
    assert sorted({t for g in groups["groups"] for t in g}) == [0, 1, 2]
    results = json.loads((out / "results.json").read_text())
    matrix = np.array(results["accuracy_matrices"][0]["matrix"])
    assert matrix.shape == (4, 3) and ((0 <= matrix) & (matrix <= 1)).all()
    assert "rotate" in (out / "report.md").read_text()


@pytest.mark.parametrize("interrupted_step", [2, 4, 5])
def test_ctrl_c_mid_step_then_resume_reaches_the_same_result(tmp_path, monkeypatch, interrupted_step):
    full = run(tiny_config(), tmp_path / "full")
    # Ctrl-C arrives in the middle of a step (after its augmentation drew parameters): the step
    # finishes, a checkpoint of the completed step is written, then the run stops.
    import mtdl_fast.engine as engine_module

    original = engine_module.MTDLEngine.step_views

    def interrupted(self, views, y):
        if self.step_count + 1 == interrupted_step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, views, y)

    monkeypatch.setattr(engine_module.MTDLEngine, "step_views", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(), tmp_path / "cut")
    monkeypatch.setattr(engine_module.MTDLEngine, "step_views", original)
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == interrupted_step
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, interrupted_step + 1))
    resumed = run(tiny_config(), tmp_path / "cut", resume=tmp_path / "cut" / "checkpoint.pt")
    assert np.array_equal(resumed["affinity"], full["affinity"])
    assert [r["loss"] for r in resumed["metrics"]] == [r["loss"] for r in full["metrics"]]
    assert np.array_equal(resumed["accuracy_matrices"][0]["matrix"], full["accuracy_matrices"][0]["matrix"])


def test_checkpoint_corruption_and_foreign_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"format": "x", "value": torch.arange(10)})
    assert torch.equal(load_checkpoint(path)["value"], torch.arange(10))
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[:-7])
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    torch.save({"a": 1}, tmp_path / "foreign.pt")
    for name, match in (("truncated.pt", "checksum"), ("flipped.pt", "checksum"), ("foreign.pt", "not an mtdl-fast"),
                        ("missing.pt", "does not exist")):
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / name)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--tasks", "identity,warp_drive"], "unknown task 'warp_drive'"),
        (["run", "--dataset", "imagenet-22k"], "unknown dataset"),
        (["run", "--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "cifar"),
        (["run", "--dataset", "npz", "--data-dir", "/nonexistent/x.npz"], "data-dir"),
        (["run", "--model", "transformer"], "model must be"),
        (["run", "--device", "tpu"], "unknown device"),
        (["run", "--steps", "0"], "steps"),
        (["run", "--steps", "5", "--epochs", "1"], "not allowed with"),
        (["groups", "/nonexistent/affinity.npy"], "does not exist"),
        (["eval", "/nonexistent/checkpoint.pt"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(argv, message, tmp_path, capsys):
    code = main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] == "run" else [])])
    err = capsys.readouterr().err
    assert code == 2
    assert message.lower() in err.lower() and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_never_overwrites_a_previous_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["run", "--out", str(out), *TINY]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "{}"


def test_resume_refuses_a_corrupt_or_mismatched_checkpoint(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "run"), *TINY]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    results_before = (tmp_path / "run" / "results.json").read_text()
    assert main(["run", "--resume", str(ckpt), *TINY[:-2], "--budget", "3"]) == 2
    err = capsys.readouterr().err
    assert "--budget 3 differs from the checkpoint's 2" in err and len(err.strip().splitlines()) == 1
    assert main(["run", "--resume", str(ckpt), "--steps", "4"]) == 2
    assert "--steps 4 cannot continue" in capsys.readouterr().err
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert main(["run", "--resume", str(ckpt), *TINY]) == 2
    assert "checksum" in capsys.readouterr().err
    assert (tmp_path / "run" / "results.json").read_text() == results_before


def test_resume_alone_restores_the_saved_options_and_may_run_longer(tmp_path, capsys):
    args = ["--tasks", "identity,brightness", "--steps", "3", "--batch-size", "8", "--image-size", "8",
            "--affinity-every", "2", "--checkpoint-every", "3", "--budget", "2", "--trunk", "mlp", "--lr", "0.1"]
    assert main(["run", "--out", str(tmp_path / "run"), *args]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert main(["run", "--resume", str(ckpt)]) == 0  # nothing given: the saved options, nothing to add
    assert main(["run", "--resume", str(ckpt), "--steps", "5"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["steps"] == 5 and config["lr"] == 0.1 and config["tasks"] == ["identity", "brightness"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert load_checkpoint(ckpt)["step"] == 5


def test_groups_and_eval_commands(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "run"), *TINY]) == 0
    capsys.readouterr()
    assert main(["groups", str(tmp_path / "run" / "affinity.csv"), "--budget", "2"]) == 0
    assert "rotate" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run" / "checkpoint.pt"), "--tasks", "identity,hue"]) == 0
    assert "hue" in capsys.readouterr().out


def test_run_with_selective_task_group_updates(tmp_path):
    assert main(["run", "--out", str(tmp_path / "run"), *TINY, "--strategy", "stgu"]) == 0
    record = json.loads((tmp_path / "run" / "stgu.json").read_text())
    assert sorted(t for g in record["groups"] for t in g) == [0, 1, 2]
    assert main(["run", "--out", str(tmp_path / "bad"), *TINY, "--strategy", "round_robin"]) == 2


def test_paper_protocol_compares_settings_over_seeds_with_intervals(tmp_path):
    results = run(tiny_config(protocol="paper", steps=4, seeds=2), tmp_path / "paper")
    protocol = results["protocol"]
    assert protocol["seeds"] == [0, 1] and protocol["columns"] == ["identity", "rotate", "brightness", "mean"]
    assert list(protocol["accuracy"]) == ["each alone", "all together", "TAG groups", "HOA groups"]
    for row in protocol["accuracy"].values():
        assert len(row["mean"]) == 4 and all(0 <= a <= 1 for a in row["mean"])
        assert all(c >= 0 for c in row["ci"])
        assert row["mean"][-1] == pytest.approx(np.mean(row["mean"][:3]))
    assert set(protocol["differences"]) == {"TAG groups - all together", "TAG groups - each alone"}
    agreement = protocol["rank_agreement"]["TAG exact"]
    assert len(agreement["per_seed"]) == 2
    shift = results["accuracy_matrices"][1]
    assert np.asarray(shift["matrix"]).shape == (4, 3)
    pair_error = np.asarray(results["pair_error"])
    assert pair_error.shape == (3, 3) and ((0 <= pair_error) & (pair_error <= 1)).all()
    report = (tmp_path / "paper" / "report.md").read_text()
    assert "## Grouping analysis" in report and " ± " in report and "Spearman" in report
    assert (tmp_path / "paper" / "settings.png").is_file()


def test_protocol_statistics_against_hand_computations():
    from scipy import stats

    from mtdl_fast.app.protocol import interval, pair_effects, rank_agreement

    samples = np.array([[0.7, 0.9], [0.8, 0.8], [0.9, 0.7]])
    mean, half = interval(samples)
    np.testing.assert_allclose(mean, [0.8, 0.8])
    np.testing.assert_allclose(half, stats.t.ppf(0.975, 2) * np.array([0.1, 0.1]) / np.sqrt(3))
    pair = np.array([[0.5, 0.6, 0.4], [0.7, 0.6, 0.6], [0.5, 0.5, 0.5]])
    alone = np.diag(pair).copy()
    effects = pair_effects(pair, alone)
    assert effects[0, 1] == pytest.approx((0.6 - 0.5) + (0.7 - 0.6))
    assert effects[0, 2] == pytest.approx((0.4 - 0.5) + (0.5 - 0.5)) and effects[2, 0] == effects[0, 2]
    signal = np.array([[0.0, 3.0, -1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])  # pair scores 3, -1, 1
    assert rank_agreement(signal, effects) == pytest.approx(1.0)  # effects 0.2, -0.1, 0.0: same order
    assert rank_agreement(-signal, effects) == pytest.approx(-1.0)


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_run_on_the_users_own_data(kind, tmp_path):
    g = np.random.default_rng(0)
    x = (g.random((36, 3, 8, 8)) * 255).astype(np.uint8)
    y = np.arange(36) % 3
    if kind == "npz":
        source = tmp_path / "data.npz"
        np.savez(source, x=x, y=y)
    else:
        from PIL import Image

        source = tmp_path / "images"
        for i, (image, label) in enumerate(zip(x, y)):
            (source / f"class{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(source / f"class{label}" / f"{i}.png")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY, "--dataset", kind, "--data-dir", str(source)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert np.array(results["accuracy_matrices"][0]["matrix"]).shape == (4, 3)
