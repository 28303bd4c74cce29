"""The Fisher merge methods, as mergekit `GroupMergeMethod`s over `mergekit_fisher.math`.

`fisher`: the paper's method, θ* = Σᵢ wᵢF̃ᵢθᵢ / Σᵢ wᵢF̃ᵢ over all inputs (no base; a base listed as an
input is just another input and needs its own Fisher).

`fisher_<X>` for X in mergekit's generalized task arithmetic family: X with each model's scalar
weight replaced by a per-element Fisher weight; parameters and defaults are X's own (read from
mergekit's registered X), plus the Fisher parameters. The base needs no Fisher.
"""

from __future__ import annotations

import dataclasses
import logging
from contextvars import ContextVar
from functools import cached_property
from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch
from mergekit.merge_methods import registry as mergekit_registry
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorEntry,
    TensorGroup,
)
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.sparsify import RescaleNorm, sparsify

from mergekit_fisher.errors import FisherInputError, warn_once
from mergekit_fisher.math import fisher_task_arithmetic, fisher_weighted_average, working_dtype
from mergekit_fisher.merge.parameters import FISHER, fisher_parameter_specs
from mergekit_fisher.merge.regmean import RegMeanMerge

LOG = logging.getLogger(__name__)
PAPER_URL = "https://arxiv.org/abs/2111.09832"
DEFAULT_WEIGHT = 1.0
# `explain`'s window into the task-arithmetic family: while set, each `fisher_X` kernel call hands
# it the mask of the deltas it keeps (after mergekit's sparsification, with the run's RNG), so the
# shares `explain` reports are those of the merge itself, not a re-implementation of it
KEPT_DELTAS_OBSERVER: ContextVar[Optional[Callable[[torch.Tensor], None]]] = ContextVar(
    "kept_deltas_observer", default=None
)


def bound_fishers(
    method_name: str, group: TensorGroup, entries: Sequence[TensorEntry], fishers: Mapping
) -> List[torch.Tensor]:
    """Each entry's Fisher weights, as bound to the per-input `fisher` parameter.

    A merge from a recipe binds a normalized, floored tensor per input (`tasks.FisherMergeTask`).
    A direct call (`merge_tensors` / `merge_state_dicts`) may pass tensors itself; one that passes
    no Fisher at all gets a uniform Fisher -- exactly the namesake method (`fisher` = `linear`),
    with a warning -- so every registered method works through mergekit's state-dict API. A path
    here means a recipe merge bypassed our planner hook: refused, never merged without its Fisher.
    """
    values = [fishers[entry.id] for entry in entries]
    if all(value is None for value in values):
        warn_once(
            LOG,
            ("uniform", method_name),
            "%s: no `fisher` tensors were given, so every input gets a uniform Fisher "
            "(the result is the plain namesake method); pass each input's Fisher as its "
            "`fisher` parameter",
            method_name,
        )
        return [torch.ones((), dtype=torch.float32) for _entry in entries]
    result = []
    for entry, fisher in zip(entries, values):
        if not isinstance(fisher, torch.Tensor):
            raise FisherInputError(
                f"{method_name} got no Fisher tensor for input {entry.id} of "
                f"{group.metadata.name} (its `fisher` is {fisher!r})",
                fix="run Fisher merges from a recipe (mergekit-yaml, mergekit-fisher merge or "
                "mergekit's run_merge), which loads each input's Fisher file; or pass every "
                "input's normalized Fisher tensor as its `fisher` parameter",
            )
        # A shape mismatch must never be papered over by broadcasting.
        if fisher.ndim and tuple(fisher.shape) != tuple(entry.tensor.shape):
            raise FisherInputError(
                f"Fisher shape {tuple(fisher.shape)} does not match the tensor being merged "
                f"{tuple(entry.tensor.shape)}",
                model=str(entry.id),
                tensor=group.metadata.name,
                fix="recompute the Fisher for this exact model (and tokenizer)",
            )
        result.append(fisher.to(entry.tensor.device))
    return result


