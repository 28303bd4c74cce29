"""The math room: Fisher merging and RegMean as small pure tensor functions (no I/O, no graph, no
config)."""

from mergekit_fisher.math.fisher_merge import (
    NORMALIZATIONS,
    Normalization,
    fisher_element_weights,
    fisher_task_arithmetic,
    fisher_weighted_average,
    normalize_fisher,
    working_dtype,
)
from mergekit_fisher.math.regmean import (
    SingularGramError,
    regmean_merge,
    scale_off_diagonal,
    weighted_average,
)

__all__ = [
    "NORMALIZATIONS",
    "Normalization",
    "fisher_element_weights",
    "fisher_task_arithmetic",
    "fisher_weighted_average",
    "normalize_fisher",
    "working_dtype",
    "SingularGramError",
    "regmean_merge",
    "scale_off_diagonal",
    "weighted_average",
]
