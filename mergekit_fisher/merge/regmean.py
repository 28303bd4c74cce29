"""`merge_method: regmean` (Jin et al. 2023, arXiv 2212.09849), as a mergekit `GroupMergeMethod`.

Each model gives `gram: PATH` (its Gram file, `mergekit-fisher compute --statistic gram`; a local
path or a Hub reference as for `fisher:`) and a `weight`. A linear layer's weight -- every tensor
the Gram files hold a Gram for -- gets the closed form of `math.regmean` (solved in float64 on the
device mergekit merges on); every other tensor (embeddings, norms, biases, a head without a Gram)
gets the weighted average Σ wᵢθᵢ / Σ wᵢ, as in the paper. All inputs are merged (no base model).

The planner hook (`gram_tasks.regmean_merge_task`) binds each input's loaded mean Gram in place of
its path, or `NO_GRAM` where the tensor has no Gram, and hands the kernel weights in [out, in]
layout (HF Conv1D weights are transposed around the kernel).
"""

from __future__ import annotations

import logging
from enum import Enum
from functools import cached_property
from typing import Any

import torch
from mergekit.merge_methods import registry as mergekit_registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_fisher.errors import FisherInputError, warn_once
from mergekit_fisher.math import SingularGramError, regmean_merge, weighted_average
from mergekit_fisher.math.regmean import DEFAULT_ALPHA, DEFAULT_RIDGE

LOG = logging.getLogger(__name__)
PAPER_URL = "https://arxiv.org/abs/2212.09849"
METHOD_NAME = "regmean"
GRAM = "gram"
ALPHA = "regmean_alpha"
RIDGE = "regmean_ridge"
VALIDATE = "gram_validate"
PROVENANCE = "gram_provenance"


class GramValidation(str, Enum):
    FULL = "full"  # every value of every Gram file checked at plan time
    HEADERS = "headers"  # names, shapes and counts at plan time; values when each Gram is loaded


class GramProvenance(str, Enum):
    WARN = "warn"
    ERROR = "error"


def no_gram() -> torch.Tensor:
    """The bound value for an input whose tensor has no Gram (the weighted average applies)."""
    return torch.empty(0)


def _is_no_gram(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 0


class RegMeanMerge(GroupMergeMethod):
    """Regression mean: the least-squares merge of every linear layer's outputs."""

    @cached_property
    def spec(self) -> MergeMethodSpec:
        return MergeMethodSpec(
            name=METHOD_NAME,
            pretty_name="RegMean",
            reference_url=PAPER_URL,
            parameters=(
                ParameterSpec("weight", float, ParameterScope.INPUT, default=1.0),
                ParameterSpec(
                    GRAM,
                    Any,
                    ParameterScope.INPUT,
                    default=None,
                    description="path to the model's Gram file (compute --statistic gram); at "
                    "merge time, the loaded mean Gram of the tensor's layer",
                ),
                ParameterSpec(
                    ALPHA,
                    float,
                    ParameterScope.SHARED,
                    default=DEFAULT_ALPHA,
                    description="scales the Grams' off-diagonal entries (1: exact least squares, "
                    "0: per-input-feature weighted average)",
                ),
                ParameterSpec(
                    RIDGE,
                    float,
                    ParameterScope.SHARED,
                    default=DEFAULT_RIDGE,
                    description="λ / mean(diag(Σ wᵢG̃ᵢ)): pulls a singular system towards the "
                    "weighted average",
                ),
                ParameterSpec(
                    VALIDATE,
                    str,
                    ParameterScope.SHARED,
                    default=GramValidation.FULL.value,
                    description="full (scan every Gram before merging) | headers",
                ),
                ParameterSpec(
                    PROVENANCE,
                    str,
                    ParameterScope.SHARED,
                    default=GramProvenance.WARN.value,
                    description="warn | error: a Gram file recorded for another model",
                ),
            ),
            contract=InputContract(base=BasePolicy.IGNORED, min_inputs=1),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        entries = group.entries
        first = entries[0].tensor
        coefficients = [float(parameters["weight"][entry.id]) for entry in entries]
        grams = [parameters[GRAM][entry.id] for entry in entries]
        tensors = [entry.tensor for entry in entries]
        name = group.metadata.name
        if all(value is None for value in grams):
            warn_once(
                LOG,
                ("uniform", METHOD_NAME),
                "regmean: no `gram` tensors were given, so every tensor gets the weighted average "
                "(the result is `linear`); pass each input's mean Gram as its `gram` parameter",
            )
            return weighted_average(tensors, coefficients).to(first.dtype)
        if not all(isinstance(value, torch.Tensor) for value in grams):
            raise FisherInputError(
                f"regmean got no Gram tensor for {name} (its `gram` values are "
                f"{[type(value).__name__ for value in grams]})",
                fix="run regmean from a recipe (mergekit-yaml, mergekit-fisher merge or mergekit's "
                "run_merge), which loads each input's Gram file",
            )
        if all(_is_no_gram(value) for value in grams):
            return weighted_average(tensors, coefficients).to(first.dtype)
        try:
            merged = regmean_merge(
                tensors,
                grams,
                coefficients,
                alpha=float(parameters[ALPHA]),
                ridge=float(parameters[RIDGE]),
            )
        except SingularGramError as error:
            raise FisherInputError(
                f"regmean cannot solve for {name}: {error}",
                tensor=name,
                fix=f"set a positive `{RIDGE}` (default {DEFAULT_RIDGE}) in the recipe's "
                "parameters, or a `regmean_alpha` below 1",
            ) from None
        return merged.to(first.dtype)


def is_regmean_method(method_name: str) -> bool:
    try:
        method = mergekit_registry.get(method_name)
    except RuntimeError:
        return False
    return isinstance(method, RegMeanMerge)


def check_regmean_shared(parameters: dict) -> None:
    """Clear errors for bad shared values (mergekit would only say 'validation error')."""
    where = f"merge method {METHOD_NAME}"
    for name, choices in ((VALIDATE, GramValidation), (PROVENANCE, GramProvenance)):
        allowed = [choice.value for choice in choices]
        if parameters.get(name) not in allowed:
            raise FisherInputError(
                f"unknown {name} value {parameters.get(name)!r} for {where}",
                fix=f"set `{name}:` to one of {', '.join(allowed)}",
                kind="recipe",
            )
    alpha = parameters.get(ALPHA)
    if alpha is None or not (0.0 <= alpha <= 1.0):
        raise FisherInputError(
            f"{ALPHA} must be between 0 and 1, got {alpha!r} ({where})",
            fix=f"use an off-diagonal scale in [0, 1], e.g. {DEFAULT_ALPHA} (1 = exact least "
            "squares, 0 = per-feature weighted average)",
            kind="recipe",
        )
    ridge = parameters.get(RIDGE)
    if ridge is None or not (0.0 <= ridge < float("inf")):
        raise FisherInputError(
            f"{RIDGE} must be a finite number >= 0, got {ridge!r} ({where})",
            fix=f"use a small relative ridge such as {DEFAULT_RIDGE} (the default)",
            kind="recipe",
        )
