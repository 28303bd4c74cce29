"""Heatmaps of each model's Fisher share per layer (matplotlib, an optional extra).

matplotlib is imported only when a plot is asked for, with the Agg backend (no display needed);
without it, a FisherInputError says to ``pip install 'mergekit-fisher[plot]'``.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple

from mergekit_fisher.errors import FisherInputError

# inches per heatmap panel (width, height) and resolution: the PNG is exactly
# (panel_width * panels) x panel_height inches at `dpi` -- no tight bounding box, so callers and
# tests know the size in advance
PANEL_SIZE = (3.2, 4.0)
DPI = 100


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


def _layer_label(layer) -> str:
    return "-" if layer is None else str(layer)


def figure_pixels(
    num_panels: int, panel_size: Tuple[float, float] = PANEL_SIZE, dpi: int = DPI
) -> Tuple[int, int]:
    """(width, height) in pixels of the PNG `plot_share_heatmap` writes for `num_panels` module
    types."""
    return round(panel_size[0] * num_panels * dpi), round(panel_size[1] * dpi)


def plot_share_heatmap(
    shares: Mapping[str, Mapping[Optional[int], Sequence[float]]],
    models: Sequence[str],
    out_png: str,
    *,
    title: Optional[str] = None,
    panel_size: Tuple[float, float] = PANEL_SIZE,
    dpi: int = DPI,
) -> str:
    """Write a PNG heatmap of Fisher shares and return its absolute path.

    `shares` is ``{module_type: {layer: [share of model 0, share of model 1, ...]}}``, shares in
    0..1, layer an int or None (tensors outside the repeated blocks, drawn as ``-`` on top).
    One panel per module type (in the mapping's order); rows are layers, columns are `models`
    (labelled with their basenames); one shared colour scale 0..1 with a colour bar.
    The figure is `figure_pixels(len(shares), panel_size, dpi)` pixels.
    """
    if not shares:
        raise FisherInputError(
            "nothing to plot: no Fisher shares were computed", fix="check the recipe's models"
        )
    for module, by_layer in shares.items():
        for layer, row in by_layer.items():
            if len(row) != len(models):
                raise ValueError(
                    f"{module} layer {layer}: {len(row)} shares for {len(models)} models"
                )
    plt = require_matplotlib()
    import numpy as np

    labels = [os.path.basename(str(m).rstrip("/")) or str(m) for m in models]
    fig, axes = plt.subplots(
        1,
        len(shares),
        figsize=(panel_size[0] * len(shares), panel_size[1]),
        dpi=dpi,
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, (module, by_layer) in zip(axes[0], shares.items()):
        layers = sorted(
            by_layer, key=lambda layer: (layer is not None, layer if layer is not None else -1)
        )
        grid = np.array([list(by_layer[layer]) for layer in layers], dtype=float)
        image = ax.imshow(
            grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest"
        )
        if grid.size <= 60:  # small grids: print the shares, colours alone are hard to read exactly
            for (row, col), value in np.ndenumerate(grid):
                ax.text(
                    col,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if value > 0.6 else "white",
                )
        ax.set_title(module, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), [_layer_label(layer) for layer in layers], fontsize=7)
        ax.set_xlabel("model", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    colorbar = fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    colorbar.set_label("share of Fisher mass", fontsize=8)
    fig.suptitle(title or "Fisher share per layer and module type", fontsize=10)
    out_png = os.path.abspath(out_png)
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    try:
        fig.savefig(out_png, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return out_png
