"""Command-line interface: ``mtdl-fast <command> ...`` (also ``python -m mtdl_fast``).

Subcommands are small functions registered with :func:`subcommand`; each receives the parsed
``argparse.Namespace`` and returns an exit code. Expected failures (bad arguments, an unavailable
device) raise :class:`CLIError`: :func:`main` prints them as one line on stderr and returns 2,
without a traceback.

Adding a command::

    def _train_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--epochs", type=int, default=1)

    @subcommand("train", help="train on a dataset", arguments=_train_args)
    def cmd_train(args: argparse.Namespace) -> int:
        ...
        return 0
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from mtdl_fast import distributed as dist_utils

PROG = "mtdl-fast"
EXIT_OK, EXIT_USAGE = 0, 2


class CLIError(Exception):
    """An expected, user-facing failure: printed as one line, exit code 2."""


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    func: Callable[[argparse.Namespace], int | None]
    arguments: Callable[[argparse.ArgumentParser], None] | None


_COMMANDS: dict[str, _Command] = {}


def subcommand(name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``func(args) -> int`` as ``mtdl-fast <name>``; ``arguments(parser)`` adds its options."""
    def deco(func: Callable[[argparse.Namespace], int | None]):
        if name in _COMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        _COMMANDS[name] = _Command(name, help, func, arguments)
        return func
    return deco


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors raise CLIError instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)")


# Imported by the application only, installed by the `app` extra.
_APP_MODULES = ("matplotlib", "tqdm", "PIL")


