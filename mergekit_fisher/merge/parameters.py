"""The Fisher-specific recipe parameters, shared by every Fisher method."""

from __future__ import annotations

from enum import Enum
from typing import Any

from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.math import Normalization


class MissingFisher(str, Enum):
    """What a tensor absent from a model's Fisher file gets."""

    ERROR = "error"
    UNIFORM = "uniform"  # a constant Fisher at the file's mean level


class FisherValidation(str, Enum):
    """How much of every Fisher file is checked before merging."""

    FULL = "full"  # one streaming pass over every value
    HEADERS = "headers"  # headers up front, values when each tensor is loaded


class ProvenancePolicy(str, Enum):
    """What a Fisher file recorded for another model (or adapter, or revision) gets."""

    WARN = "warn"
    ERROR = "error"


DEFAULT_NORMALIZE = Normalization.MEAN.value
DEFAULT_FLOOR = 1e-6
DEFAULT_MISSING = MissingFisher.ERROR.value
DEFAULT_VALIDATE = FisherValidation.FULL.value

# The per-input parameter that carries the Fisher. In a recipe it names a file or directory; the
# merge graph (`tasks.FisherMergeTask`) binds the loaded, normalized tensor in its place, so the
# kernel receives the tensor as an ordinary per-input parameter. Typed `Any` so that a bad recipe
# value reaches our own check (`resolution.fisher_path`) instead of a pydantic traceback.
FISHER = "fisher"
ALLOW_NEGATIVE_WEIGHTS = "allow_negative_weights"
PROVENANCE = "fisher_provenance"


def fisher_parameter_specs(fisher_scope: ParameterScope) -> tuple:
    """`fisher` (per model) + the shared knobs. Values arrive from YAML as strings/numbers/bools."""
    return (
        ParameterSpec(
            FISHER,
            Any,
            fisher_scope,
            default=None,
            description="path to the model's Fisher file or directory (format v1); "
            "at merge time, the loaded Fisher tensor",
        ),
        ParameterSpec(
            "fisher_normalize",
            str,
            ParameterScope.SHARED,
            default=DEFAULT_NORMALIZE,
            description=" | ".join(mode.value for mode in Normalization),
        ),
        ParameterSpec(
            "fisher_floor",
            float,
            ParameterScope.SHARED,
            default=DEFAULT_FLOOR,
            description="added to every Fisher value, relative to the model's mean Fisher",
        ),
        ParameterSpec(
            "missing_fisher",
            str,
            ParameterScope.SHARED,
            default=DEFAULT_MISSING,
            description="error | uniform: what a tensor absent from a Fisher file gets",
        ),
        ParameterSpec(
            "fisher_validate",
            str,
            ParameterScope.SHARED,
            default=DEFAULT_VALIDATE,
            description="full (scan every value before merging) | headers",
        ),
        ParameterSpec(
            PROVENANCE,
            str,
            ParameterScope.SHARED,
            default=ProvenancePolicy.WARN.value,
            description="warn | error: a Fisher recorded for another model than the recipe's",
        ),
        ParameterSpec(
            ALLOW_NEGATIVE_WEIGHTS,
            bool,
            ParameterScope.SHARED,
            default=False,
            description="accept negative `weight`s (task negation); refused by default",
        ),
    )


_CHOICES = {
    "fisher_normalize": Normalization,
    "missing_fisher": MissingFisher,
    "fisher_validate": FisherValidation,
    PROVENANCE: ProvenancePolicy,
}


def check_shared(parameters: dict, where: str) -> None:
    """Clear errors for bad shared values (mergekit would only say 'validation error')."""
    for name, choices in _CHOICES.items():
        value = parameters.get(name)
        allowed = [choice.value for choice in choices]
        if value not in allowed:
            raise FisherInputError(
                f"unknown {name} value {value!r} for {where}",
                fix=f"set `{name}:` to one of {', '.join(allowed)}",
            )
    floor = parameters.get("fisher_floor")
    if floor is None or not (floor >= 0) or floor == float("inf"):
        raise FisherInputError(
            f"fisher_floor must be a finite number >= 0, got {floor!r} ({where})",
            fix="use a small positive floor such as 1e-6 (the default: one millionth of each "
            "model's mean Fisher)",
        )
