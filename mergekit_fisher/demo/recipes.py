"""The demo's mergekit recipes: a plain average and TIES next to their Fisher-weighted twins, and
RegMean.

Every path is absolute (mergekit's model card would otherwise ask the Hub about relative ones), and
each pair shares its settings (weights, density), so the only difference is the Fisher weighting.
`regmean` averages the specialists like `linear` and `fisher` (no base), each with its Gram file.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

MERGE_METHODS = (
    "linear",
    "ties",
    "dare_ties",
    "fisher",
    "fisher_ties",
    "fisher_dare_ties",
    "regmean",
)
# which plain method each Fisher method is compared with in the report (same settings, same seed)
FISHER_TWIN = {"fisher": "linear", "fisher_ties": "ties", "fisher_dare_ties": "dare_ties"}


def recipe_for(
    method: str,
    *,
    base: str,
    specialists: Dict[str, str],
    fishers: Dict[str, str],
    density: float,
    fisher_normalize: str = "mean",
    fisher_floor: float = 1e-6,
    grams: Optional[Dict[str, str]] = None,
) -> dict:
    """A mergekit recipe (as a dict ready for YAML) merging `specialists` (domain -> model dir)
    with `method`.

    linear / fisher average the specialists themselves (the paper's setting, no base); the TIES
    family merges their deltas from `base`, each specialist with weight 1 and `density`.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown demo merge method {method!r}")
    base = os.path.abspath(base)
    uses_fisher = method.startswith("fisher")
    uses_base = method not in ("linear", "fisher", "regmean")
    models: List[dict] = []
    for domain, path in specialists.items():
        parameters: dict = {"weight": 1.0}
        if uses_base:
            parameters["density"] = density
        if uses_fisher:
            parameters["fisher"] = os.path.abspath(fishers[domain])
        if method == "regmean":
            parameters["gram"] = os.path.abspath(grams[domain])
        models.append({"model": os.path.abspath(path), "parameters": parameters})
    if uses_base:
        models.insert(0, {"model": base})
    recipe: dict = {"merge_method": method, "models": models, "dtype": "float32"}
    if uses_base:
        recipe["base_model"] = base
    if uses_fisher:
        # plain values for YAML (an enum member would not dump)
        recipe["parameters"] = {
            "fisher_normalize": getattr(fisher_normalize, "value", str(fisher_normalize)),
            "fisher_floor": float(fisher_floor),
        }
    return recipe
