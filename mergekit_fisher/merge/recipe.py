"""Strict recipes for the Fisher methods: every parameter name, type and weight is checked.

mergekit ignores parameter names its method does not declare, so `fisher_normalise: l2` (a typo)
would silently merge with the default normalization. For our methods that is a wrong merge that
looks right: `checked_resolve_parameters` (installed in place of mergekit's `resolve_parameters` by
`registry.patch_planner`) refuses unknown names with a "did you mean", and turns a value of the
wrong type into one `Error:` line naming the parameter; `check_weights` refuses weights that make
the merge meaningless.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

from mergekit.common import ModelReference
from mergekit.config import evaluate_setting
from mergekit.merge_methods.base import MergeMethodSpec
from mergekit.parameter_resolver import resolve_parameters
from pydantic import ValidationError

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.merge.methods import is_plugin_method
from mergekit_fisher.merge.parameters import ALLOW_NEGATIVE_WEIGHTS


def _where(model: Optional[ModelReference]) -> str:
    return f"the parameters of model {model}" if model is not None else "the recipe's parameters"


def check_names(spec: MergeMethodSpec, settings: Mapping[str, Any], model) -> None:
    known = [parameter.name for parameter in spec.parameters]
    for name in settings:
        if name in known:
            continue
        guess = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean `{guess[0]}`? " if guess else ""
        raise FisherInputError(
            f"unknown parameter `{name}` for merge method {spec.name} (in {_where(model)})",
            fix=f"{hint}{spec.name} takes {', '.join(sorted(known))}",
            kind="recipe",
        )


def check_values(spec: MergeMethodSpec, settings: Mapping[str, Any], model, tensor_name, t) -> None:
    """Evaluate each setting as mergekit will, so a wrong type names its parameter."""
    for parameter in spec.parameters:
        if parameter.name not in settings:
            continue
        try:
            evaluate_setting(tensor_name, settings[parameter.name], t, validate=parameter.validate)
        except (ValidationError, ValueError, TypeError) as error:
            expected = getattr(parameter.value_type, "__name__", str(parameter.value_type))
            reason = error.errors()[0]["msg"] if isinstance(error, ValidationError) else str(error)
            raise FisherInputError(
                f"parameter `{parameter.name}` of merge method {spec.name} has a bad value "
                f"{settings[parameter.name]!r} (in {_where(model)}: {reason})",
                fix=f"give `{parameter.name}` a {expected} value",
                kind="recipe",
            ) from None


def _scopes(sources, models: Iterable[Optional[ModelReference]]):
    for model in models:
        for settings in sources(model):
            if settings:
                yield model, settings


def checked_resolve_parameters(spec: MergeMethodSpec, *, tensor_name, inputs, sources, **kwargs):
    """mergekit's `resolve_parameters`, with strict names and typed values for Fisher methods."""
    if is_plugin_method(spec.name):
        for model, settings in _scopes(sources, [None, *inputs]):
            check_names(spec, settings, model)
            name = tensor_name if model is None else inputs[model]
            check_values(spec, settings, model, name, kwargs.get("t", 0))
    return resolve_parameters(
        spec, tensor_name=tensor_name, inputs=inputs, sources=sources, **kwargs
    )


def check_weights(
    method_name: str,
    weights: Mapping[ModelReference, float],
    shared: Mapping[str, Any],
    tensor_name: str,
) -> None:
    """Weights of the merged inputs of one tensor: finite, negative only on request, and for
    `fisher` a positive total."""
    values: Sequence[float] = list(weights.values())
    if not values:
        return
    bad = {str(model): w for model, w in weights.items() if not math.isfinite(w)}
    if bad:
        raise FisherInputError(
            f"non-finite weight(s) {bad} for {tensor_name}", fix="use finite weights", kind="recipe"
        )
    negative = {str(model): w for model, w in weights.items() if w < 0}
    if negative and not shared.get(ALLOW_NEGATIVE_WEIGHTS):
        raise FisherInputError(
            f"negative weight(s) {negative} for {tensor_name}",
            fix=f"use weights >= 0, or set `{ALLOW_NEGATIVE_WEIGHTS}: true` in the recipe's "
            "parameters if you mean it (e.g. task negation)",
            kind="recipe",
        )
    # A Fisher-weighted average (or RegMean) needs a positive total: all-zero weights would write
    # zeros, and a total <= 0 lets the denominator cross 0. (For `fisher_X`, all-zero weights keep
    # the base.)
    if method_name in ("fisher", "regmean") and sum(values) <= 0:
        raise FisherInputError(
            f"the weights of {tensor_name} sum to {sum(values)}: a {method_name} merge "
            "needs a positive total",
            fix="give the models positive `weight`s",
            kind="recipe",
        )
