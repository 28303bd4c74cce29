"""The Fisher-specific recipe parameters, shared by every Fisher method."""

from __future__ import annotations

from typing import Optional

from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.math import NORMALIZATIONS

MISSING_POLICIES = ("error", "uniform")
VALIDATION_LEVELS = ("full", "headers")

DEFAULT_NORMALIZE = "mean"
DEFAULT_FLOOR = 1e-6
DEFAULT_MISSING = "error"
DEFAULT_VALIDATE = "full"


def fisher_parameter_specs(fisher_scope: ParameterScope) -> tuple:
    """`fisher` (per model) + the shared knobs. Values arrive from YAML as strings/numbers/bools."""
    return (
        ParameterSpec(
            "fisher", Optional[str], fisher_scope, default=None,
            description="path to the model's Fisher file or directory (format v1)",
        ),
        ParameterSpec(
            "fisher_normalize", str, ParameterScope.SHARED, default=DEFAULT_NORMALIZE,
            description="mean | l2 | tensor | none",
        ),
        ParameterSpec(
            "fisher_floor", float, ParameterScope.SHARED, default=DEFAULT_FLOOR,
            description="added to every normalized Fisher value",
        ),
        ParameterSpec(
            "missing_fisher", str, ParameterScope.SHARED, default=DEFAULT_MISSING,
            description="error | uniform: what a tensor absent from a Fisher file gets",
        ),
        ParameterSpec(
            "fisher_validate", str, ParameterScope.SHARED, default=DEFAULT_VALIDATE,
            description="full (scan every value before merging) | headers",
        ),
    )


def check_shared(parameters: dict, where: str) -> None:
    """Clear errors for bad shared values (mergekit would only say 'validation error')."""
    choices = {
        "fisher_normalize": NORMALIZATIONS,
        "missing_fisher": MISSING_POLICIES,
        "fisher_validate": VALIDATION_LEVELS,
    }
    for name, allowed in choices.items():
        value = parameters.get(name)
        if value not in allowed:
            raise FisherInputError(
                f"unknown {name} value {value!r} for {where}",
                fix=f"set `{name}:` to one of {', '.join(allowed)}",
            )
    floor = parameters.get("fisher_floor")
    if floor is None or not (floor >= 0) or floor == float("inf"):
        raise FisherInputError(
            f"fisher_floor must be a finite number >= 0, got {floor!r} ({where})",
            fix="use a small positive floor such as 1e-6 (the default)",
        )
