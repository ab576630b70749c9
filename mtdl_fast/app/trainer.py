"""The main job: train on distribution tasks, track affinity, pick groups, evaluate everything.

`run(config)` writes a run directory (config.json, metrics.jsonl, affinity.npy/.csv, groups.json,
results.json, report.md, PNG plots, checkpoint.pt) and returns the results. Batches are drawn
deterministically from (seed, step), and the engine's state holds every RNG, so a run resumed from
a checkpoint reaches the same final metrics and affinity as an uninterrupted one.

Launched by torchrun, every rank runs this same code on its slice of each global batch
(`batch_size` is the global batch, split evenly over the ranks): DistributedDataParallel averages
the gradients, affinity statistics are the global batch's on every rank, rank 0 selects the
groups and broadcasts them, and only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mtdl_fast import distributed as dist_utils
from mtdl_fast.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from mtdl_fast.engine import MTDLEngine
from mtdl_fast.tasks import DEFAULT_TASKS, DistributionTasks

CHECKPOINT_FORMAT = "mtdl-fast/run"


@dataclass
class RunConfig:
    """Everything a run depends on (saved as config.json; a resumed run must match it)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 16
    steps: int | None = 200
    epochs: float | None = None
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    model: str = "hard"
    trunk: str = "resnet"
    width: int = 8
    align_steps: int | None = None
    soft_lambda: float = 1.0
    amp: str | None = None
    weighting: str = "sum"
    strategy: str = "joint"
    affinity_every: int | None = 10
    affinity_mode: str = "exact"
    affinity_baseline: str = "shared_step"
    budget: int = 3
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 100
    protocol: str = "default"
    eval_size: int = 512
    threads: int = 1
    seeds: int = 3

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks must name at least one distribution")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps and epochs")
        for name in ("batch_size", "budget", "checkpoint_every", "image_size", "eval_size", "threads", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.affinity_every is not None and self.affinity_every < 1:
            raise ValueError(f"affinity_every must be >= 1 or None (no affinity), got {self.affinity_every}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.affinity_baseline not in ("tag", "shared_step"):
            raise ValueError(f"affinity_baseline must be 'tag' or 'shared_step', got {self.affinity_baseline!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if self.align_steps is not None and self.align_steps < 0:
            raise ValueError(f"align_steps must be >= 0, got {self.align_steps}")
        if not (math.isfinite(self.soft_lambda) and self.soft_lambda >= 0):
            raise ValueError(f"soft_lambda must be a finite number >= 0, got {self.soft_lambda}")
        if self.model not in ("hard", "onehot", "gating", "film", "moe", "aligned", "soft"):
            raise ValueError(f"model must be hard, onehot, gating, film, moe, aligned or soft, got {self.model!r}")
        if self.strategy not in ("joint", "stgu"):
            raise ValueError(f"strategy must be 'joint' or 'stgu', got {self.strategy!r}")
        if self.protocol not in ("default", "paper"):
            raise ValueError(f"protocol must be 'default' or 'paper', got {self.protocol!r}")


@dataclass
class Dataset:
    """uint8 images (N, C, H, W) and int64 labels, split into train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def load_dataset(config: RunConfig) -> Dataset:
    """The configured dataset: digits (embedded), cifar10, npz (x, y arrays) or an image folder."""
    from mtdl_fast.app import data

    name = config.dataset
    if name == "digits":
        x, y = data.load_digits(size=config.image_size)
    elif name == "cifar10":
        if config.data_dir is None:
            raise ValueError("--dataset cifar10 needs --data-dir")
        x_tr, y_tr = data.load_cifar10(config.data_dir, train=True)
        x_te, y_te = data.load_cifar10(config.data_dir, train=False)
        return Dataset(x_tr, y_tr, x_te, y_te, 10)
    elif name == "npz":
        x, y = _load_npz(config.data_dir)
    elif name == "folder":
        x, y = _load_folder(config.data_dir, config.image_size)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose digits, cifar10, npz or folder")
    _check_labels(y, config.data_dir or name)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))
    cut = int(0.8 * x.shape[0])
    if cut < 1 or cut == x.shape[0]:
        raise ValueError(f"{config.data_dir or name} holds {x.shape[0]} images: too few for an 80/20 train/test split")
    train, test = perm[:cut], perm[cut:]
    return Dataset(x[train], y[train], x[test], y[test], int(y.max()) + 1)


def _check_labels(y: torch.Tensor, source: str) -> None:
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{source}: labels must be >= 0, found {int(y.min())}")
    if torch.unique(y).numel() < 2:
        raise ValueError(f"{source}: a classification run needs at least 2 classes, found {torch.unique(y).tolist()}")


def _load_npz(path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    if path is None or not Path(path).is_file():
        raise ValueError(f"--dataset npz needs --data-dir naming an .npz file, got {path!r}")
    try:
        arrays = np.load(path, allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        if "x" not in arrays or "y" not in arrays:
            raise ValueError("it must hold arrays 'x' (N, C, H, W) uint8 and 'y' (N,) integer labels")
        x_np, y_np = arrays["x"], arrays["y"]
    except (OSError, ValueError, EOFError) as err:
        # numpy's own message for a text or garbage file suggests allow_pickle=True: never do that
        # with an untrusted file, and it would not help here.
        detail = str(err) if "allow_pickle" not in str(err) else "not an .npz archive"
        raise ValueError(f"{path} is not a readable .npz of x and y: {detail}") from None
    x = torch.from_numpy(np.ascontiguousarray(x_np))
    if x.ndim != 4 or x.dtype != torch.uint8 or x.shape[1] not in (1, 3):
        raise ValueError(f"{path}: x must be uint8 (N, C, H, W) with C in {{1, 3}}, got {x.dtype} {tuple(x.shape)}")
    if y_np.ndim != 1 or not np.issubdtype(y_np.dtype, np.integer):
        raise ValueError(f"{path}: y must be (N,) integer labels, got {y_np.dtype} {tuple(y_np.shape)}")
    if y_np.shape[0] != x.shape[0]:
        raise ValueError(f"{path}: x has {x.shape[0]} images but y has {y_np.shape[0]} labels")
    return x, torch.from_numpy(y_np.astype(np.int64))


def _load_folder(path: str | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import UnidentifiedImageError
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    if path is None or not Path(path).is_dir():
        raise ValueError(f"--dataset folder needs --data-dir naming a folder of class subfolders, got {path!r}")
    try:  # torchvision's loader converts every image to RGB
        folder = ImageFolder(path, transform=v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True)]))
    except FileNotFoundError as err:  # no class folder, or a class folder without images
        raise ValueError(f"{path}: {err}") from None
    images, labels = [], []
    for i, (file, _) in enumerate(folder.samples):
        try:
            image, label = folder[i]
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{file} is not a readable image ({type(err).__name__})") from None
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch of `step`: epoch-wise permutations seeded by (seed, epoch), so any step's
    batch is known without loader state (exact resume)."""
    per_epoch = max(1, num_items // batch_size)
    epoch, index = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[index * batch_size : (index + 1) * batch_size]


@dataclass
class Run:
    """An engine and what its training loop must call before each step (the alignment schedule)."""

    engine: MTDLEngine
    before_step: Callable[[int], object] | None = None


# The per-task alignment matrices learn at this fraction of the learning rate: at the full rate
# they move the embedding faster than the trunk can follow (measured on the digits, 10 tasks,
# 3 seeds: 0.877 accuracy at lr, 0.939 at lr / 10, hard sharing 0.955).
ALIGNMENT_LR_SCALE = 0.1


def build_run(config: RunConfig, task_names: Sequence[str], data: Dataset, device: torch.device) -> Run:
    """Model, optimizer, weighting, engine (and alignment schedule) for one training run."""
    from mtdl_fast.research.conditioning import build_model
    from mtdl_fast.research.stgu import SelectiveGroupUpdates
    from mtdl_fast.research.weighting import make_weighting

    torch.manual_seed(config.seed)
    k = len(task_names)
    channels = data.x_train.shape[1]
    kind = "hard" if config.model in ("aligned", "soft") else config.model
    model = build_model(kind, k, data.num_classes, channels, config.image_size, trunk=config.trunk,
                        width=config.width)
    trunk, affinity_every = model.trunk, config.affinity_every if k > 1 else None
    if config.model == "aligned":
        from mtdl_fast.research.alignment import CovarianceAlignedTrunk

        # the ResNet's stem embedding, or the MLP's input channels (it has no stem)
        trunk = (CovarianceAlignedTrunk(trunk, k, layer="stem") if config.trunk == "resnet"
                 else CovarianceAlignedTrunk(trunk, k, layer=None, channels=channels))
    elif config.model == "soft":
        from mtdl_fast.research.soft_sharing import SoftSharedTrunk

        trunk = SoftSharedTrunk(trunk, k, config.soft_lambda)
        affinity_every = None  # every trunk parameter is per task: no shared update to measure
    trunk, heads = trunk.to(device), model.heads.to(device)
    weighting = make_weighting(config.weighting, k).to(device)
    groups = [{"params": [*heads.parameters(), *weighting.parameters()]}]
    if config.model == "aligned":
        groups += [{"params": [trunk.alignment], "lr": config.lr * ALIGNMENT_LR_SCALE},
                   {"params": [p for n, p in trunk.named_parameters() if n != "alignment"]}]
    else:
        groups.append({"params": list(trunk.parameters())})
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    tasks = DistributionTasks(list(task_names), seed=dist_utils.rank_seed(config.seed))
    strategy: str | SelectiveGroupUpdates = config.strategy
    if config.strategy == "stgu":  # warm-up: a quarter of the run
        warmup = max(1, total_steps(config, data) // 4)
        strategy = SelectiveGroupUpdates(trunk, heads, optimizer, warmup=warmup,
                                         generator=torch.Generator().manual_seed(0))
    engine = MTDLEngine(tasks, trunk, heads, optimizer, weighting=weighting, affinity_every=affinity_every,
                        affinity_mode=config.affinity_mode, strategy=strategy, amp=config.amp,
                        affinity_baseline=config.affinity_baseline if config.affinity_mode == "exact" else "tag",
                        affinity_seed=config.seed)
    if config.model != "aligned":
        return Run(engine)
    from mtdl_fast.research.alignment import AlignmentSchedule

    align = config.align_steps if config.align_steps is not None else total_steps(config, data) // 4
    return Run(engine, AlignmentSchedule(trunk, optimizer, align).update)


def build_engine(config: RunConfig, task_names: Sequence[str], data: Dataset, device: torch.device) -> MTDLEngine:
    """The engine of `build_run` (for evaluating a checkpoint: no training loop, no schedule)."""
    return build_run(config, task_names, data, device).engine


def total_steps(config: RunConfig, data: Dataset) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * data.x_train.shape[0] / config.batch_size))


def train(
    config: RunConfig,
    engine: MTDLEngine,
    data: Dataset,
    device: torch.device,
    *,
    out_dir: Path | None = None,
    start_step: int = 0,
    label: str = "train",
    before_step: Callable[[int], object] | None = None,
    after_step: Callable[[MTDLEngine, dict], object] | None = None,
    extra_state: Callable[[], dict] | None = None,
) -> list[dict]:
    """Run the engine from `start_step` to the configured number of steps.

    Writes metrics rows (and checkpoints every `checkpoint_every` steps and on Ctrl-C) into
    out_dir when given (rank 0 only; checkpoints hold every rank's augmentation stream). Each
    rank steps on its slice of the global batch. `before_step(step)` runs before each step (e.g. an
    alignment schedule), `after_step(engine, info)` after it; `extra_state()` is saved with each
    checkpoint (what after_step accumulates). Returns the metrics rows of this call.
    """
    steps = total_steps(config, data)
    shard = dist_utils.check_divisible(config.batch_size)
    first = dist_utils.rank() * shard
    main = dist_utils.is_main()
    rows: list[dict] = []
    metrics_file = (out_dir / "metrics.jsonl").open("a") if out_dir is not None and main else None
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=label, unit="step",
               disable=None if main else True, leave=False)
    # Ctrl-C finishes the step in flight, then checkpoints: a checkpoint written mid-step would hold
    # augmentation streams and optimizer state that have moved past its step count.
    with _StopAtStepBoundary(enabled=out_dir is not None and not dist_utils.is_distributed()) as stop:
        try:
            for step in bar:
                idx = batch_indices(data.x_train.shape[0], config.batch_size, step, config.seed)[first : first + shard]
                x, y = data.x_train[idx].to(device), data.y_train[idx].to(device)
                t0 = time.perf_counter()
                if before_step is not None:
                    before_step(step)
                loss, info = engine.step(x, y)
                if after_step is not None:
                    after_step(engine, info)
                loss_value = float(loss)
                rate = x.shape[0] * dist_utils.world_size() / max(time.perf_counter() - t0, 1e-9)
                row = {"step": step + 1, "loss": loss_value, "losses": [float(v) for v in info["losses"]],
                       "images_per_s": rate, "affinity_step": info["affinity"] is not None,
                       "skipped": bool(info["skipped"])}
                rows.append(row)
                bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{rate:,.0f}")
                if metrics_file is not None:
                    metrics_file.write(json.dumps(_jsonable(row), allow_nan=False) + "\n")
                done = step + 1 == steps or stop.requested
                if out_dir is not None and ((step + 1) % config.checkpoint_every == 0 or done):
                    if metrics_file is not None:
                        metrics_file.flush()
                    save_run_checkpoint(out_dir / "checkpoint.pt", config, engine, step + 1,
                                        extra=None if extra_state is None else extra_state())
                if stop.requested:
                    raise KeyboardInterrupt
        finally:
            if metrics_file is not None:
                metrics_file.close()
            bar.close()
    return rows


class _StopAtStepBoundary:
    """While active (main thread only), the first SIGINT only sets `requested`; the training loop
    stops after the step in flight. A second SIGINT interrupts at once (the last checkpoint stands)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> _StopAtStepBoundary:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and not self.requested:
            signal.signal(signal.SIGINT, self._previous)


def save_run_checkpoint(path: Path, config: RunConfig, engine: MTDLEngine, step: int,
                        extra: dict | None = None) -> None:
    """Rank 0 writes the engine's state, every rank's augmentation stream and `extra` (the run's
    own accumulators) (a collective: every rank calls it)."""
    streams = dist_utils.gather_objects(engine.tasks.state_dict())
    if dist_utils.is_main():
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(config), "step": step,
                               "engine": engine.state_dict(), "world_size": len(streams), "tasks_by_rank": streams,
                               "extra": extra})


def load_run_checkpoint(path: str | Path, config: RunConfig, engine: MTDLEngine,
                        load_extra: Callable[[dict], object] | None = None) -> int:
    """Load a `mtdl-fast run` checkpoint into `engine` (this rank's augmentation stream
    included) and its `extra` into `load_extra`; returns the step it was written at.
    CheckpointError when it does not fit."""
    state = load_checkpoint(path)
    _check_resume(state, config, Path(path))
    world = int(state.get("world_size", 1))
    if world != dist_utils.world_size():
        raise CheckpointError(f"{path} was written by {world} process(es); resume it with {world}, "
                              f"not {dist_utils.world_size()}, to continue the same augmentation streams")
    load_engine_state(engine, state, path)
    if "tasks_by_rank" in state:
        engine.tasks.load_state_dict(state["tasks_by_rank"][dist_utils.rank()])
    if load_extra is not None and state.get("extra") is not None:
        load_extra(state["extra"])
    return int(state["step"])


@torch.no_grad()
def evaluate(
    engine: MTDLEngine, trained: Sequence[str], eval_names: Sequence[str], x: torch.Tensor, y: torch.Tensor,
    seed: int, batch_size: int = 256,
) -> np.ndarray:
    """Accuracy (len(trained) + 1, E): row k = head of trained distribution k, last row = the model's
    prediction for each eval distribution (its own head where it trained on it, else the mean of
    its heads' softmax). Eval views use fixed parameters drawn from `seed`."""
    from mtdl_fast.lookahead import is_task_aware

    trunk, heads = engine.trunk, engine.heads
    modes = [m.training for m in (trunk, *heads)]
    trunk.eval(), heads.eval()
    eval_tasks = DistributionTasks(list(eval_names), seed=seed + 1, backend="auto")
    correct = np.zeros((len(trained) + 1, len(eval_names)))
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        views = eval_tasks(xb)
        for e, name in enumerate(eval_names):
            with engine.autocast():  # evaluate in the precision the model trained in
                shared = None if is_task_aware(trunk) else trunk(views[e])
                logits = [head(trunk(views[e], k) if shared is None else shared) for k, head in enumerate(heads)]
            probs = torch.stack([F.softmax(z.float(), -1) for z in logits])
            correct[:-1, e] += (probs.argmax(-1) == yb).sum(-1).cpu().numpy()
            own = list(trained).index(name) if name in trained else None
            pred = probs[own] if own is not None else probs.mean(0)
            correct[-1, e] += (pred.argmax(-1) == yb).sum().item()
    for module, mode in zip((trunk, *heads), modes):
        module.train(mode)
    return correct / x.shape[0]


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' -> torch.device; ValueError when unknown or absent."""
    text = str(name).strip().lower()
    if not (text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())):
        raise ValueError(f"unknown device {name!r} (choose cpu or cuda)")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    device = torch.device(text)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) present")
    return device


def check_run_checkpoint(state: dict, path: str | Path) -> None:
    """CheckpointError unless `state` (a loaded checkpoint) is a complete `mtdl-fast run` checkpoint."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of `mtdl-fast run` (format {state.get('format')!r})")
    missing = [key for key in ("config", "step", "engine") if key not in state]
    if missing:
        raise CheckpointError(f"{path} is an incomplete `mtdl-fast run` checkpoint (no {', '.join(missing)})")


def load_engine_state(engine: MTDLEngine, state: dict, path: str | Path) -> None:
    """engine.load_state_dict(state["engine"]); CheckpointError (one line) when it does not fit."""
    try:
        engine.load_state_dict(state["engine"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        raise CheckpointError(f"{path} does not fit this run's model ({detail})") from err


def _check_resume(state: dict, config: RunConfig, path: Path) -> None:
    check_run_checkpoint(state, path)
    saved = state["config"]
    different = {k: (saved.get(k), v) for k, v in dataclasses.asdict(config).items()
                 if k not in ("steps", "epochs", "checkpoint_every") and saved.get(k) != v}
    if different:
        raise CheckpointError(f"{path} was written by a run with other options: {different}")


def _read_metrics(path: Path, upto: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a row torn by a crash mid-write (rows are written whole, newline included)
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def run(config: RunConfig, out_dir: str | Path, resume: str | Path | None = None) -> dict:
    """The main job (see module docstring). Returns the results written to results.json."""
    config.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _run(config, Path(out_dir), resume)
    finally:
        torch.set_num_threads(threads)


def _run(config: RunConfig, out: Path, resume: str | Path | None) -> dict:
    from mtdl_fast.app.reports import write_report

    device = dist_utils.init_from_env(resolve_device(config.device))
    main = dist_utils.is_main()
    data = load_dataset(config)
    if dist_utils.is_distributed() and data.x_train.shape[0] < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {data.x_train.shape[0]} training images")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    names = list(config.tasks)
    run_parts = build_run(config, names, data, device)
    engine = run_parts.engine
    from mtdl_fast.app.signals import RelatednessSignals

    signals = RelatednessSignals(config.lr)
    start = 0
    if resume is not None:
        start = load_run_checkpoint(resume, config, engine, load_extra=signals.load_state_dict)
        if main:
            kept = _read_metrics(out / "metrics.jsonl", upto=start)
            (out / "metrics.jsonl").write_text("".join(json.dumps(_jsonable(r), allow_nan=False) + "\n" for r in kept))
    if main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, allow_nan=False) + "\n")
    began = time.perf_counter()
    trained = train(config, engine, data, device, out_dir=out, start_step=start, label="all tasks",
                    before_step=run_parts.before_step, after_step=signals.after_step, extra_state=signals.state_dict)
    train_seconds = time.perf_counter() - began
    x_eval, y_eval = data.x_test[: config.eval_size].to(device), data.y_test[: config.eval_size].to(device)
    acc = evaluate(engine, names, names, x_eval, y_eval, config.seed)
    affinity = _affinity_record(config, engine, names) if engine.tracker is not None else None
    if affinity is not None:
        affinity["signals"] = signals.matrices(engine, names, x_eval, config.seed)
    paper = None
    if config.protocol == "paper" and affinity is not None:
        from mtdl_fast.app.protocol import paper_protocol

        paper = paper_protocol(config, names, data, device, (engine, acc[-1], affinity["signals"]), x_eval, y_eval)
    if not main:
        return dist_utils.broadcast_object(None)
    metrics = _read_metrics(out / "metrics.jsonl")
    if affinity is not None:
        _write_affinity_files(out, names, affinity)
    if engine.group_updates is not None:
        groups = engine.group_updates.groups
        (out / "stgu.json").write_text(json.dumps({"groups": groups, "names": names}, indent=2) + "\n")
    results = {
        "names": names,
        "config": dataclasses.asdict(config),
        "data": _describe_data(config, data, x_eval.shape[0]),
        "affinity": None if affinity is None else affinity["mean"],
        "affinity_steps": engine.tracker.steps if engine.tracker is not None else 0,
        "groups": None if affinity is None else affinity["groups"],
        "accuracy_matrices": [{"rows": [f"head {n}" for n in names] + ["model"], "cols": names, "matrix": acc,
                               "title": "All tasks together: accuracy of each head on each distribution"}],
        "metrics": metrics,
        "skipped_steps": engine.skipped_steps,
    }
    if affinity is not None:
        results.update({key: affinity[key] for key in ("definition", "stderr", "bootstrap", "signals")})
    if paper is not None:
        results["accuracy_matrices"].append(paper.pop("shift"))
        results.update(paper)
    # Wall clock over the whole training loop (data, augmentation, affinity, checkpoints): what a
    # user waits for, not the median of the fastest steps.
    images = len(trained) * config.batch_size
    results["throughput"] = {"images_per_s": images / max(train_seconds, 1e-9), "images": images,
                             "seconds": train_seconds, "device": str(device)}
    results["timing"] = {"seconds": time.perf_counter() - began}
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")
    write_report(out, results)
    return dist_utils.broadcast_object(results)


AFFINITY_DEFINITIONS = {
    "tag": "Z[i, j] = 1 - L_j(theta + u(g_i)) / L_j(theta): TAG's lookahead affinity (Fifty et al., 2021), "
           "u the previewed optimizer update",
    "shared_step": "Z[i, j] = 1 - L_j(theta + u(g_i)) / L_j(theta + u(0)): the lookahead against the step "
                   "every source shares (u(0), the momentum term), u the previewed optimizer update",
    "first_order": "Z[i, j] ~= lr <g_i, g_j> / L_j: the first-order estimate of TAG's lookahead affinity",
}


def _affinity_record(config: RunConfig, engine: MTDLEngine, names: list[str]) -> dict | None:
    """What the run measured about its tasks' affinity: the mean Z over the tracked steps, its
    standard error, the TAG groups and how stable a bootstrap over the steps finds them; None when
    nothing was measured (a single task, tracking off, or every step skipped)."""
    from mtdl_fast.grouping import bootstrap_groups, select_groups

    tracker = engine.tracker
    if tracker.steps == 0:
        return None
    mean = tracker.affinity.cpu().numpy()
    budget = min(config.budget, len(names))
    grouping = dist_utils.broadcast_object(
        select_groups(np.nan_to_num(mean), budget=budget, names=names) if dist_utils.is_main() else None)
    record = {"mean": mean, "history": tracker.history.cpu().numpy(), "stderr": None, "bootstrap": None,
              "definition": AFFINITY_DEFINITIONS["first_order" if config.affinity_mode == "first_order"
                                                 else tracker.baseline],
              "groups": {"groups": grouping.groups, "serving": list(grouping.serving), "score": float(grouping.score),
                         "method": "tag", "names": names}}
    if tracker.steps >= 2:
        record["stderr"] = tracker.affinity_stderr.cpu().numpy()
        boot = bootstrap_groups(record["history"], budget, seed=config.seed, names=names)
        record["bootstrap"] = {"selected": boot.selected, "partners": boot.partners, "n_resamples": boot.n_resamples,
                               "n_steps": boot.n_steps, "groupings": [[g, c] for g, c in boot.groupings[:10]]}
        record["groups"]["bootstrap_selected"] = boot.selected
    return record


def _write_affinity_files(out: Path, names: list[str], affinity: dict) -> None:
    """affinity.npy/.csv (the mean Z; the CSV's first line states the definition), its standard
    error, the per-step matrices and each other signal as CSV, and groups.json."""
    header = f"# {affinity['definition']}; source i (row) onto target j (column)\n" + ",".join(names)
    np.save(out / "affinity.npy", affinity["mean"])
    np.savetxt(out / "affinity.csv", affinity["mean"], delimiter=",", header=header, comments="")
    np.save(out / "affinity_steps.npy", affinity["history"])
    if affinity["stderr"] is not None:
        np.savetxt(out / "affinity_stderr.csv", affinity["stderr"], delimiter=",",
                   header=f"# standard error of the mean Z over the tracked steps\n{','.join(names)}", comments="")
    for name, matrix in affinity["signals"].items():
        slug = name.replace(" (", "_").replace(")", "").replace(" ", "_")
        np.savetxt(out / f"signal_{slug}.csv", matrix, delimiter=",", header=f"# {name}\n{','.join(names)}",
                   comments="")
    (out / "groups.json").write_text(json.dumps(_jsonable(affinity["groups"]), indent=2, allow_nan=False) + "\n")


def _describe_data(config: RunConfig, data: Dataset, eval_images: int) -> dict:
    """What the report says about the data: source, classes, split sizes and preprocessing."""
    preprocessing = {
        "digits": f"scikit-learn's 8x8 digits resized to {config.image_size}x{config.image_size} (bilinear), "
                  "1 channel, 80/20 split by the seed",
        "cifar10": "CIFAR-10's own train/test split, 32x32 RGB",
        "npz": "x (N, C, H, W) uint8 as stored, 80/20 split by the seed",
        "folder": f"images converted to RGB and resized to {config.image_size}x{config.image_size}, "
                  "80/20 split by the seed",
    }[config.dataset]
    return {"dataset": config.dataset, "classes": data.num_classes, "train": int(data.x_train.shape[0]),
            "test": int(data.x_test.shape[0]), "evaluated": eval_images, "image": list(data.x_train.shape[1:]),
            "preprocessing": preprocessing}


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
