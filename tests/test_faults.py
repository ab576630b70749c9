"""Fault tests: what a crash, a damaged checkpoint or a NaN does to a run.

1. Killed runs: `python -m mtdl_fast run` SIGKILLed mid-epoch after a periodic checkpoint, then
   resumed with --resume, ends exactly where an uninterrupted run ends (results.json, metrics,
   final checkpoint); the same for an in-process crash, and for a metrics row torn by the crash.
2. Damaged checkpoints (bytes flipped, truncated, empty, foreign, wrong payload) are refused by the
   checksum / format check with CheckpointError (CLI: exit code 2, one line naming the path), never
   unpickled, never loaded silently; a save interrupted at any point leaves the previous checkpoint
   intact and no temporary file behind.
3. NaN in a batch or in a loss: the step is skipped and counted (engine and tracker), training
   state (parameters, optimizer, weighting statistics, running affinity, BatchNorm statistics) is
   left as it was, and training goes on with finite losses.
"""
import copy
import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtdl_fast as mf
import mtdl_fast.app.trainer as trainer_module
import mtdl_fast.engine as engine_module
from mtdl_fast.app.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint
from mtdl_fast.app.cli import main
from mtdl_fast.app.trainer import CHECKPOINT_FORMAT, RunConfig, run
from mtdl_fast.engine import MTDLEngine
from mtdl_fast.research.weighting import DynamicWeightAverage, Sum, UncertaintyWeighting

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-6

# A run of a few seconds: 12 steps, affinity on odd steps, checkpoints after steps 4, 8 and 12.
STEPS, CHECKPOINT_EVERY, KILLED_IN_STEP = 12, 4, 7
ARGS = ["--tasks", "identity,rotate,brightness", "--steps", str(STEPS), "--batch-size", "16", "--image-size", "8",
        "--affinity-every", "2", "--checkpoint-every", str(CHECKPOINT_EVERY), "--budget", "2", "--trunk", "mlp"]


def config() -> RunConfig:
    """The RunConfig that ARGS builds."""
    return RunConfig(tasks=["identity", "rotate", "brightness"], steps=STEPS, batch_size=16, image_size=8,
                     affinity_every=2, checkpoint_every=CHECKPOINT_EVERY, budget=2, trunk="mlp")


# `python -m mtdl_fast ...` (runpy, exactly what -m does) with one hook: the step KILLED_IN_STEP
# announces itself in a marker file and then blocks, so the test kills the process at a known
# point (after the checkpoint of step 4, mid-epoch, with steps 5-6 done but not checkpointed)
# instead of racing a fast process. Nothing else in the run is touched.
_HOLD_THEN_RUN = """
import os, runpy, time
import mtdl_fast.engine as engine
hold_at, marker = int(os.environ["MTDL_TEST_HOLD_AT"]), os.environ["MTDL_TEST_MARKER"]
original = engine.MTDLEngine.step
def step(self, x, y):
    if self.step_count + 1 == hold_at:
        open(marker, "w").close()
        time.sleep(600)
    return original(self, x, y)
engine.MTDLEngine.step = step
runpy.run_module("mtdl_fast", run_name="__main__", alter_sys=True)
"""


# ---------------------------------------------------------------------------------------------
# helpers


