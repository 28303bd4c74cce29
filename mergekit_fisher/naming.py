"""Tensor names and layouts: the one module that decides what a Fisher tensor is called.

A Fisher file stores each tensor under the **model checkpoint's stored name and layout** -- what
`model.safetensors` holds, not what transformers builds in memory. The two differ:

* tied weights: a tied checkpoint stores `model.embed_tokens.weight` only (`output_names`);
* transformers 5 converts some stored tensors when it loads them (its "conversion mapping"): MoE
  experts stored one by one (`block_sparse_moe.experts.N.w1.weight`) are fused in memory
  (`mlp.experts.gate_up_proj`), routers renamed, and so on. `compute` differentiates the in-memory
  parameters and `to_stored_layout` reverts their Fishers with transformers' own
  `revert_weight_conversion`, as `save_pretrained` reverts weights;
* mergekit plans merges under the in-memory names and its `LoadTensor` converts stored checkpoint
  tensors with `mergekit.architecture.conversion.convert_checkpoint_tensors`; the merge converts a
  Fisher file's stored tensors the same way (`convert_stored`), and mergekit's own lookup order
  (own name, aliases, tied names) is `load_candidates`.

A Fisher is a mean of squares, element by element: moving elements around (split, stack,
concatenate, transpose, permute) keeps it exact, arithmetic on them would not. `check_relayout`
refuses any conversion whose operations are not pure re-layouts.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch

from mergekit_fisher.errors import FisherInputError

# transformers' conversion operations that only move elements (core_model_loading.py).
RELAYOUT_OPERATIONS = frozenset(
    {
        "_IdentityOp",
        "Chunk",
        "Split",
        "Concatenate",
        "Interleave",
        "MergeModulelist",
        "SplitModulelist",
        "Transpose",
        "PermuteForRope",
    }
)


def load_candidates(info) -> List[str]:
    """The names mergekit's LoadTensor tries for a WeightInfo, in its order: own, aliases, tied."""
    return [info.name, *(info.aliases or ()), *(getattr(info, "tied_names", None) or ())]


def output_names(aliases: List[str], stored: Optional[Set[str]]) -> List[str]:
    """Names to write a parameter under: every alias the checkpoint stores (tied weights keep the
    stored one, e.g. only ``model.embed_tokens.weight``), else the first alias."""
    if stored:
        present = [name for name in aliases if name in stored]
        if present:
            return present
    return aliases[:1]


def _conversions(model) -> list:
    from transformers.conversion_mapping import get_model_conversion_mapping

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
    return list(conversions or [])


def check_relayout(model) -> None:
    """Refuse a model whose load-time conversion does more than move elements."""
    for conversion in _conversions(model):
        for operation in getattr(conversion, "operations", None) or ():
            if type(operation).__name__ not in RELAYOUT_OPERATIONS:
                raise FisherInputError(
                    f"transformers converts this model's stored weights with "
                    f"{type(operation).__name__}, which is not a pure re-layout: a Fisher computed "
                    "on the converted parameters cannot be mapped back to the stored tensors",
                    fix="report the model type; until then compute the Fisher of an unconverted "
                    "(e.g. dequantized) checkpoint",
                )


def to_stored_layout(model, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """In-memory-named Fisher tensors -> the checkpoint's stored names and layout."""
    from transformers.core_model_loading import revert_weight_conversion

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_relayout(base)
    return revert_weight_conversion(base, tensors)


def stored_names(model, names: Iterable[str], shapes: Mapping[str, Sequence[int]]) -> List[str]:
    """The checkpoint's stored names of the in-memory tensors `names` (shapes by name), sorted: a
    fused MoE expert tensor gives its per-expert stored tensors, a renamed router its stored name.
    Shapes only: the conversion runs on meta tensors."""
    placeholders = {name: torch.empty(tuple(shapes[name]), device="meta") for name in names}
    return sorted(to_stored_layout(model, placeholders)) if placeholders else []


TensorSource = Callable[[], torch.Tensor]


def convert_stored(
    model_type: Optional[str], sources: Mapping[str, TensorSource], targets: Sequence[str]
) -> Optional[Tuple[str, torch.Tensor]]:
    """The first of `targets` that mergekit's conversion builds from `sources` (stored tensors,
    loaded lazily), with the tensor; None if none can be built. Meta-tensor sources give shapes."""
    from mergekit.architecture.conversion import convert_checkpoint_tensors

    for target in targets:
        tensor = convert_checkpoint_tensors(model_type, sources, target)
        if tensor is not None:
            return target, tensor
    return None


def meta_sources(shapes: Mapping[str, Iterable[int]]) -> Dict[str, TensorSource]:
    """Shape-only sources for `convert_stored`: plan-time checks read no values."""
    return {
        name: (lambda shape=tuple(shape): torch.empty(shape, device="meta"))
        for name, shape in shapes.items()
    }
