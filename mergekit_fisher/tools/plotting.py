"""`explain --plot`: the share map (matplotlib, an optional extra).

One panel per model (its share of each tensor group), then one for where the floor decides (and,
for the TIES/DARE family, one for where no delta survives). Rows are the tensor groups in the
checkpoint's order -- embeddings, one row per layer, final norm, head -- so the layer axis is the
long one and grows downwards; columns are the module types inside the blocks. Cells have a fixed
size, so the number printed in each always fits, from 2 layers to 80+. Shares use a diverging
scale (`RdBu_r`) centred on the equal share 1/N, spanning the largest deviation, so 0.48 vs 0.52 is
visible.

matplotlib is imported only when a plot is asked for, with the Agg backend (no display needed);
without it, a FisherInputError says to ``pip install 'mergekit-fisher[plot]'``.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.tools.share_map import ShareMap

CELL = (0.5, 0.2)  # inches per cell (width, height): a 6 pt ".503" fits with room to spare
LEFT, RIGHT, BOTTOM, GAP = 1.2, 0.2, 0.9, 0.3  # margins and panel gap, inches
TITLES = 0.85  # inches above the column labels: the figure's title and the panels' two-line titles
DPI = 100
FONT = 6.0


def require_matplotlib():
    """`matplotlib.pyplot` on the Agg backend, or a FisherInputError with the install command."""
    try:
        import matplotlib
    except ImportError:
        raise FisherInputError(
            "plotting needs matplotlib, which is not installed",
            fix="pip install 'mergekit-fisher[plot]' (or drop --plot)",
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def share_text(value: float) -> str:
    """Three decimals without the leading zero (".503"): four characters fit every cell."""
    return "1.00" if value >= 0.9995 else f"{value:.3f}"[1:]


def percent_text(value: float) -> str:
    return f"{100 * value:.0f}%" if value >= 0.01 or value == 0 else "<1%"


def panels(data: ShareMap) -> List[Tuple[str, object, str]]:
    """(title, grid [row, column], kind) per panel: each model's share, then the floor (and the
    base-kept fraction)."""
    noun = "kept Fisher mass" if data.share_of == "kept_fisher_mass" else "Fisher mass"
    out = [
        (f"{model}\nshare of {noun}", data.shares[m], "share")
        for m, model in enumerate(data.models)
    ]
    out.append(("floor decides\n(fraction of elements)", data.floor, "fraction"))
    if data.base_kept is not None:
        out.append(("no delta kept\n(the base decides)", data.base_kept, "fraction"))
    return out


def label_inches(data: ShareMap) -> float:
    """Height of the rotated column labels (a character is about 0.6 em wide)."""
    longest = max((len(label) for label in data.columns), default=1)
    return 0.1 + longest * (FONT + 1) * 0.6 / 72


def figure_inches(data: ShareMap) -> Tuple[float, float]:
    """(width, height) in inches of the share map of `data`."""
    count = len(panels(data))
    width = LEFT + RIGHT + count * len(data.columns) * CELL[0] + (count - 1) * GAP
    return width, TITLES + label_inches(data) + BOTTOM + len(data.rows) * CELL[1]


def _ink(rgba) -> str:
    """Black on light cells, white on dark ones (relative luminance)."""
    red, green, blue = rgba[:3]
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.5 else "white"


def _draw_panel(ax, data: ShareMap, grid, colour, text) -> Dict[Tuple[str, str], str]:
    from matplotlib.patches import Rectangle

    printed = {}
    ncols = len(data.columns)
    for row, label in enumerate(data.rows):
        spans = [(0, ncols)] if data.spanning[row] else [(c, 1) for c in range(ncols)]
        for col, width in spans:
            value = grid[row, col]
            if value != value:  # NaN: this module type has no such group here
                ax.add_patch(Rectangle((col, row), width, 1, color="0.93", lw=0))
                continue
            face = colour(value)
            ax.add_patch(Rectangle((col, row), width, 1, facecolor=face, edgecolor="white", lw=0.5))
            shown = text(value)
            ax.text(
                col + width / 2,
                row + 0.5,
                shown,
                ha="center",
                va="center",
                fontsize=FONT,
                color=_ink(face),
            )
            printed[(label, "*" if data.spanning[row] else data.columns[col])] = shown
    ax.set_xlim(0, ncols)
    ax.set_ylim(len(data.rows), 0)
    ax.set_xticks([c + 0.5 for c in range(ncols)], data.columns, rotation=90, fontsize=FONT + 1)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return printed


def plot_share_map(data: ShareMap, out_png: str, *, dpi: int = DPI) -> Tuple[str, dict]:
    """Draw `data` to a PNG of `figure_inches(data)` at `dpi`; return its absolute path and what
    was printed in each cell: ``{(panel title, row, column or "*"): text}``."""
    if not data.rows:
        raise FisherInputError(
            "nothing to plot: no Fisher shares were computed", fix="check the recipe's models"
        )
    plt = require_matplotlib()
    from matplotlib.colors import Normalize

    width, height = figure_inches(data)
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    centre, spread = data.centre, data.spread
    share_norm = Normalize(centre - spread, centre + spread)
    cmap = plt.get_cmap("RdBu_r")
    greys = plt.get_cmap("Purples")
    printed = {}
    x = LEFT
    panel_width = len(data.columns) * CELL[0]
    for index, (title, grid, kind) in enumerate(panels(data)):
        ax = fig.add_axes(
            (x / width, BOTTOM / height, panel_width / width, len(data.rows) * CELL[1] / height)
        )
        if kind == "share":
            colour, text = (lambda v: cmap(share_norm(v))), share_text
        else:
            colour, text = (lambda v: greys(0.15 + 0.85 * v)), percent_text
        printed.update(
            {
                (title, *key): value
                for key, value in _draw_panel(ax, data, grid, colour, text).items()
            }
        )
        fig.text(
            (x + panel_width / 2) / width,
            1 - (TITLES - 0.05) / height,
            title,
            ha="center",
            va="bottom",
            fontsize=FONT + 2,
        )
        ax.set_yticks(
            [r + 0.5 for r in range(len(data.rows))],
            data.rows if index == 0 else [""] * len(data.rows),
            fontsize=FONT + 1,
        )
        x += panel_width + GAP
    bar = fig.add_axes(
        (LEFT / width, 0.5 / height, min(3.0, width - LEFT - RIGHT) / width, 0.12 / height)
    )
    scale = plt.cm.ScalarMappable(norm=share_norm, cmap=cmap)
    colorbar = fig.colorbar(scale, cax=bar, orientation="horizontal")
    colorbar.ax.tick_params(labelsize=FONT)
    colorbar.set_label(f"share (white: the equal share {centre:.3g})", fontsize=FONT + 1)
    fig.suptitle(
        f"{data.method}: each model's share of every tensor group",
        fontsize=FONT + 4,
        y=1 - 0.08 / height,
        va="top",
    )
    out_png = os.path.abspath(out_png)
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    try:
        fig.savefig(out_png, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return out_png, printed
