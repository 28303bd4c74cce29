"""Plain-text tables and human-readable numbers, shared by inspect and explain.

`format_table(headers, rows)` aligns columns (numbers right, text left); the number formatters
turn floats, counts and fractions into short strings and never raise on NaN, Inf or None.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

_COUNT_UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def human_count(n: Optional[float]) -> str:
    """Element / example counts: ``532``, ``12.3k``, ``7.24G``; ``-`` for None."""
    if n is None:
        return "-"
    for scale, unit in _COUNT_UNITS:
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{int(n)}" if float(n).is_integer() else f"{n:.3g}"


def human_float(x: Optional[float], digits: int = 4) -> str:
    """Fisher values span many decades: 4 significant digits, scientific when small or large."""
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def percent(fraction: Optional[float], digits: int = 1) -> str:
    """``0.4213`` -> ``42.1%``; ``-`` for None/NaN."""
    if fraction is None or math.isnan(fraction):
        return "-"
    return f"{100.0 * fraction:.{digits}f}%"


def _looks_numeric(cell: str) -> bool:
    text = cell.strip().rstrip("%kMGT")
    if text in ("-", "nan", "inf", "-inf"):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], align: Optional[str] = None
) -> str:
    """Rows of cells (already formatted, or anything `str()` can show) as an aligned text table.

    `align` is one character per column, ``l`` or ``r``; by default a column is right-aligned when
    every non-empty cell in it looks like a number (``12.5``, ``3.1k``, ``42.0%``, ``-``).
    A dashed rule separates the header from the body. Returns the table without a trailing newline.
    """
    cells = [[str(c) for c in row] for row in rows]
    ncols = len(headers)
    for row in cells:
        if len(row) != ncols:
            raise ValueError(f"row has {len(row)} cells, table has {ncols} columns: {row}")
    if align is None:
        align = "".join(
            "r" if cells and all(_looks_numeric(row[i]) for row in cells if row[i]) else "l"
            for i in range(ncols)
        )
    widths = [max([len(headers[i])] + [len(row[i]) for row in cells]) for i in range(ncols)]

    def line(values):
        out = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)]
        return "  ".join(out).rstrip()

    lines = [line(list(headers)), "  ".join("-" * w for w in widths)]
    lines.extend(line(row) for row in cells)
    return "\n".join(lines)
