"""Human-facing outputs of a run: ``report.md`` and its figures, rendered from plain data.

The trainer collects its results into a dict of plain values (lists, numpy arrays, floats) and calls
:func:`write_report`; nothing here touches a model. Every figure is drawn on a fresh Agg canvas
(``FigureCanvasAgg`` attached explicitly; no pyplot, no display, and the process-wide backend is
left alone), so rendering works on headless machines and inside notebooks alike.

    from mtdl_fast.app.reports import write_report
    write_report("runs/exp1", {"names": names, "affinity": Z, "groups": {...}, ...})

Files written to the run directory: ``report.md``, ``affinity.png``, ``accuracy.png`` (further
accuracy matrices: ``accuracy_1.png``, ``accuracy_2.png``, ...) and ``curves.png``; a figure whose
data is absent is not drawn and its section is left out of the report. The report holds no clock
times of its own, so the same results give the same ``report.md``.

Conventions: ``affinity[i, j]`` is TAG's Z_{i->j}, the effect of source task i's update on target
task j's loss (rows = sources, columns = targets).
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.patches
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "write_report",
    "plot_affinity",
    "plot_accuracy_matrix",
    "plot_curves",
    "markdown_table",
    "group_member_scores",
]

#: Largest K for which heatmap cells are annotated with their values.
ANNOTATE_MAX = 12
_MISSING = "n/a"
_DPI = 110


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------

def _as_float_array(x: Any, ndim: int | None = None, what: str = "array") -> np.ndarray:
    """Plain data (nested lists with None, numpy, a CPU/GPU tensor) -> float64 numpy; None -> NaN."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)):
        x = _none_to_nan(x)
    arr = np.array(x, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {arr.shape}")
    return arr


def _none_to_nan(x: Any) -> Any:
    if x is None:
        return math.nan
    if isinstance(x, (list, tuple)):
        return [_none_to_nan(v) for v in x]
    return x


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any, fmt: str) -> str:
    """Format one table value: numbers with ``fmt`` (non-finite as ``n/a``/``inf``), text as is."""
    if value is None:
        return _MISSING
    if isinstance(value, str):
        return _cell(value)
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _cell(value)
    if math.isnan(v):
        return _MISSING
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    try:
        return _cell(fmt.format(value.item() if isinstance(value, np.generic) else value))
    except (ValueError, TypeError):
        return _cell(fmt.format(v))


def _check_names(names: Sequence[str], n: int, what: str) -> list[str]:
    names = [str(s) for s in names]
    if len(names) != n:
        raise ValueError(f"{what}: {len(names)} names for {n} entries")
    return names


def _figure(figsize: tuple[float, float]) -> Figure:
    """A new figure on its own Agg canvas (text is measured by Agg during the layout too)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _wrap_title(title: str, fig: Figure, fontsize: float) -> str:
    """``title`` broken into lines that fit the figure's width."""
    chars = int((fig.get_figwidth() - 0.3) / (0.0078 * fontsize))
    return textwrap.fill(str(title), width=max(16, chars), break_long_words=False)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software"/date metadata: the same data gives the same bytes on the same matplotlib.
    fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})
    return path


