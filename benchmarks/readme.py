"""The README's performance tables, pasted out of the results files.

    python -m benchmarks.readme            # rewrite README.md between <!-- perf:begin --> and <!-- perf:end -->
    python -m benchmarks.readme --check    # exit 1 when that block is not what the results files give

A section per results file (sorted by name), a table per pytest-benchmark group, a row per record
(common.py has the fields): ms/call (median), images/s, GB/s, GFLOP/s, ``x floor`` and ``x ref`` (over
the case's floor or reference row), the record's columns, the target (met or NOT met) and the note.
"""
from __future__ import annotations

import argparse
import json
import operator
import re
import sys
from pathlib import Path

from mtdl_fast.app.reports import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
TARGET = re.compile(r"(<=|>=|<|>) ([0-9.]+) ?(?:x (.+)|(s|ms))$")
COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def num(value: float | None) -> str:
    """Three significant digits, thousands separated; '-' for nothing."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _ratio(row: dict, other: dict | None) -> float | None:
    return row["stats"]["median"] / other["stats"]["median"] if other else None


def _floor_ratio(row: dict, floor: dict | None) -> float | None:
    own = row["extra_info"].get("floor_s")
    return row["stats"]["median"] / own if own else _ratio(row, floor)


def judge(target: str, row: dict, case: list[dict], floor: dict | None, reference: dict | None) -> str:
    """'met' or 'NOT met' for ``target`` on ``row`` ('>= 5x ref', '<= 3x floor', '< 2 s', '<= 1.3x plain step')."""
    match = TARGET.match(target)
    if match is None:
        raise ValueError(f"target {target!r} of {row['name']!r} is not '<op> <number>x <ref|floor|contender>' "
                         f"or '<op> <number> <s|ms>'")
    op, bound, against, unit = match.groups()
    if unit:
        value = row["stats"]["median"] * (1e3 if unit == "ms" else 1.0)
    elif against == "floor":
        value = _floor_ratio(row, floor)
    else:
        other = reference if against == "ref" else next((r for r in case if r["extra_info"]["contender"] == against),
                                                         None)
        value = _ratio(row, other)
    if value is None:
        return f"{target}: not measured"
    return f"{target}: {'met' if COMPARE[op](value, float(bound)) else '**NOT met**'}"


def table(rows: list[dict]) -> str:
    """One pytest-benchmark group as a markdown table (see the module's docstring for the columns)."""
    cases: dict[str, list[dict]] = {}
    for r in rows:
        cases.setdefault(r["extra_info"]["case"], []).append(r)
    extra = list(dict.fromkeys(k for r in rows for k in r["extra_info"].get("columns", {})))
    has = {key: any(key in r["extra_info"] for r in rows) for key in ("items", "bytes", "flops", "target", "note")}
    has["floor"] = any(r["extra_info"].get("floor_s") or r["extra_info"].get("role") == "floor" for r in rows)
    has["ref"] = any(r["extra_info"].get("role") == "reference" for r in rows)
    header = ["contender", "ms/call"] + [name for key, name in (
        ("items", "images/s"), ("bytes", "GB/s"), ("flops", "GFLOP/s"), ("floor", "x floor"), ("ref", "x ref"))
        if has[key]] + extra + [key for key in ("target", "note") if has[key]]
    body, names = [], []
    for case, members in cases.items():
        floor = next((r for r in members if r["extra_info"].get("role") == "floor"), None)
        reference = next((r for r in members if r["extra_info"].get("role") == "reference"), None)
        for i, r in enumerate(members):
            info, t = r["extra_info"], r["stats"]["median"]
            cells = [info["contender"], num(t * 1e3)]
            cells += [num(info[k] / t / scale) if k in info else "-" for k, scale in
                      (("items", 1), ("bytes", 1e9), ("flops", 1e9)) if has[k]]
            cells += [f"{num(v)}x" if v is not None else "-" for key, v in (
                ("floor", _floor_ratio(r, floor)), ("ref", _ratio(r, reference))) if has[key]]
            cells += [num(info.get("columns", {}).get(k)) for k in extra]
            if has["target"]:
                cells.append(judge(info["target"], r, members, floor, reference) if info.get("target") else "")
            if has["note"]:
                cells.append(info.get("note", ""))
            body.append(cells)
            names.append(case if i == 0 else "")
    align = "".join("l" if h in ("contender", "target", "note") else "r" for h in header)
    return markdown_table(body, names, header, corner="case", align=align)


def conditions(rows: list[dict]) -> str:
    """When and how a group was measured: dates, threads, load average, commands."""
    info = [r["extra_info"] for r in rows]
    dates = sorted({i["date"] for i in info if "date" in i})
    loads = [v for i in info for v in i.get("load_average", []) if v is not None]
    parts = [" to ".join(dict.fromkeys(dates[:1] + dates[-1:])),
             "threads " + "/".join(str(t) for t in sorted({i["threads"] for i in info if "threads" in i})),
             f"load average {num(min(loads))} to {num(max(loads))}" if loads else "",
             "; ".join(f"`{c}`" for c in dict.fromkeys(i["command"] for i in info if "command" in i))]
    return ", ".join(p for p in parts if p and p != "threads ")


def section(path: Path) -> str:
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {})
    versions = ", ".join(f"{k} {machine[k]}" for k in ("torch", "torchvision", "triton", "kornia") if machine.get(k))
    shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path.name
    lines = [f"### {machine.get('device', path.stem)} (`{Path(shown).as_posix()}`)", "", versions, ""]
    groups: dict[str, list[dict]] = {}
    for r in data["benchmarks"]:
        groups.setdefault(r["group"], []).append(r)
    for name, rows in groups.items():
        lines += [f"**{name}** ({conditions(rows)})", "", table(rows), ""]
    sweeps = path.with_name(path.stem + "-sweeps")
    for plot in sorted(sweeps.glob("*.png")) if sweeps.is_dir() else []:
        rel = plot.relative_to(ROOT).as_posix()
        lines += [f"![{plot.stem}]({rel}) ([CSV]({Path(rel).with_suffix('.csv').as_posix()}))", ""]
    return "\n".join(lines)


def render(results: Path = RESULTS) -> str:
    """The text between the markers: every results file's section."""
    files = sorted(results.glob("*.json"))
    gpu = [f for f in files if not f.stem.endswith("-cpu")]
    head = ["<!-- generated by `python -m benchmarks.readme` from benchmarks/results/*.json: edit those, not this -->",
            ""]
    if not gpu:
        head += ["No GPU results file yet: every number below is from a CPU (`make gpu-check` on a CUDA machine "
                 "adds one).", ""]
    return "\n".join(head + [section(f) for f in files]).rstrip() + "\n"


def update(readme: Path, results: Path = RESULTS, check: bool = False) -> bool:
    """Rewrite (or with ``check`` only compare) the block; True when the README was (or would be) changed."""
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"{readme} must hold {BEGIN} and {END} once each")
    head, rest = text.split(BEGIN)
    new = f"{head}{BEGIN}\n{render(results)}{END}{rest.split(END)[1]}"
    if new != text and not check:
        readme.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README.md is stale; change nothing")
    check, readme = p.parse_args(argv).check, ROOT / "README.md"
    stale = update(readme, check=check)
    if check and stale:
        print(f"{readme} is stale: run `python -m benchmarks.readme`", file=sys.stderr)
        return 1
    print(f"{readme}: {'updated' if stale else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
