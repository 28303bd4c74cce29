"""The math room: Fisher merging as small pure tensor functions (no I/O, no graph, no config)."""

from mergekit_fisher.math.fisher_merge import (
    NORMALIZATIONS,
    Normalization,
    fisher_element_weights,
    fisher_task_arithmetic,
    fisher_weighted_average,
    normalize_fisher,
    working_dtype,
)

__all__ = [
    "NORMALIZATIONS",
    "Normalization",
    "fisher_element_weights",
    "fisher_task_arithmetic",
    "fisher_weighted_average",
    "normalize_fisher",
    "working_dtype",
]
