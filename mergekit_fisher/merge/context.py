"""Hands the Fisher tensors of the output tensor being merged to the kernel.

mergekit calls a method's kernel with the model tensors only; the planner-side task
(`planning.FisherMergeTask`) loads each input's Fisher and publishes it here for the duration of
that one call. A `ContextVar` is per thread, so mergekit's `--multi-gpu` worker threads don't mix.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Dict, Hashable, Optional

import torch

from mergekit_fisher.errors import FisherInputError

_ATTACHED: ContextVar[Optional[Dict[Hashable, torch.Tensor]]] = ContextVar("mergekit_fisher_attached", default=None)


@contextlib.contextmanager
def attached_fishers(fishers: Dict[Hashable, torch.Tensor]):
    token = _ATTACHED.set(fishers)
    try:
        yield
    finally:
        _ATTACHED.reset(token)


def fishers_for(method_name: str, tensor_name: Optional[str], entries) -> Dict[Hashable, torch.Tensor]:
    """The attached Fisher of each input entry; loud errors if the planner hook did not run or shapes differ."""
    fishers = _ATTACHED.get()
    if fishers is None:
        raise RuntimeError(
            f"{method_name}: no Fisher tensors are attached to {tensor_name}. The Fisher methods run "
            "through mergekit's planner (mergekit-yaml / mergekit-fisher merge / run_merge), which "
            "mergekit-fisher hooks to load each input's Fisher under the input's own tensor name. "
            "If you called the method directly, use a recipe instead; if you did use a recipe, "
            "mergekit's internals changed (supported: mergekit>=0.1.5,<0.2) -- please report it."
        )
    result = {}
    for entry in entries:
        if entry.id not in fishers:
            raise RuntimeError(f"{method_name}: no Fisher attached for input {entry.id} of {tensor_name}")
        fisher = fishers[entry.id]
        # A shape mismatch must never be papered over by broadcasting.
        if fisher.ndim and tuple(fisher.shape) != tuple(entry.tensor.shape):
            raise FisherInputError(
                f"Fisher shape {tuple(fisher.shape)} does not match the tensor being merged "
                f"{tuple(entry.tensor.shape)}",
                model=str(entry.id), tensor=tensor_name,
                fix="recompute the Fisher for this exact model (and tokenizer)",
            )
        result[entry.id] = fisher
    return result
