"""Number formatting shared by the benchmark scripts and the README renderer (no torch import, so
`render_readme.py --check` stays quick)."""
from __future__ import annotations

import math


def fmt(value: float | None, digits: int = 3) -> str:
    """Compact number: 3 significant digits, thousands separators for big values, '-' for None."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"
