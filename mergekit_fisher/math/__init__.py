"""The math room: Fisher merging as small pure tensor functions (no I/O, no graph, no config)."""

from mergekit_fisher.math.fisher_merge import (
    NORMALIZATIONS,
    fisher_task_arithmetic,
    fisher_weighted_average,
    normalize_fisher,
    fisher_element_weights,
)

__all__ = [
    "NORMALIZATIONS",
    "fisher_task_arithmetic",
    "fisher_weighted_average",
    "normalize_fisher",
    "fisher_element_weights",
]