def _given_options(parser: argparse.ArgumentParser, command: str, argv: Sequence[str]) -> set[str]:
    """The destinations of the options written on the command line (not filled by a default)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {action.dest for action in sub._actions for opt in action.option_strings
            if any(token == opt or token.startswith(opt + "=") for token in argv)}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = _Parser(prog=PROG, description="mtdl-fast: kernel-backed Multi-Task Distribution Learning.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for cmd in _COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, allow_abbrev=False)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(_func=cmd.func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mtdl-fast``; returns the process exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        func = getattr(args, "_func", None)
        if func is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        args.given = _given_options(parser, args.command, argv)
        code = func(args)
        return EXIT_OK if code is None else int(code)
    except CLIError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as err:
        if err.name not in _APP_MODULES:
            raise
        print(f"{PROG}: error: this command needs {err.name}: pip install 'mtdl-fast[app]'", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def script_main() -> NoReturn:
    """The ``mtdl-fast`` console script and ``python -m mtdl_fast``: `main`, then exit with its code;
    a rank launched by torchrun, which has left its process group by then, through
    `mtdl_fast.distributed.exit_rank` (no interpreter teardown, where gloo can abort a finished rank)."""
    code = main()
    if dist_utils.launched_by_torchrun():
        dist_utils.exit_rank(code)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def resolve_device(name: str):
    """'cpu', 'cuda' or 'cuda:N' -> torch.device; CLIError when unknown or without a GPU."""
    from mtdl_fast.app.trainer import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as err:
        raise CLIError(str(err)) from err


def save_view_grid(views, names: Sequence[str], path: Path, title: str | None = None) -> Path:
    """Save a PNG grid of views (K, B, C, H, W), float in [0, 1] (or uint8): rows = tasks, columns = images."""
    import torch
    from matplotlib.figure import Figure  # Agg canvas, no global pyplot state

    v = views.detach().to("cpu")
    v = v.float() / 255.0 if v.dtype == torch.uint8 else v.float()
    v = v.clamp(0, 1).permute(0, 1, 3, 4, 2).numpy()  # K, B, H, W, C
    k, b = v.shape[:2]
    cell = 1.1
    fig = Figure(figsize=(cell * b + 1.6, cell * k + (0.4 if title else 0.1)), dpi=100)
    axes = fig.subplots(k, b, squeeze=False)
    for i in range(k):
        for j in range(b):
            ax = axes[i][j]
            img = v[i, j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j == 0:
                ax.set_ylabel(names[i], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=1.5 / (cell * b + 1.6), right=0.99, bottom=0.01,
                        top=1 - (0.4 if title else 0.05) / (cell * k + 0.4), wspace=0.05, hspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--quick", action="store_true",
                   help="smallest settings (a few seconds): tiny benchmark batch and time budget")


@subcommand("demo", help="render the default distribution tasks on sample photos and time them",
            arguments=_demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    """Views of 8 sample photos under the default tasks -> DIR/views.png; then their time per call."""
    device = resolve_device(args.device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create output folder {str(out)!r}: {err.strerror or err}") from err

    import torch

    import mtdl_fast as mf
    from mtdl_fast.app import data

    photos = data.load_sample_photos(64, 8, seed=0).to(device)
    tasks = mf.DistributionTasks(list(mf.tasks.DEFAULT_TASKS), seed=0)
    with torch.no_grad():
        views = tasks(photos)
    png = save_view_grid(views, list(tasks.names), out / "views.png",
                         title=f"mtdl-fast: {len(tasks)} distribution tasks x {photos.shape[0]} sample photos")
    print(f"views: {tuple(views.shape)} {views.dtype} on {views.device} -> {png}")

    from torch.utils.benchmark import Timer

    batch = photos.repeat(4 if args.quick else 32, 1, 1, 1)
    timer = Timer("tasks(x)", globals={"tasks": tasks, "x": batch})
    seconds = timer.blocked_autorange(min_run_time=0.2 if args.quick else 2.0).median
    print(f"{len(tasks)} views of {batch.shape[0]} images {tuple(batch.shape[-2:])} on {device}: "
          f"{seconds * 1e3:.2f} ms/call, {batch.shape[0] / seconds:,.0f} images/s "
          f"(median, torch.utils.benchmark; `make bench` compares with torchvision and kornia)")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# The main job and its companions
# ----------------------------------------------------------------------------------------------

def _run_args(p: argparse.ArgumentParser) -> None:
    from mtdl_fast.app.trainer import RunConfig

    d = RunConfig()
    p.add_argument("--out", default=None, help="run directory (default: runs/<timestamp>); never overwritten")
    p.add_argument("--tasks", default=",".join(d.tasks),
                   help="comma-separated distribution tasks, e.g. identity,rotate,hue")
    p.add_argument("--dataset", default=d.dataset, help="digits (embedded, default), cifar10, npz or folder")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-10 root, an .npz with x (N,C,H,W uint8) and y, or an image folder")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help=f"image side for digits/folder (default {d.image_size})")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help=f"training steps (default {d.steps})")
    length.add_argument("--epochs", type=float, default=None, help="training epochs instead of steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per batch (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"SGD learning rate (default {d.lr})")
    p.add_argument("--model", default=d.model,
                   help="hard (shared trunk, K heads), onehot, gating, film or moe (one task-conditioned head), "
                        "aligned (per-task covariance alignment of the stem) or soft (soft parameter sharing)")
    p.add_argument("--align-steps", type=int, default=d.align_steps,
                   help="--model aligned: steps that train only the alignment and the heads (default: a quarter "
                        "of the run)")
    p.add_argument("--soft-lambda", type=float, default=d.soft_lambda,
                   help=f"--model soft: weight of the penalty tying the trunk copies (default {d.soft_lambda})")
    p.add_argument("--amp", default=d.amp, choices=["bf16", "fp16"],
                   help="mixed precision of the forward passes (default: off); fp16 adds a gradient scaler")
    p.add_argument("--trunk", default=d.trunk, help="resnet or mlp (default resnet)")
    p.add_argument("--weighting", default=d.weighting, help="sum, minmax, uncertainty, dwa, svd or uniform")
    p.add_argument("--strategy", default=d.strategy,
                   help="joint (default) or stgu: Selective Task Group Updates, groups stepped in turn")
    p.add_argument("--affinity-every", type=_every, default=d.affinity_every,
                   help=f"TAG affinity every N steps; 0 or none: no affinity (default {d.affinity_every})")
    p.add_argument("--affinity-mode", default=d.affinity_mode, help="exact or first_order")
    p.add_argument("--affinity-baseline", default=d.affinity_baseline,
                   help=f"tag (TAG's Z) or shared_step (Z against the step every task shares, the momentum "
                        f"term; default {d.affinity_baseline}); exact mode only")
    p.add_argument("--budget", type=int, default=d.budget, help=f"maximum number of task groups (default {d.budget})")
    p.add_argument("--protocol", default=d.protocol,
                   help="default, or paper: alone, every pair, all together and the groups, over --seeds seeds")
    p.add_argument("--seeds", type=int, default=d.seeds,
                   help=f"seeds of the paper protocol (default {d.seeds}), from --seed on")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run: {QUICK_STEPS} steps unless --steps/--epochs say otherwise")
    p.add_argument("--device", default=d.device, help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads (default {d.threads}: the fastest measured for the default run on a "
                        f"2-core machine); recorded in config.json")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of data order, augmentation and init (default {d.seed})")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every N steps")
    p.add_argument("--resume", default=None,
                   help="continue from this checkpoint.pt in its run directory, with its saved options; "
                        "only --steps (more) and --checkpoint-every may be given with it")


def _every(text: str) -> int | None:
    """--affinity-every: a positive int, or 0 / none for no affinity."""
    if text.strip().lower() in ("0", "none", "off"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, 0 or none, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, 0 or none, got {text!r}")
    return value


# --quick: long enough for the losses to fall and the affinity to take shape on the digits
QUICK_STEPS = 50

# What a resumed run may change: run longer, checkpoint more or less often. Anything else would
# continue a different experiment under the old one's name.
_RESUME_MAY_CHANGE = ("steps", "checkpoint_every")


def _config_from(args: argparse.Namespace):
    from mtdl_fast.app.trainer import RunConfig
    from mtdl_fast.ops import OPS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for task in tasks:
        for op in task.split("+"):
            if op not in OPS:
                raise CLIError(f"unknown task {op!r}; available: {', '.join(sorted({o.name for o in OPS.values()}))}")
    default_steps = QUICK_STEPS if args.quick else RunConfig().steps
    steps = args.steps if args.steps is not None or args.epochs is not None else default_steps
    config = RunConfig(tasks=tasks, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
                       steps=steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, model=args.model,
                       trunk=args.trunk, weighting=args.weighting, strategy=args.strategy,
                       affinity_every=args.affinity_every,
                       affinity_mode=args.affinity_mode, budget=args.budget, device=args.device, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, protocol=args.protocol, threads=args.threads,
                       seeds=args.seeds, affinity_baseline=args.affinity_baseline, amp=args.amp,
                       align_steps=args.align_steps, soft_lambda=args.soft_lambda)
    try:
        config.validate()
    except ValueError as err:
        raise CLIError(str(err)) from err
    return config


def _resumed_config(args: argparse.Namespace):
    """The configuration saved in --resume's checkpoint, with the changes a resumed run may make."""
    import dataclasses

    from mtdl_fast.app.checkpoint import CheckpointError, load_checkpoint
    from mtdl_fast.app.trainer import RunConfig, check_run_checkpoint

    try:
        state = load_checkpoint(args.resume)
        check_run_checkpoint(state, args.resume)
        saved = RunConfig(**state["config"])
    except CheckpointError as err:
        raise CLIError(str(err)) from err
    except TypeError as err:
        raise CLIError(f"{args.resume} holds a configuration this version cannot read ({err})") from err
    asked = _config_from(args)
    changes = {}
    for name in sorted(args.given & {f.name for f in dataclasses.fields(RunConfig)}):
        value = getattr(asked, name)
        if value == getattr(saved, name):
            continue
        option = "--" + name.replace("_", "-")
        if name not in _RESUME_MAY_CHANGE:
            raise CLIError(f"{option} {value} differs from the checkpoint's {getattr(saved, name)}; a resumed run "
                           f"keeps its options (only --steps and --checkpoint-every may change)")
        changes[name] = value
    if "steps" in changes and (saved.steps is None or changes["steps"] < int(state["step"])):
        raise CLIError(f"--steps {changes['steps']} cannot continue {args.resume}: it was written at step "
                       f"{state['step']} of a run of {saved.steps or f'{saved.epochs} epochs'}")
    return dataclasses.replace(saved, **changes)