class FisherMerge(GroupMergeMethod):
    """Fisher-weighted averaging of every input (Matena & Raffel 2021)."""

    @cached_property
    def spec(self) -> MergeMethodSpec:
        return MergeMethodSpec(
            name="fisher",
            pretty_name="Fisher-Weighted Averaging",
            reference_url=PAPER_URL,
            parameters=(
                ParameterSpec("weight", float, ParameterScope.INPUT, default=DEFAULT_WEIGHT),
                *fisher_parameter_specs(ParameterScope.INPUT),
            ),
            contract=InputContract(base=BasePolicy.IGNORED, min_inputs=1),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        entries = group.entries
        fishers = bound_fishers(self.spec.name, group, entries, parameters[FISHER])
        first = entries[0].tensor
        dtype = working_dtype(first.dtype)
        merged = fisher_weighted_average(
            [entry.tensor.to(dtype) for entry in entries],
            fishers,
            [parameters["weight"][entry.id] for entry in entries],
        )
        return merged.to(first.dtype)


@dataclasses.dataclass(frozen=True)
class FisherTaskArithmeticMerge(GroupMergeMethod):
    """A Fisher-weighted member of mergekit's generalized task arithmetic family."""

    namesake: GeneralizedTaskArithmeticMerge

    @classmethod
    def of(cls, namesake: GeneralizedTaskArithmeticMerge) -> "FisherTaskArithmeticMerge":
        return cls(namesake=namesake)

    @cached_property
    def spec(self) -> MergeMethodSpec:
        original = self.namesake.spec
        parameters = []
        for parameter in original.parameters:
            if parameter.name == "weight" and parameter.required:
                parameter = dataclasses.replace(parameter, default=DEFAULT_WEIGHT)
            parameters.append(parameter)
        return dataclasses.replace(
            original,
            name=f"fisher_{original.name}",
            pretty_name=f"Fisher-weighted {original.pretty_name or original.name}",
            reference_url=original.reference_url,
            parameters=(*parameters, *fisher_parameter_specs(ParameterScope.NON_BASE)),
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries:
            return base
        fishers = bound_fishers(self.spec.name, group, entries, parameters[FISHER])
        method = self.namesake.sparsification_method
        extra_keys = [key for key in ("gamma", "epsilon") if key in parameters]

        def sparsify_delta(index: int, delta: torch.Tensor) -> torch.Tensor:
            entry_id = entries[index].id
            return sparsify(
                delta,
                density=parameters["density"][entry_id],
                method=method,
                rescale_norm=RescaleNorm.l1 if parameters["rescale"] else None,
                **{key: parameters[key][entry_id] for key in extra_keys},
            )

        consensus = self.namesake.consensus_method
        return fisher_task_arithmetic(
            base,
            [entry.tensor for entry in entries],
            fishers,
            [parameters["weight"][entry.id] for entry in entries],
            sparsify_delta=sparsify_delta if method else None,
            consensus=consensus.value if consensus else None,
            normalize=parameters["normalize"],
            lambda_=parameters["lambda"],
            mask_dtype=torch.int8 if parameters["int8_mask"] else base.dtype,
            observe_kept=KEPT_DELTAS_OBSERVER.get(),
        )


def is_fisher_method(method_name: str) -> bool:
    """Whether mergekit's registry maps `method_name` to one of our methods."""
    try:
        method = mergekit_registry.get(method_name)
    except RuntimeError:
        return False
    return isinstance(method, (FisherMerge, FisherTaskArithmeticMerge))


def is_plugin_method(method_name: str) -> bool:
    """A Fisher method or `regmean`: the methods whose recipes are checked strictly and up front."""
    try:
        method = mergekit_registry.get(method_name)
    except RuntimeError:
        return False
    return isinstance(method, (FisherMerge, FisherTaskArithmeticMerge, RegMeanMerge))
