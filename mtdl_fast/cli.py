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
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = _Parser(prog=PROG, description="mtdl-fast: kernel-backed Multi-Task Distribution Learning.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for cmd in _COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(_func=cmd.func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mtdl-fast``; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        func = getattr(args, "_func", None)
        if func is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        code = func(args)
        return EXIT_OK if code is None else int(code)
    except CLIError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def resolve_device(name: str):
    """'cpu', 'cuda' or 'cuda:N' -> torch.device; CLIError when unknown or without a GPU."""
    import torch

    text = str(name).strip().lower()
    if not (text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise CLIError(f"unknown device {name!r} (choose cpu or cuda)")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLIError(f"device {name!r} requested but no CUDA GPU is available")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) present")
        return dev
    return torch.device("cpu")


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` of the source tree (editable installs); CLIError when absent."""
    path = _repo_root() / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise CLIError(f"benchmark script {path} not found (the benchmarks ship with the source tree)")
    bench_dir = str(path.parent)
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    mod_name = f"_mtdl_fast_bench_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


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
    """Views of 8 sample photos under the default tasks -> DIR/views.png; then the quick augment benchmark."""
    device = resolve_device(args.device)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create output folder {str(out)!r}: {err.strerror or err}") from err

    import torch

    import mtdl_fast as mf
    from mtdl_fast import data

    photos = data.load_sample_photos(64, 8, seed=0).to(device)
    tasks = mf.DistributionTasks(list(mf.tasks.DEFAULT_TASKS), seed=0)
    with torch.no_grad():
        views = tasks(photos)
    png = save_view_grid(views, list(tasks.names), out / "views.png",
                         title=f"mtdl-fast: {len(tasks)} distribution tasks x {photos.shape[0]} sample photos")
    print(f"views: {tuple(views.shape)} {views.dtype} on {views.device} -> {png}")

    bench = load_benchmark("bench_augment")
    kwargs = {"batch": 8, "budget_s": 0.1} if args.quick else {}
    try:
        section = bench.run(quick=True, device=str(device), **kwargs)
    except ValueError as err:
        raise CLIError(str(err)) from err
    print()
    print(section["table"])
    path = bench.write(section, out / "bench_augment.json")
    print(f"\nbenchmark results -> {path}")
    return EXIT_OK