def _run_dir(args: argparse.Namespace) -> Path:
    import time

    if args.resume is not None:
        out = Path(args.resume).resolve().parent
        if args.out is not None and Path(args.out).resolve() != out:
            raise CLIError(f"--resume continues in {out}; --out {args.out} names another directory")
        return out
    out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        raise CLIError(f"{out} already holds files; choose a new --out (or --resume its checkpoint)")
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """CLIError unless `out` can be created and written, checked without creating anything."""
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"--out {out} lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out} is not writable ({existing} is read-only for this user)")


def _on_rank0(decide: Callable[[], Any]) -> Any:
    """decide() on rank 0, its value (or its CLIError) on every rank: one choice of run folder."""
    value, failure = None, None
    if dist_utils.is_main():
        try:
            value = decide()
        except CLIError as err:
            failure = str(err)
    value, failure = dist_utils.broadcast_object((value, failure))
    if failure is not None:
        raise CLIError(failure)
    return value


@subcommand("run", help="the main job: train on distribution tasks, track affinity, select groups, evaluate",
            arguments=_run_args)
def cmd_run(args: argparse.Namespace) -> int:
    from mtdl_fast.app.checkpoint import CheckpointError
    from mtdl_fast.app.trainer import run

    config = _resumed_config(args) if args.resume is not None else _config_from(args)
    dist_utils.init_from_env(resolve_device(config.device))  # under torchrun: join its process group
    main = dist_utils.is_main()
    completed = False
    try:
        out = _on_rank0(lambda: _run_dir(args))
        try:
            results = run(config, out, resume=args.resume)
        except CheckpointError as err:
            raise CLIError(str(err)) from err
        except ValueError as err:
            raise CLIError(str(err)) from err
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted; continue with --resume {out / 'checkpoint.pt'}", file=sys.stderr)
            return 130
        completed = True
    finally:
        dist_utils.shutdown(completed)
    if not main:
        return EXIT_OK
    groups = results["groups"]
    names = results["names"]
    if groups is None:
        print("groups: none (no affinity measured)")
    else:
        print(f"groups: {[[names[i] for i in g] for g in groups['groups']]} (score {groups['score']:.4f})")
    print(f"report: {out / 'report.md'}")
    return EXIT_OK