def assert_same_state(got, want, where="state"):
    """Recursive equality of checkpoint contents: floats within TOL, everything else exact."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.shape == want.shape and got.dtype == want.dtype, where
        if want.is_floating_point():
            torch.testing.assert_close(got, want, rtol=0, atol=TOL, equal_nan=True, msg=where)
        else:
            assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_same_state(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_state(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= TOL, where
    else:
        assert got == want, where


def assert_same_run(got_dir: Path, want_dir: Path):
    """Two run directories hold the same result: results.json, metrics.jsonl, final checkpoint."""
    got = json.loads((got_dir / "results.json").read_text())
    want = json.loads((want_dir / "results.json").read_text())
    np.testing.assert_allclose(np.array(got["affinity"], float), np.array(want["affinity"], float), rtol=0, atol=TOL)
    assert np.isfinite(np.array(got["affinity"], float)).all()
    for key in ("names", "affinity_steps", "skipped_steps", "groups"):
        assert got[key] == want[key], key
    np.testing.assert_allclose(got["accuracy_matrices"][0]["matrix"], want["accuracy_matrices"][0]["matrix"],
                               rtol=0, atol=TOL)
    for rows in (got["metrics"], [json.loads(line) for line in (got_dir / "metrics.jsonl").read_text().splitlines()]):
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        for g, w in zip(rows, want["metrics"]):
            assert g["affinity_step"] == w["affinity_step"] and g["skipped"] == w["skipped"], g["step"]
            np.testing.assert_allclose([g["loss"], *g["losses"]], [w["loss"], *w["losses"]], rtol=0, atol=TOL)
    got_ckpt, want_ckpt = load_checkpoint(got_dir / "checkpoint.pt"), load_checkpoint(want_dir / "checkpoint.pt")
    assert got_ckpt["step"] == want_ckpt["step"] == STEPS
    assert_same_state(got_ckpt["engine"], want_ckpt["engine"], "engine")


# One intra-op thread: these models are tiny, and on a loaded machine OpenMP workers spinning
# against other processes make a 2-thread step 30x slower. The same in every process of a run, so
# in-process and subprocess runs compute bit-identical results.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _python(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **THREADS}, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# module fixtures: one uninterrupted run, one run killed mid-epoch


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted `mtdl-fast run` of ARGS (in process: the same code as python -m mtdl_fast)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", "--out", str(out), *ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A `python -m mtdl_fast run` of ARGS, SIGKILLed during step KILLED_IN_STEP (pristine: copy it)."""
    base = tmp_path_factory.mktemp("killed")
    out, marker = base / "run", base / "holding"
    env = {**os.environ, **THREADS, "MTDL_TEST_HOLD_AT": str(KILLED_IN_STEP), "MTDL_TEST_MARKER": str(marker)}
    with open(base / "stdout", "w") as stdout, open(base / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _HOLD_THEN_RUN, "run", "--out", str(out), *ARGS],
                                cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert proc.poll() is None, f"run exited early ({proc.returncode}): {(base / 'stderr').read_text()}"
                assert time.monotonic() < deadline, "run never reached the step to be killed in"
                time.sleep(0.02)
            # what an operator would poll: a checkpoint exists and the metrics reach it
            state = load_checkpoint(out / "checkpoint.pt")
            assert state["step"] == CHECKPOINT_EVERY
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            assert [r["step"] for r in rows][:CHECKPOINT_EVERY] == list(range(1, CHECKPOINT_EVERY + 1))
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not (out / "results.json").exists(), "the killed run must not have finished"
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# 1. a run killed mid-epoch resumes to the same result


def test_sigkilled_run_resumes_to_the_uninterrupted_result(killed_run, reference_run, tmp_path):
    out = _copy_run(killed_run, tmp_path / "run")
    proc = _python(["-m", "mtdl_fast", "run", "--resume", str(out / "checkpoint.pt"), *ARGS])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_same_run(out, reference_run)


# The SIGINT run holds inside a step, after the augmentation drew its parameters (step_views), until
# the test has sent Ctrl-C; the step then completes and the run must checkpoint it and stop.
_HOLD_IN_STEP = """
import os, runpy, time
import mtdl_fast.engine as engine
hold_at, marker = int(os.environ["MTDL_TEST_HOLD_AT"]), os.environ["MTDL_TEST_MARKER"]
original = engine.MTDLEngine.step_views
def step_views(self, views, y):
    if self.step_count + 1 == hold_at:
        open(marker, "w").close()
        while not os.path.exists(marker + ".sent"):
            time.sleep(0.01)
    return original(self, views, y)
engine.MTDLEngine.step_views = step_views
runpy.run_module("mtdl_fast", run_name="__main__", alter_sys=True)
"""


def test_sigint_mid_step_then_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    step = random.Random().randrange(2, STEPS)  # any step but the last; printed on failure
    out, marker = tmp_path / "run", tmp_path / "holding"
    env = {**os.environ, **THREADS, "MTDL_TEST_HOLD_AT": str(step), "MTDL_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_IN_STEP, "run", "--out", str(out), *ARGS], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"step {step}: {proc.stderr.read()}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGINT)
        Path(str(marker) + ".sent").touch()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, f"step {step}: {stderr}"
    assert "interrupted; continue with --resume" in stderr and "Traceback" not in stderr, stderr
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step
    resumed = _python(["-m", "mtdl_fast", "run", "--resume", str(out / "checkpoint.pt")])
    assert resumed.returncode == 0, f"step {step}: {resumed.stderr}"
    assert_same_run(out, reference_run)


