"""What `explain --plot` draws, as data: a grid of tensor groups (rows) by module type (columns).

Rows follow the checkpoint: the groups outside the repeated blocks that come before them
(``embed_tokens``), one row per block (layer 0, 1, ...), then those after (``norm``, ``lm_head``).
A group outside the blocks is one tensor group, so its row holds a single value drawn across every
column (``spanning``). Columns are the module types inside the blocks (attention projections, MLP,
norms), named by their shortest unique suffix. Pure data, no matplotlib: tests check this, and
`plotting.plot_share_map` only draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np


@dataclass
class ShareMap:
    models: List[str]
    rows: List[str]  # "embed_tokens", "layer 0", ..., "norm", "lm_head"
    modules: List[str]  # the module types inside the blocks, one per column
    columns: List[str]  # their short display labels
    spanning: List[bool]  # per row: one tensor group outside the blocks, drawn across
    shares: np.ndarray  # [model, row, column]; NaN where the group does not exist
    floor: np.ndarray  # [row, column]: fraction of elements where the floor decides
    base_kept: Optional[np.ndarray]  # [row, column], TIES/DARE family only
    share_of: str  # "fisher_mass" or "kept_fisher_mass" (explain's report)
    method: str

    @property
    def centre(self) -> float:
        """The equal share, where the diverging colour scale is white."""
        return 1.0 / len(self.models)

    @property
    def spread(self) -> float:
        """Half-width of the colour scale around `centre`: the largest deviation (at least 0.01),
        so that 0.48 vs 0.52 -- the common case -- is visible, not lost in a 0..1 scale."""
        finite = self.shares[np.isfinite(self.shares)]
        deviation = float(np.abs(finite - self.centre).max()) if finite.size else 0.0
        return max(deviation, 0.01)


# display abbreviations for column labels (used only where the result stays unique)
ABBREVIATIONS = (("attention", "attn"), ("layernorm", "norm"), ("_proj", ""))


def _abbreviated(labels: List[str]) -> List[str]:
    short = list(labels)
    for long, replacement in ABBREVIATIONS:
        candidate = [label.replace(long, replacement) or label for label in short]
        if len(set(candidate)) == len(set(short)):
            short = candidate
    return short


def short_labels(modules: List[str]) -> List[str]:
    """The shortest dotted suffix of each module type that is still unique, abbreviated where
    that stays unique: ``self_attn.q_proj`` -> ``q``, ``post_attention_layernorm`` ->
    ``post_attn_norm``; ``mlp.experts.*.w1`` and ``shared.w1`` keep a prefix."""
    depth = {module: 1 for module in modules}
    while True:
        labels = {m: ".".join(m.split(".")[-depth[m] :]) for m in modules}
        clashing = [
            m
            for m in modules
            if list(labels.values()).count(labels[m]) > 1 or labels[m].startswith("*")
        ]
        grown = [m for m in clashing if depth[m] < len(m.split("."))]
        if not grown:
            return _abbreviated([labels[m] for m in modules])
        for module in grown:
            depth[module] += 1


def share_map(report: dict) -> ShareMap:
    """The grid of `explain`'s report (`build_explanation`), in the report's (plan) order."""
    groups = report["groups"]
    models = list(report["models"])
    first_layer = next((i for i, g in enumerate(groups) if g["layer"] is not None), len(groups))
    before = [g["module"] for g in groups[:first_layer] if g["layer"] is None]
    after = [g["module"] for g in groups[first_layer:] if g["layer"] is None]
    layers = sorted({g["layer"] for g in groups if g["layer"] is not None})
    modules = list(dict.fromkeys(g["module"] for g in groups if g["layer"] is not None))
    rows = before + [f"layer {layer}" for layer in layers] + after
    spanning = [True] * len(before) + [False] * len(layers) + [True] * len(after)
    columns = max(len(modules), 1)
    shares = np.full((len(models), len(rows), columns), np.nan)
    floor = np.full((len(rows), columns), np.nan)
    kept = report["share_of"] == "kept_fisher_mass"
    base_kept = np.full((len(rows), columns), np.nan) if kept else None
    for group in groups:
        if group["layer"] is None:
            index = rows.index(group["module"])
            cols = slice(None)
        else:
            index = rows.index(f"layer {group['layer']}")
            cols = modules.index(group["module"])
        for m, model in enumerate(models):
            shares[m, index, cols] = group["shares"][model]
        floor[index, cols] = group["floor_fraction"]
        if base_kept is not None and group.get("none_kept_fraction") is not None:
            base_kept[index, cols] = group["none_kept_fraction"]
    return ShareMap(
        models=models,
        rows=rows,
        modules=modules or [""],
        columns=short_labels(modules) if modules else [""],
        spanning=spanning,
        shares=shares,
        floor=floor,
        base_kept=base_kept,
        share_of=report["share_of"],
        method=report["merge_method"],
    )