def _groups_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("affinity", help="affinity.npy or affinity.csv of a run (K x K)")
    p.add_argument("--budget", type=int, default=3, help="maximum number of groups (default 3)")
    p.add_argument("--method", default="tag", help="tag (affinity, maximised) or hoa (pairwise losses, minimised)")
    p.add_argument("--names", default=None,
                   help="comma-separated task names (default: the CSV header, or the run's config.json)")


def _run_task_names(path: Path) -> list[str] | None:
    """Task names of the run directory holding `path`, when its config.json says them."""
    import json

    config = path.parent / "config.json"
    try:
        return list(json.loads(config.read_text())["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@subcommand("groups", help="select task groups from a saved affinity matrix", arguments=_groups_args)
def cmd_groups(args: argparse.Namespace) -> int:
    import numpy as np

    from mtdl_fast.grouping import bootstrap_groups, select_groups

    path = Path(args.affinity)
    if not path.is_file():
        raise CLIError(f"affinity file {path} does not exist")
    names = args.names.split(",") if args.names else None
    try:
        if path.suffix == ".npy":
            matrix = np.load(path, allow_pickle=False)
            names = names or _run_task_names(path)
        else:  # '#' lines (the definition), then the task names, then the rows
            lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
            names = names or lines[0].split(",")
            matrix = np.loadtxt(lines[1:], delimiter=",", ndmin=2)
        if names is not None and len(names) != len(matrix):
            names = None if not args.names else names  # a stale config.json: print indices rather than lie
        if args.method.lower() == "hoa" and path.stem.startswith("affinity"):
            print(f"{PROG}: warning: HOA expects pairwise losses (P[a, b]: a's loss trained with b), "
                  f"not an affinity matrix; {path.name} looks like one", file=sys.stderr)
        print(select_groups(matrix, budget=args.budget, method=args.method, names=names))
        steps = path.parent / "affinity_steps.npy"
        if args.method.lower() == "tag" and steps.is_file():
            history = np.load(steps, allow_pickle=False)
            if history.ndim == 3 and history.shape[1:] == matrix.shape and history.shape[0] >= 2:
                print(bootstrap_groups(history, budget=args.budget, names=names))
    except (ValueError, TypeError, OSError) as err:
        raise CLIError(f"{path}: {err}") from err
    return EXIT_OK


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint.pt of a run")
    p.add_argument("--tasks", default=None, help="comma-separated distributions to evaluate on (default: the run's)")
    p.add_argument("--data-dir", default=None, help="where the run's dataset is now (default: the run's --data-dir)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


@subcommand("eval", help="evaluate a checkpoint on chosen distributions", arguments=_eval_args)
def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from mtdl_fast.app.checkpoint import CheckpointError, load_checkpoint
    from mtdl_fast.app.reports import markdown_table
    from mtdl_fast.app.trainer import (
        RunConfig,
        build_engine,
        check_run_checkpoint,
        evaluate,
        load_dataset,
        load_engine_state,
    )

    device = resolve_device(args.device)
    try:
        state = load_checkpoint(args.checkpoint)
        check_run_checkpoint(state, args.checkpoint)
    except CheckpointError as err:
        raise CLIError(str(err)) from err
    saved = {**state["config"], "device": str(device)}
    if args.data_dir is not None:
        saved["data_dir"] = args.data_dir
    config = RunConfig(**saved)
    eval_names = args.tasks.split(",") if args.tasks else list(config.tasks)
    try:
        data = load_dataset(config)
        engine = build_engine(config, config.tasks, data, device)
        load_engine_state(engine, state, args.checkpoint)
        acc = evaluate(engine, config.tasks, eval_names, data.x_test[: config.eval_size].to(device),
                       data.y_test[: config.eval_size].to(device), config.seed)
    except ValueError as err:
        raise CLIError(str(err)) from err
    rows = [f"head {n}" for n in config.tasks] + ["model"]
    print(markdown_table(np.asarray(acc), rows, eval_names, corner="trained \\ eval"))
    return EXIT_OK


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/profile", help="folder for trace.json (default runs/profile)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=4, help="profiled training steps (default 4)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the default ten)")


@subcommand("profile", help="profile training steps with torch.profiler (Chrome trace + phase table)",
            arguments=_profile_args)
def cmd_profile(args: argparse.Namespace) -> int:
    from mtdl_fast.app.profiling import profile_steps

    device = resolve_device(args.device)
    tasks = args.tasks.split(",") if args.tasks else None
    try:
        trace, table = profile_steps(Path(args.out), device, steps=args.steps, tasks=tasks)
    except ValueError as err:
        raise CLIError(str(err)) from err
    print(table)
    print(f"\ntrace: {trace} (open in chrome://tracing or https://ui.perfetto.dev)")
    return EXIT_OK