def test_in_process_crash_resumes_from_the_periodic_checkpoint(reference_run, tmp_path, monkeypatch):
    """A crash that is not Ctrl-C (no checkpoint on the way out): the metrics file then holds rows
    past the last checkpoint (5, 6), which the resumed run must drop and recompute."""
    original = MTDLEngine.step

    def crashing(self, x, y):
        if self.step_count + 1 == KILLED_IN_STEP:
            raise RuntimeError("simulated crash")
        return original(self, x, y)

    monkeypatch.setattr(engine_module.MTDLEngine, "step", crashing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(config(), out)
    monkeypatch.setattr(engine_module.MTDLEngine, "step", original)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == CHECKPOINT_EVERY
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, KILLED_IN_STEP))
    run(config(), out, resume=out / "checkpoint.pt")
    assert_same_run(out, reference_run)


def test_resume_survives_a_metrics_row_torn_by_the_crash(killed_run, reference_run, tmp_path, capsys):
    """A crash during a write of metrics.jsonl (disk full, power loss) leaves a partial last row
    after the checkpoint's rows. Rows past the checkpoint are discarded on resume anyway, so the
    torn one must not make the run impossible to resume."""
    out = _copy_run(killed_run, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 6.87, "losses": [2.29, 2.3')
    code = main(["run", "--resume", str(out / "checkpoint.pt"), *ARGS])
    assert code == 0, capsys.readouterr().err
    assert_same_run(out, reference_run)


def test_nan_steps_in_a_run_are_recorded_and_the_run_finishes(tmp_path, monkeypatch):
    """Loss NaN on step 3 (an affinity step) and step 4 (a plain step) of a 6-step run."""
    poisoned_steps = {3, 4}

    class PoisonedEngine(MTDLEngine):  # what the trainer builds, with a loss that fails on those steps
        def __init__(self, *args, **kwargs):
            def loss_fn(output, target):
                loss = F.cross_entropy(output, target)
                return loss + float("nan") if self.step_count in poisoned_steps else loss

            super().__init__(*args, loss_fn=loss_fn, **kwargs)

    monkeypatch.setattr(trainer_module, "MTDLEngine", PoisonedEngine)
    cfg = config()
    cfg.steps = 6
    results = run(cfg, tmp_path / "run")
    assert results["skipped_steps"] == 2
    assert [r["skipped"] for r in results["metrics"]] == [s in poisoned_steps for s in range(1, 7)]
    assert all(math.isfinite(r["loss"]) for r in results["metrics"] if not r["skipped"])
    assert results["affinity_steps"] == 2  # steps 1 and 5; step 3 was skipped
    assert np.isfinite(results["affinity"]).all()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert np.isfinite(np.array(saved["affinity"], float)).all()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["engine"]
    assert state["skipped_steps"] == 2 and int(state["tracker"]["skipped"]) == 1
    for name, tensor in {**state["trunk"], **state["heads"]}.items():
        assert torch.isfinite(tensor.float()).all(), name


# ---------------------------------------------------------------------------------------------
# 2. damaged checkpoints are refused; interrupted saves leave the old one intact


def _corruptions(data: bytes) -> dict[str, bytes]:
    header = len(MAGIC) + 65
    mid = header + (len(data) - header) // 2
    flipped = bytearray(data)
    for i in range(mid, mid + 8):
        flipped[i] ^= 0xFF
    one_bit = bytearray(data)
    one_bit[-1] ^= 0x01
    digest = bytearray(data)
    digest[len(MAGIC)] = ord("0") if digest[len(MAGIC)] != ord("0") else ord("1")
    return {
        "bytes_flipped_in_the_middle": bytes(flipped),
        "one_bit_flipped_at_the_end": bytes(one_bit),
        "truncated_to_half": data[: len(data) // 2],
        "last_byte_missing": data[:-1],
        "header_only": data[:header],
        "magic_only": MAGIC,
        "empty": b"",
        "digest_altered": bytes(digest),
        "random_bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "payload_without_header": data[header:],  # a plain torch.save file of the same state
    }


@pytest.fixture(scope="module")
def checkpoint_bytes(reference_run) -> bytes:
    return (reference_run / "checkpoint.pt").read_bytes()


@pytest.fixture
def no_unpickling(monkeypatch):
    """Records every torch.load call: a damaged file must be refused before anything is unpickled."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_damaged_checkpoints_are_refused_before_unpickling(checkpoint_bytes, tmp_path, no_unpickling):
    intact = tmp_path / "intact.pt"
    intact.write_bytes(checkpoint_bytes)
    assert load_checkpoint(intact)["format"] == CHECKPOINT_FORMAT
    no_unpickling.clear()
    for name, data in _corruptions(checkpoint_bytes).items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, name
        assert ("checksum" in message or "not an mtdl-fast checkpoint" in message), (name, message)
    assert no_unpickling == [], "a damaged checkpoint reached torch.load"


def _run_checkpoint_state(checkpoint_bytes: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "good.pt"
    path.write_bytes(checkpoint_bytes)
    return load_checkpoint(path)


def _wrong_payloads(state: dict) -> dict[str, object]:
    """Checkpoints that pass the checksum (written by save_checkpoint) but are not a run's."""
    payloads = {
        "not_a_dict": [1, 2, 3],
        "foreign_format": {**state, "format": "someone-else/v3"},
        "no_format": {k: v for k, v in state.items() if k != "format"},
        "engine_malformed": {**state, "engine": {"weights": torch.zeros(3)}},
    }
    for key in ("config", "step", "engine"):
        payloads[f"no_{key}"] = {k: v for k, v in state.items() if k != key}
    return payloads


WRONG_PAYLOADS = ["not_a_dict", "foreign_format", "no_format", "no_config", "no_step", "no_engine",
                  "engine_malformed"]


@pytest.mark.parametrize("name", WRONG_PAYLOADS)
def test_resume_refuses_a_checkpoint_of_the_wrong_format(name, checkpoint_bytes, tmp_path):
    payload = _wrong_payloads(_run_checkpoint_state(checkpoint_bytes, tmp_path))[name]
    path = save_checkpoint(tmp_path / "run" / "checkpoint.pt", payload)
    with pytest.raises(CheckpointError) as info:
        run(config(), tmp_path / "run", resume=path)
    assert str(path) in str(info.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt"], "nothing written"


def _damaged_files(checkpoint_bytes: bytes, tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, data in _corruptions(checkpoint_bytes).items():
        files[name] = tmp_path / name / "checkpoint.pt"
        files[name].parent.mkdir()
        files[name].write_bytes(data)
    state = _run_checkpoint_state(checkpoint_bytes, tmp_path)
    for name, payload in _wrong_payloads(state).items():
        files[name] = save_checkpoint(tmp_path / name / "checkpoint.pt", payload)
    return files


@pytest.mark.parametrize("command", ["run --resume", "eval"])
def test_cli_refuses_damaged_checkpoints_in_one_line(command, checkpoint_bytes, tmp_path, capsys):
    failures = []
    for name, path in _damaged_files(checkpoint_bytes, tmp_path).items():
        if command == "eval" and name == "no_step":
            continue  # eval does not read the step
        before = path.read_bytes()
        argv = ["run", "--resume", str(path), *ARGS] if command == "run --resume" else ["eval", str(path)]
        try:
            code = main(argv)
        except BaseException as err:  # noqa: BLE001 - an escaping exception is a traceback
            failures.append(f"{name}: {type(err).__name__}: {err}")
            continue
        err = capsys.readouterr().err.strip()
        if code != 2 or len(err.splitlines()) != 1 or str(path) not in err or "Traceback" in err:
            failures.append(f"{name}: exit {code}, stderr {err!r}")
        if path.read_bytes() != before or sorted(p.name for p in path.parent.iterdir()) != ["checkpoint.pt"]:
            failures.append(f"{name}: the run directory was changed")
    assert not failures, "\n".join(failures)


class _DiskFull(OSError):
    def __init__(self):
        super().__init__(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["serialise", "write", "fsync", "replace", "ctrl_c_in_replace"])
def test_interrupted_save_keeps_the_previous_checkpoint(failure, tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"step": 4, "value": torch.arange(1000)})
    before = path.read_bytes()
    temps = []
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen

    def recording_mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        temps.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    expected = KeyboardInterrupt if failure == "ctrl_c_in_replace" else OSError
    if failure == "serialise":

        def partial_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 partial archive")
            raise _DiskFull()

        monkeypatch.setattr(torch, "save", partial_save)
    elif failure == "write":
        class HalfWritten:
            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.handle.close()
                return False

            def write(self, data):
                self.handle.write(data[: len(data) // 2])
                self.handle.flush()
                assert temps and temps[-1].stat().st_size > 0  # a partial temp file really exists
                raise _DiskFull()

            def __getattr__(self, name):
                return getattr(self.handle, name)

        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: HalfWritten(real_fdopen(fd, *a, **k)))
    elif failure == "fsync":
        def failing_fsync(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "fsync", failing_fsync)
    else:
        def failing_replace(src, dst):
            assert Path(src).stat().st_size > len(before)  # the complete new file, not yet in place
            raise KeyboardInterrupt if failure == "ctrl_c_in_replace" else PermissionError(errno.EACCES, "denied")

        monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(expected):
        save_checkpoint(path, {"step": 8, "value": torch.arange(2000)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"], "a temporary file was left behind"
    assert all(not t.exists() for t in temps)


# ---------------------------------------------------------------------------------------------
# 3. NaN in a batch or a loss: skipped, counted, nothing poisoned, training goes on

K, B = 3, 8


def make_engine(affinity_every=None, mode="exact", weighting="sum", loss_fn=F.cross_entropy) -> MTDLEngine:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten()).double()
    heads = nn.ModuleList(nn.Linear(16, 5) for _ in range(K)).double()
    weighting = {"sum": Sum, "dwa": DynamicWeightAverage, "uncertainty": UncertaintyWeighting}[weighting](K)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters(), *weighting.parameters()],
                                lr=0.05, momentum=0.9)
    tasks = mf.DistributionTasks(["identity", "rotate", "brightness"], seed=0, backend="torch",
                                 out_dtype=torch.float64)
    return MTDLEngine(tasks, trunk, heads, optimizer, weighting=weighting, loss_fn=loss_fn,
                      affinity_every=affinity_every, affinity_mode=mode)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, 9, 9, generator=g, dtype=torch.float64), torch.randint(0, 5, (B,), generator=g)


def training_state(engine: MTDLEngine) -> dict:
    """Everything a skipped step must leave alone except BatchNorm running statistics (own test)."""
    tracker = engine.tracker
    return copy.deepcopy({
        "parameters": {n: p for n, p in [*engine.trunk.named_parameters(), *engine.heads.named_parameters()]},
        "optimizer": engine.optimizer.state_dict()["state"],
        "weighting": engine.weighting.state_dict(),
        "tracker": None if tracker is None else {"count": tracker._count, "moments": tracker._moments},
    })


def assert_unchanged(after, before, where="state"):
    if isinstance(before, torch.Tensor):
        assert torch.equal(after, before), where
    elif isinstance(before, dict):
        assert set(after) == set(before), where
        for key in before:
            assert_unchanged(after[key], before[key], f"{where}[{key!r}]")
    else:
        assert after == before, where


def _poisoned_step(engine, fault, poison, seed=3):
    x, y = batch(seed)
    if fault == "pixel":
        x[0, 0, 4, 4] = float("nan")
        return engine.step(x, y)
    poison["on"] = True
    try:
        return engine.step(x, y)
    finally:
        poison["on"] = False


def _poisonable_loss():
    poison = {"on": False}

    def loss_fn(output, target):
        loss = F.cross_entropy(output, target)
        return loss + float("nan") if poison["on"] else loss

    return poison, loss_fn


PATHS = {"plain": (None, "exact"), "tracked_exact": (1, "exact"), "tracked_first_order": (1, "first_order")}


@pytest.mark.parametrize("weighting", ["sum", "dwa", "uncertainty"])
@pytest.mark.parametrize("fault", ["pixel", "loss"])
@pytest.mark.parametrize("path", list(PATHS))
def test_nan_step_is_skipped_counted_and_training_continues(path, fault, weighting):
    every, mode = PATHS[path]
    poison, loss_fn = _poisonable_loss()
    engine = make_engine(every, mode, weighting, loss_fn)
    for seed in range(3):  # momentum buffers, DWA history (2 periods: weights active), affinity
        loss, info = engine.step(*batch(seed))
        assert info["skipped"] is False and torch.isfinite(loss)
    before = training_state(engine)
    affinity_before = None if engine.tracker is None else engine.tracker.affinity.clone()

    loss, info = _poisoned_step(engine, fault, poison)
    assert info["skipped"] is True and not torch.isfinite(loss)
    assert engine.skipped_steps == 1
    assert_unchanged(training_state(engine), before)
    if engine.tracker is not None:
        assert engine.tracker.skipped_steps == 1 and engine.tracker.steps == 3
        assert info["affinity"] is not None  # the tracker ran on this step and threw it away
        assert torch.equal(engine.tracker.affinity, affinity_before)
        assert torch.isfinite(engine.tracker.affinity).all()
    assert torch.isfinite(engine.weighting.weights(torch.ones(K, dtype=torch.float64))).all()

    for seed in range(4, 7):
        loss, info = engine.step(*batch(seed))
        assert info["skipped"] is False and torch.isfinite(loss)
        assert torch.isfinite(info["losses"]).all() and torch.isfinite(info["weights"]).all()
    assert engine.skipped_steps == 1
    after = training_state(engine)
    for name, p in after["parameters"].items():
        assert torch.isfinite(p).all(), name
        assert not torch.equal(p, before["parameters"][name]), f"{name} did not train after the NaN step"
    for slot in after["optimizer"].values():
        assert all(torch.isfinite(t).all() for t in slot.values() if isinstance(t, torch.Tensor))
    for name, t in after["weighting"].items():
        assert torch.isfinite(t.double()).all(), name
    if weighting == "dwa":
        assert int(after["weighting"]["periods_done"]) == int(before["weighting"]["periods_done"]) + 3
    if weighting == "uncertainty":
        assert not torch.equal(after["weighting"]["log_vars"], before["weighting"]["log_vars"])
    if engine.tracker is not None:
        assert engine.tracker.steps == 6 and engine.tracker.skipped_steps == 1
        assert torch.isfinite(engine.tracker.affinity).all()
        assert not torch.equal(engine.tracker.affinity, affinity_before)


@pytest.mark.parametrize("fault", ["pixel", "loss"])
@pytest.mark.parametrize("path, weighting", [("plain", "sum"), ("tracked_exact", "sum"),
                                             ("tracked_first_order", "sum"), ("tracked_exact", "uncertainty")])
def test_skipped_step_leaves_batchnorm_running_statistics_alone(path, weighting, fault):
    """A skipped step must not move the model's buffers: a NaN batch would otherwise write NaN into
    BatchNorm's running mean/var for good (training still looks fine, since train mode uses batch
    statistics, but every eval-mode prediction is NaN from then on)."""
    every, mode = PATHS[path]
    poison, loss_fn = _poisonable_loss()
    engine = make_engine(every, mode, weighting, loss_fn)
    for seed in range(2):
        engine.step(*batch(seed))
    buffers = lambda: {n: b.clone() for n, b in [*engine.trunk.named_buffers(), *engine.heads.named_buffers()]}  # noqa: E731
    before = buffers()
    loss, info = _poisoned_step(engine, fault, poison)
    assert info["skipped"] is True
    assert_unchanged(buffers(), before, "buffers")
    for seed in range(4, 6):
        engine.step(*batch(seed))
    for name, b in buffers().items():
        assert torch.isfinite(b.double()).all(), name
    engine.trunk.eval(), engine.heads.eval()
    with torch.no_grad():
        x, _ = batch(9)
        outputs = torch.stack([head(engine.trunk(x)) for head in engine.heads])
    assert torch.isfinite(outputs).all(), "eval-mode predictions after the skipped step"