def _text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba``."""
    r, g, b = rgba[:3]
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.5 else "white"


def _heatmap(ax, data: np.ndarray, cmap, norm, row_names, col_names,
             annotations: list[list[str]] | None, fontsize: float):
    """Draw ``data`` as a heatmap with NaN cells grey and optional per-cell text; returns the image."""
    cmap = cmap.with_extremes(bad="#d0d0d0")
    masked = np.ma.masked_invalid(data)
    im = ax.imshow(masked, cmap=cmap, norm=norm, interpolation="nearest", aspect="auto")
    r, c = data.shape
    ax.set_xticks(np.arange(c))
    ax.set_yticks(np.arange(r))
    long = max((len(s) for s in col_names), default=0) > 3
    ax.set_xticklabels(col_names, rotation=40 if long else 0, ha="right" if long else "center",
                       rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticklabels(row_names, fontsize=fontsize)
    ax.set_xticks(np.arange(c + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(r + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if annotations is not None:
        for i in range(r):
            for j in range(c):
                v = data[i, j]
                if np.isfinite(v):
                    colour = _text_colour(cmap(norm(v)))
                else:
                    colour = "#555555"
                ax.text(j, i, annotations[i][j], ha="center", va="center", color=colour,
                        fontsize=fontsize * 0.9)
    return im


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------

def markdown_table(matrix: Any, row_names: Sequence[str], col_names: Sequence[str],
                   fmt: str = "{:.3f}", corner: str = "", align: str | None = None) -> str:
    """A matrix as a GitHub markdown table: a header row of ``col_names`` (``corner`` above the
    row names), one row per ``row_names`` entry. The project's one table writer.

    Numbers are written with ``fmt`` (``str.format`` syntax); NaN/None as ``n/a``; strings as is.
    ``|`` in any text is escaped. A 1-D ``matrix`` is one row. ``align`` has one letter per column of
    ``col_names``, ``l`` (left) or ``r`` (right); by default all are right-aligned (the row names
    are always left-aligned). Returns the table without a trailing newline, e.g.
    ``markdown_table([[1, 0.5]], ["a"], ["x", "y"], fmt="{:.1f}")`` is::

        |  | x | y |
        |---|---:|---:|
        | a | 1.0 | 0.5 |
    """
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().numpy()
    data = matrix.tolist() if isinstance(matrix, np.ndarray) else list(matrix)
    if data and not isinstance(data[0], (list, tuple, np.ndarray)):  # 1-D: one row
        data = [data]
    rows = [list(r) for r in data]
    if len(rows) != len(row_names):
        raise ValueError(f"markdown_table: {len(rows)} rows, {len(row_names)} row names")
    for r in rows:
        if len(r) != len(col_names):
            raise ValueError(f"markdown_table: a row of {len(r)} values, {len(col_names)} column names")
    align = "r" * len(col_names) if align is None else align
    if not isinstance(align, str):
        raise TypeError(f"markdown_table: align must be a str of 'l'/'r', got {type(align).__name__}")
    if len(align) != len(col_names) or set(align) - {"l", "r"}:
        raise ValueError(f"markdown_table: align must be one of 'l'/'r' per column ({len(col_names)}), got {align!r}")
    header = "| " + " | ".join([_cell(corner)] + [_cell(c) for c in col_names]) + " |"
    rule = "|" + "|".join(["---"] + ["---:" if a == "r" else "---" for a in align]) + "|"
    body = ["| " + " | ".join([_cell(name)] + [_fmt(v, fmt) for v in r]) + " |"
            for name, r in zip(row_names, rows)]
    return "\n".join([header, rule] + body)


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------

def _colorbar(fig: Figure, ax, im, extend: str, height_in: float):
    """A slim colour bar as tall as the heatmap (``height_in`` inches), right of it."""
    return fig.colorbar(im, ax=ax, extend=extend, pad=0.02, fraction=0.08, shrink=1.0,
                        aspect=max(4.0, height_in / 0.18))


def _heatmap_figsize(r: int, c: int, row_names: Sequence[str], col_names: Sequence[str],
                     fontsize: float, cell: float) -> tuple[float, float]:
    """Figure size (inches) that leaves room for the tick labels, axis labels, title and colour
    bar around an r x c grid of ``cell``-inch cells; constrained layout refines the placement."""
    char = 0.085 * fontsize / 10.0  # mean glyph width of DejaVu Sans, inches
    long_cols = max((len(s) for s in col_names), default=0) > 3
    left = max((len(s) for s in row_names), default=1) * char + 0.6
    col_len = max((len(s) for s in col_names), default=1) * char
    bottom = (col_len * 0.7 if long_cols else 0.2) + 0.45
    width = left + c * cell + 1.3
    height = bottom + r * cell + 0.45
    return min(width, 24.0), min(height, 24.0)


def _affinity_scale(z: np.ndarray) -> float:
    """Half-width of the symmetric colour range for an affinity matrix.

    Taken from the off-diagonal entries when any is non-zero: the diagonal (a task's lookahead on
    itself) is usually much larger and would wash out the cross-task structure the map is for; the
    colour bar then marks the clipped range and the annotations keep the exact values.
    """
    finite = np.isfinite(z)
    off = finite & ~np.eye(z.shape[0], dtype=bool)
    for mask in (off, finite):
        if mask.any():
            m = float(np.abs(z[mask]).max())
            if m > 0:
                return m
    return 1.0


def _display_scale(vmax: float) -> tuple[int, int]:
    """(exponent, decimals): show values as v / 10**exponent with ``decimals`` decimals, so the
    colour-scale maximum gets about 3 significant digits without long runs of zeros."""
    e = int(math.floor(math.log10(vmax)))
    if -1 <= e <= 2:
        return 0, max(0, 2 - e)
    return e, 2


def _number_format(values: np.ndarray) -> str:
    """A table format for a family of values: fixed point with 4 decimals for magnitudes in
    [0.1, 1000), else scientific with 4 significant digits (affinities are often ~1e-3)."""
    finite = np.abs(values[np.isfinite(values)])
    m = float(finite.max()) if finite.size else 0.0
    return "{:.4f}" if m == 0 or 0.1 <= m < 1000 else "{:.3e}"


def _labels(z: np.ndarray, decimals: int) -> list[list[str]]:
    zero = f"{0:.{decimals}f}"
    out = []
    for row in z:
        cells = []
        for v in row:
            t = "–" if not np.isfinite(v) else f"{v:.{decimals}f}"
            cells.append(zero if t == "-" + zero else t)  # "-0.00" reads as noise
        out.append(cells)
    return out


def plot_affinity(affinity: Any, names: Sequence[str], path: str | Path, stderr: Any = None,
                  title: str = "TAG affinity Z[i, j]") -> None:
    """Heatmap of the TAG affinity matrix, saved as PNG at ``path``.

    Args:
        affinity: (K, K) array, ``affinity[i, j]`` = Z_{i->j} (source i's update onto target j's
            loss). NaN cells (not measured) are drawn grey.
        names: the K task names, for both axes.
        path: output PNG path (parent folders are created).
        stderr: optional (K, K) standard errors: cells whose |Z| is within 2 of them of zero (not
            distinguishable from no effect) are hatched.
        title: the figure's title.

    The colour map is diverging (blue helps, red hurts) and centred at 0 with a symmetric range
    set by the off-diagonal entries (the diagonal may saturate; the colour bar shows arrows then).
    Cells carry their values when K <= 12; very small or large affinities are shown in units of a
    power of ten, stated in the title and on the colour bar.
    """
    z = _as_float_array(affinity, 2, "affinity")
    if z.shape[0] != z.shape[1]:
        raise ValueError(f"affinity must be square, got shape {z.shape}")
    k = z.shape[0]
    names = _check_names(names, k, "plot_affinity")
    vmax = _affinity_scale(z)
    e, decimals = _display_scale(vmax)
    unit = f" ×1e{e}" if e else ""
    shown, vmax = z / 10.0 ** e, vmax / 10.0 ** e
    norm = mcolors.TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax)
    cmap = matplotlib.colormaps["RdBu"]
    fontsize = 10 if k <= 6 else (8 if k <= 12 else 7)
    cell = 0.9 if k <= 6 else (0.7 if k <= 12 else max(0.25, 8.0 / k))
    fig = _figure(_heatmap_figsize(k, k, names, names, fontsize, cell))
    ax = fig.add_subplot()
    annotations = _labels(shown, decimals) if k <= ANNOTATE_MAX else None
    im = _heatmap(ax, shown, cmap, norm, names, names, annotations, fontsize)
    if stderr is not None:
        noise = np.abs(z) < 2 * _as_float_array(stderr, 2, "stderr")
        for i, j in zip(*np.nonzero(noise)):
            ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                                      edgecolor="0.35", linewidth=0))
        title += "  (hatched: |Z| < 2 standard errors)"
    finite = shown[np.isfinite(shown)]
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max",
              (True, True): "both"}[(bool((finite < -vmax).any()), bool((finite > vmax).any()))]
    cb = _colorbar(fig, ax, im, extend, k * cell)
    cb.set_label(f"Z[i, j]{unit}   (> 0: i helps j)", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    ax.set_xlabel("target j (loss)", fontsize=fontsize + 1)
    ax.set_ylabel("source i (update)", fontsize=fontsize + 1)
    ax.set_title(_wrap_title(title + (f"  (values{unit})" if unit else ""), fig, fontsize + 2), fontsize=fontsize + 2)
    _save(fig, path)


def plot_accuracy_matrix(acc: Any, row_names: Sequence[str], col_names: Sequence[str],
                         path: str | Path, title: str = "accuracy") -> None:
    """Heatmap of accuracies: rows = trained distribution (e.g. the head), columns = evaluation
    distribution; sequential colour map on [0, 1], every cell annotated (2 decimals; smaller text
    for large matrices, none beyond 30 columns). NaN cells are grey. Saved as PNG at ``path``.
    """
    a = _as_float_array(acc, 2, "accuracy matrix")
    r, c = a.shape
    row_names = _check_names(row_names, r, "plot_accuracy_matrix rows")
    col_names = _check_names(col_names, c, "plot_accuracy_matrix columns")
    norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
    cmap = matplotlib.colormaps["viridis"]
    big = max(r, c)
    fontsize = 10 if big <= 6 else (8 if big <= 12 else 7)
    cell = 0.9 if big <= 6 else (0.7 if big <= 12 else max(0.25, 8.0 / big))
    fig = _figure(_heatmap_figsize(r, c, row_names, col_names, fontsize, cell))
    ax = fig.add_subplot()
    annotations = _labels(a, 2) if c <= 30 else None
    im = _heatmap(ax, a, cmap, norm, row_names, col_names, annotations, fontsize)
    cb = _colorbar(fig, ax, im, "neither", r * cell)
    cb.set_label("accuracy", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    ax.set_xlabel("evaluated on", fontsize=fontsize + 1)
    ax.set_ylabel("trained on", fontsize=fontsize + 1)
    ax.set_title(_wrap_title(title, fig, fontsize + 2), fontsize=fontsize + 2)
    _save(fig, path)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, ignoring NaN; near the ends the window is
    cut at the series' end (not shrunk to the point itself), so the ends are averages too."""
    ok = np.isfinite(y)
    cs = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    cn = np.concatenate([[0.0], np.cumsum(ok)])
    idx = np.arange(len(y))
    lo, hi = np.maximum(idx - window // 2, 0), np.minimum(idx + window // 2 + 1, len(y))
    n = cn[hi] - cn[lo]
    return np.where(n > 0, (cs[hi] - cs[lo]) / np.maximum(n, 1), np.nan)


def plot_curves(metrics: Sequence[Mapping[str, Any]], path: str | Path,
                names: Sequence[str] | None = None) -> None:
    """Training curves from the JSONL metric rows, saved as PNG at ``path``.

    Left panel: total ``loss`` vs ``step``. Right panel: each task's loss (``losses``, K floats)
    vs ``step``, labelled with ``names`` when given (else ``task 0``, ...). Rows without ``step``
    or ``loss`` (e.g. evaluation rows) are skipped. With 50 or more points the raw series is drawn
    faint under a moving average (window ~ n/20).
    """
    rows = [m for m in metrics if m.get("step") is not None and m.get("loss") is not None]
    rows.sort(key=lambda m: float(m["step"]))
    steps = np.array([float(m["step"]) for m in rows])
    loss = np.array([float(m["loss"]) if m["loss"] is not None else np.nan for m in rows])
    loss_rows = [m for m in rows if m.get("losses") is not None]
    k = max((len(m["losses"]) for m in loss_rows), default=0)
    if names is not None and k and len(names) != k:
        names = None
    labels = [str(s) for s in names] if names is not None else [f"task {i}" for i in range(k)]

    fig = _figure((12.0, 4.4))
    ax_total, ax_tasks = fig.subplots(1, 2)
    n = len(steps)
    window = max(3, (n // 20) | 1)  # odd, so the centred average is symmetric

    def draw(ax, x, y, colour, label):
        if len(x) >= 50:
            ax.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(x, _smooth(y, window), color=colour, linewidth=1.6, label=label)
        else:
            ax.plot(x, y, color=colour, linewidth=1.4, marker="o" if len(x) < 15 else None,
                    markersize=3, label=label)

    def frame(ax, title: str, empty: str | None) -> None:
        if empty is not None:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)

    if n:
        draw(ax_total, steps, loss, "black", "total")
    frame(ax_total, "total loss", None if n else "no training rows")

    if k:
        x = np.array([float(m["step"]) for m in loss_rows])
        y = np.full((len(loss_rows), k), np.nan)
        for r, m in enumerate(loss_rows):
            vals = _none_to_nan(list(m["losses"]))
            y[r, :len(vals)] = np.asarray(vals, dtype=np.float64)
        cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
        for j in range(k):
            draw(ax_tasks, x, y[:, j], cmap(j % cmap.N), labels[j])
        ncol = 1 if k <= 12 else 2
        ax_tasks.legend(fontsize=8 if k <= 8 else 7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                        borderaxespad=0.0, frameon=False, ncol=ncol)
    frame(ax_tasks, "per-task loss", None if k else "no per-task losses")
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# groups
# ----------------------------------------------------------------------------------------------

def group_member_scores(affinity: Any, group: Sequence[int]) -> dict[int, float]:
    """TAG's score of each member a of a group S: the mean over the other members b of Z[b, a]
    (affinity onto a); NaN for a singleton (TAG scores it -1e6, i.e. "no help")."""
    z = _as_float_array(affinity, 2, "affinity")
    group = [int(t) for t in group]
    out: dict[int, float] = {}
    for a in group:
        others = [b for b in group if b != a]
        out[a] = float(np.mean([z[b, a] for b in others])) if others else math.nan
    return out


def _groups_section(groups: Mapping[str, Any], names: list[str], affinity: np.ndarray | None) -> list[str]:
    k = len(names)
    members = [[int(t) for t in g] for g in groups.get("groups", [])]
    serving = groups.get("serving")
    label = lambda t: names[t] if 0 <= t < k else f"task {t}"  # noqa: E731

    lines = ["## Task groups", ""]
    facts = []
    if groups.get("method") is not None:
        facts.append(f"method: {groups['method']}")
    if groups.get("score") is not None:
        facts.append(f"score: {_fmt(groups['score'], '{:.4g}')}")
    facts.append(f"{len(members)} group{'s' if len(members) != 1 else ''} for {k} tasks")
    lines += ["; ".join(facts), ""]

    if members:
        table = ["| group | tasks |", "|---:|---|"]
        for gi, g in enumerate(members):
            table.append(f"| {gi} | {', '.join(_cell(label(t)) for t in g)} |")
        lines += table + [""]

    if serving is not None and len(serving) > 0:
        given = groups.get("task_scores")
        table = ["| task | serving group | members | score |", "|---|---:|---|---:|"]
        for t, gi in enumerate(serving):
            if gi is None or not (0 <= int(gi) < len(members)):
                table.append(f"| {_cell(label(t))} | {_MISSING} | {_MISSING} | {_MISSING} |")
                continue
            gi = int(gi)
            g = members[gi]
            if given is not None and t < len(given):
                score = _fmt(given[t], _number_format(_as_float_array(list(given))))
            elif affinity is not None and affinity.shape == (k, k) and t in g:
                s = group_member_scores(affinity, g)[t]
                score = "alone" if len(g) == 1 else _fmt(s, _number_format(affinity))
            else:
                score = _MISSING
            table.append(f"| {_cell(label(t))} | {gi} | {', '.join(_cell(label(m)) for m in g)} | {score} |")
        lines += table + [""]
        lines += ["A task's score is TAG's: the mean affinity Z[b, task] onto it from the other "
                  "members b of its serving group.", ""]
    return lines


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------

def plot_bootstrap(bootstrap: Mapping[str, Any], names: Sequence[str], path: str | Path) -> None:
    """For each task, how often a bootstrap over the tracked steps keeps its partners; the line
    is how often the whole grouping is selected again."""
    partners = np.asarray(bootstrap["partners"], dtype=np.float64)
    fig = _figure((max(6.0, 0.55 * len(names) + 2.0), 3.6))
    ax = fig.subplots()
    ax.bar(np.arange(len(names)), partners, color=matplotlib.colormaps["tab10"](0))
    ax.axhline(bootstrap["selected"], color="black", linestyle="--", linewidth=1,
               label=f"whole grouping reselected: {bootstrap['selected']:.0%}")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of resamples")
    ax.set_title(f"Same partners under {bootstrap['n_resamples']} bootstrap resamples of {bootstrap['n_steps']} steps",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper right", frameon=False)
    _save(fig, path)


def _bootstrap_section(bootstrap: Mapping[str, Any], names: list[str], out: Path) -> list[str]:
    plot_bootstrap(bootstrap, names, out / "bootstrap.png")
    groupings = "; ".join(f"{count / bootstrap['n_resamples']:.0%} " + " ".join(
        "{" + ", ".join(names[t] for t in g) + "}" for g in groups) for groups, count in bootstrap["groupings"][:3])
    return ["### How stable is the grouping?", "",
            f"Resampling the {bootstrap['n_steps']} tracked steps with replacement ({bootstrap['n_resamples']} times) "
            f"and selecting again chooses the same groups in {bootstrap['selected']:.0%} of the resamples. "
            f"Most frequent: {groupings}.", "",
            markdown_table([[p] for p in bootstrap["partners"]], names, ["same partners"], fmt="{:.0%}",
                           corner="task"), "", "![bootstrap stability](bootstrap.png)", ""]


def _signals_section(signals: Mapping[str, Any], names: list[str], out: Path) -> list[str]:
    lines = ["## Other relatedness signals", "",
             "Beside TAG's affinity: the first-order estimate lr <g_i, g_j> / L_j from the same steps' per-task "
             "gradients, and the covariance similarity (Wu, Zhang & Re, ICLR 2020) of the K views of the "
             "evaluation images, on the inputs and on the trained trunk's features (symmetric, in [0, 1]).", ""]
    for i, (name, matrix) in enumerate(signals.items()):
        m = _as_float_array(matrix, 2, name)
        png = f"signal_{i}.png"
        if name.startswith("covariance"):
            plot_accuracy_matrix(m, names, names, out / png, f"covariance similarity, {name[len('covariance '):]}")
        else:
            plot_affinity(m, names, out / png, title=f"{name} estimate of Z[i, j]")
        lines += [f"### {name}", "", markdown_table(m, names, names, fmt=_number_format(m), corner=""), "",
                  f"![{name}]({png})", ""]
    return lines


def _pm(mean: float, ci: float, fmt: str = "{:.3f}") -> str:
    """'mean ± half-width' (the half-width of a 95% interval), 'mean' alone when it is undefined."""
    if ci is None or not np.isfinite(ci):
        return _fmt(mean, fmt)
    return f"{_fmt(mean, fmt)} ± {_fmt(ci, fmt.replace('+', ''))}"


def plot_settings(protocol: Mapping[str, Any], path: str | Path) -> None:
    """Accuracy of each training setting per distribution (and the mean), with 95% interval bars."""
    columns = list(protocol["columns"])
    settings = list(protocol["accuracy"])
    fig = _figure((max(7.0, 0.9 * len(columns) + 2.5), 4.2))
    ax = fig.subplots()
    width = 0.8 / len(settings)
    x = np.arange(len(columns))
    cmap = matplotlib.colormaps["tab10"]
    for i, setting in enumerate(settings):
        mean = np.asarray(protocol["accuracy"][setting]["mean"], dtype=np.float64)
        ci = np.nan_to_num(np.asarray(protocol["accuracy"][setting]["ci"], dtype=np.float64))
        ax.bar(x + (i - (len(settings) - 1) / 2) * width, mean, width, yerr=ci, capsize=2, color=cmap(i),
               label=setting)
    ax.set_xticks(x, columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy on its own distribution")
    ax.set_title(f"Accuracy per training setting (mean and 95% interval over {len(protocol['seeds'])} seeds)",
                 fontsize=10)
    ax.legend(fontsize=8, ncol=len(settings), loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def _protocol_section(protocol: Mapping[str, Any], out: Path) -> list[str]:
    columns = list(protocol["columns"])
    seeds = list(protocol["seeds"])
    lines = ["## Grouping analysis", "",
             f"Every setting trained and evaluated with {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
             "each cell is the mean accuracy of a task on its own distribution and the half-width of its 95% "
             "t-interval over seeds. A grouping scores each task with the model of the group that serves it.", ""]
    rows = list(protocol["accuracy"])
    cells = [[_pm(m, c) for m, c in zip(protocol["accuracy"][r]["mean"], protocol["accuracy"][r]["ci"])]
             for r in rows]
    plot_settings(protocol, out / "settings.png")
    lines += [markdown_table(cells, rows, columns, corner="setting"), "", "![accuracy per setting](settings.png)",
              "", "Paired by seed (positive: the TAG groups are better):", ""]
    diffs = list(protocol["differences"])
    cells = [[_pm(m, c, "{:+.3f}") for m, c in zip(protocol["differences"][d]["mean"],
                                                    protocol["differences"][d]["ci"])] for d in diffs]
    lines += [markdown_table(cells, diffs, columns, corner="difference"), ""]
    for name, verdict in (("all together", "TAG groups - all together"), ("each alone", "TAG groups - each alone")):
        mean, ci = protocol["differences"][verdict]["mean"][-1], protocol["differences"][verdict]["ci"][-1]
        if np.isfinite(ci):
            word = "beat" if mean - ci > 0 else "lose to" if mean + ci < 0 else "are not distinguishable from"
            lines.append(f"- On average the TAG groups {word} training {name} ({_pm(mean, ci, '{:+.3f}')}).")
    lines += ["", "Does a relatedness signal predict which pairs help each other? Spearman correlation, over the "
              "pairs (a, b), between signal[a, b] + signal[b, a] and the measured pair effect (accuracy of a "
              "trained with b minus a alone, plus the same for b); mean and 95% interval over seeds:", ""]
    agreement = protocol["rank_agreement"]
    cells = [[_pm(v["mean"], v["ci"]), ", ".join(_fmt(r, "{:+.2f}") for r in v["per_seed"])]
             for v in agreement.values()]
    lines += [markdown_table(cells, list(agreement), ["rank correlation", "per seed"], corner="signal"), ""]
    groups = protocol["groups"]
    lines += ["Groups chosen per seed: " + "; ".join(
        f"seed {seed}: TAG {g['TAG']}, HOA {g['HOA']}" for seed, g in groups.items()), ""]
    return lines


# Below this many evaluated images, one image moves an accuracy by more than 1%.
_SMALL_TEST_SET = 100


def _data_section(data: Mapping[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = ["## Data", "",
             f"- {data['dataset']}: {data['classes']} classes, {data['train']} training and {data['test']} test "
             f"images of shape {tuple(data['image'])} (C, H, W); {data['preprocessing']}.",
             f"- accuracies below are over {data['evaluated']} test images."]
    if int(data["evaluated"]) < _SMALL_TEST_SET:
        lines.append(f"- **warning**: {data['evaluated']} test images is a small test set: one image is "
                     f"{100 / max(int(data['evaluated']), 1):.1f}% of accuracy; differences below that are noise.")
    return lines + [""]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _flatten(value, name + ".")
        else:
            out.append((name, value))
    return out


def _config_value(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value, "{:.6g}")
    if isinstance(value, (list, tuple)):
        return _cell(", ".join(_config_value(v) for v in value)) if value else "[]"
    if isinstance(value, Mapping):
        return "{}"
    if value is None:
        return "None"
    return _cell(value)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{seconds:.1f} s ({h}:{m:02d}:{s:02d})"


def _accuracy_dicts(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    out = []
    if results.get("accuracy") is not None:
        out.append(results["accuracy"])
    out += [a for a in (results.get("accuracy_matrices") or []) if a is not None]
    return out


def write_report(out_dir: str | Path, results: Mapping[str, Any]) -> Path:
    """Write ``out_dir/report.md`` and its PNG figures from a run's ``results``; returns the
    report's path.

    ``results`` (only ``names`` is required; a section whose field is missing is left out):

    * ``names``: the K task names.
    * ``config``: dict, shown as a key/value table (nested dicts flattened to ``a.b`` keys).
    * ``affinity``: (K, K) Z[i, j], source i onto target j; ``affinity_steps``: steps averaged.
    * ``groups``: ``{"groups": [[task, ...], ...], "serving": [group index per task],
      "score": float, "method": str}``; optional ``"task_scores"`` (per task), else computed from
      ``affinity`` by TAG's rule.
    * ``accuracy``: ``{"rows", "cols", "matrix" (R, E), "title"}``; more in ``accuracy_matrices``
      (a list of such dicts). Figures: ``accuracy.png``, then ``accuracy_1.png``, ...
    * ``protocol``: the grouping analysis over seeds (`mtdl_fast.app.protocol.summarise`): accuracy
      per setting with 95% intervals, paired differences, rank agreement of each relatedness signal.
    * ``metrics``: the JSONL metric rows (``step``, ``loss``, ``losses``, ``images_per_s``).
    * ``throughput``: ``{"images_per_s", "device"}``; ``timing``: ``{"seconds"}``.
    * also shown when present: ``pair_error`` (K, K) (error of task a trained with b; a table),
      ``hoa_groups`` (``{"groups": [...]}``), ``skipped_steps`` (int), ``title`` (the heading).

    An ``affinity`` with ``affinity_steps == 0`` (not tracked) or of a shape other than (K, K) is
    reported as not shown rather than drawn. Other keys are ignored.
    """
    if "names" not in results:
        raise ValueError("results must contain 'names' (the task names)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(s) for s in results["names"]]
    k = len(names)
    title = results.get("title") or "mtdl-fast run report"
    lines: list[str] = [f"# {title}", ""]
    lines += [f"{k} distribution task{'s' if k != 1 else ''}: " + ", ".join(f"`{n}`" for n in names), ""]

    # -- configuration
    config = results.get("config")
    if config:
        items = _flatten(config)
        lines += ["## Configuration", "", "| key | value |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_config_value(value)} |" for key, value in items]
        lines.append("")

    # -- data
    lines += _data_section(results.get("data"))

    # -- throughput and timing
    tp = results.get("throughput")
    timing = results.get("timing")
    metric_rates = [float(m["images_per_s"]) for m in (results.get("metrics") or [])
                    if m.get("images_per_s") is not None and np.isfinite(float(m["images_per_s"]))]
    skipped = results.get("skipped_steps")
    if tp or timing or metric_rates or skipped is not None:
        lines += ["## Throughput", ""]
        if tp and tp.get("images_per_s") is not None:
            dev = f" on {tp['device']}" if tp.get("device") else ""
            over = (f" ({int(tp['images'])} images in {_duration(float(tp['seconds']))} of training, wall clock)"
                    if tp.get("images") is not None and tp.get("seconds") is not None else "")
            lines.append(f"- training: {_fmt(tp['images_per_s'], '{:,.1f}')} images/s{dev}{over}")
        elif tp and tp.get("device"):
            lines.append(f"- device: {tp['device']}")
        if metric_rates:
            lines.append(f"- per step (the engine's step alone, median over {len(metric_rates)} steps): "
                         f"{float(np.median(metric_rates)):,.1f} images/s")
        if timing and timing.get("seconds") is not None:
            lines.append(f"- wall time: {_duration(float(timing['seconds']))}")
        if skipped is not None:
            lines.append(f"- steps skipped for a non-finite loss: {int(skipped)}")
        lines.append("")

    # -- accuracy
    accs = _accuracy_dicts(results)
    if accs:
        lines += ["## Accuracy", ""]
        for i, acc in enumerate(accs):
            matrix = _as_float_array(acc["matrix"], 2, "accuracy matrix")
            rows = [str(s) for s in acc.get("rows") or names[: matrix.shape[0]]]
            cols = [str(s) for s in acc.get("cols") or names[: matrix.shape[1]]]
            acc_title = str(acc.get("title") or ("accuracy" if i == 0 else f"accuracy {i}"))
            png = "accuracy.png" if i == 0 else f"accuracy_{i}.png"
            plot_accuracy_matrix(matrix, rows, cols, out / png, acc_title)
            lines += [f"### {acc_title}", "",
                      "Rows: the model (or head) and what it was trained on; columns: the distribution evaluated.", "",
                      markdown_table(matrix, rows, cols, fmt="{:.3f}", corner="train ↓ / eval →"), "",
                      f"![{acc_title}]({png})", ""]

    # -- affinity
    affinity = None
    steps = results.get("affinity_steps")
    if results.get("affinity") is None and "affinity" in results:
        why = "a single task has no other task to affect" if k == 1 else "affinity tracking was off"
        lines += ["## Inter-task affinity (TAG)", "", f"No affinity measured in this run ({why}).", ""]
    if results.get("affinity") is not None:
        lines += ["## Inter-task affinity (TAG)", ""]
        z = _as_float_array(results["affinity"], 2, "affinity")
        if steps is not None and int(steps) == 0:
            lines += ["Affinity was not measured in this run (0 affinity steps).", ""]
        elif z.shape != (k, k):
            lines += [f"Affinity not shown: its shape {z.shape} does not match the {k} task names.", ""]
        else:
            affinity = z
            stderr = results.get("stderr")
            plot_affinity(affinity, names, out / "affinity.png", stderr=stderr)
            what = (f"Definition: {results['definition']}. " if results.get("definition") else "") + (
                "Z[i, j]: effect of source task i's update (row) on target task j's loss (column); > 0 helps.")
            if steps is not None:
                what += f" Mean over {int(steps)} affinity step{'s' if int(steps) != 1 else ''}."
            lines += [what, ""]
            if stderr is not None:
                se = _as_float_array(stderr, 2, "stderr")
                noise = np.abs(affinity) < 2 * se
                lines += [f"Each entry with its standard error over the steps; {int(noise.sum())} of {k * k} "
                          "entries lie within 2 standard errors of zero (hatched in the figure): their sign is "
                          "not established by this run.", "",
                          markdown_table([[f"{_fmt(v, _number_format(affinity))} ± {_fmt(e, '{:.1e}')}"
                                           for v, e in zip(row, erow)] for row, erow in zip(affinity, se)],
                                         names, names, corner="source ↓ / target →"), ""]
            else:
                lines += [markdown_table(affinity, names, names, fmt=_number_format(affinity),
                                         corner="source ↓ / target →"), ""]
            lines += ["![TAG affinity](affinity.png)", ""]

    # -- pairwise errors (the HOA input), when the run trained every pair
    if results.get("pair_error") is not None:
        pe = _as_float_array(results["pair_error"], 2, "pair_error")
        if pe.shape == (k, k):
            lines += ["## Pairwise errors (HOA)", "",
                      "Error of task a (row) when trained together with task b (column); the diagonal "
                      "is task a trained alone.", "",
                      markdown_table(pe, names, names, fmt="{:.3f}", corner="task ↓ / with →"), ""]

    # -- groups
    if results.get("groups"):
        lines += _groups_section(results["groups"], names, affinity)
    if results.get("bootstrap"):
        lines += _bootstrap_section(results["bootstrap"], names, out)
    if results.get("signals"):
        lines += _signals_section(results["signals"], names, out)
    hoa = (results.get("hoa_groups") or {}).get("groups")
    if hoa:
        if not results.get("groups"):
            lines += ["## Task groups", ""]
        lines += ["HOA groups (from the pairwise errors): " + "; ".join(
            "{" + ", ".join(_cell(names[t]) if 0 <= int(t) < k else f"task {t}" for t in g) + "}"
            for g in hoa), ""]

    # -- the grouping analysis (--protocol paper)
    if results.get("protocol"):
        lines += _protocol_section(results["protocol"], out)

    # -- curves
    metrics = results.get("metrics")
    if metrics:
        plot_curves(metrics, out / "curves.png", names=names)
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]

    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return path
