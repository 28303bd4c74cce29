"""The exact slow path for parameters the hooks do not cover: one example at a time, autograd,
squared.

Only the uncovered parameters get ``requires_grad`` here, so the cost is one extra forward +
backward per example and pass, and only when such parameters exist (none for standard HF decoders).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from mergekit_fisher.estimator.accumulator import FisherAccumulator
from mergekit_fisher.estimator.data import Batch


def fallback_pass(
    params: Dict[str, torch.nn.Parameter],
    batch: Batch,
    passes: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    forward: Callable[[Dict[str, torch.Tensor]], torch.Tensor],
    loglik: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    accumulator: FisherAccumulator,
    *,
    token_targets: bool,
) -> None:
    keys: List[str] = list(params)
    tensors = [params[key] for key in keys]
    previous = [p.requires_grad for p in tensors]
    for p in tensors:
        p.requires_grad_(True)
    try:
        lengths = batch.attention_mask.sum(1).tolist()
        inputs = batch.model_inputs()
        for b, length in enumerate(lengths):
            with torch.enable_grad():  # example b alone, unpadded, with all of its inputs
                logits = forward(
                    {name: value[b : b + 1, :length] for name, value in inputs.items()}
                )
                for j, (targets, weights) in enumerate(passes):
                    target = (
                        targets[b : b + 1, : length - 1] if token_targets else targets[b : b + 1]
                    )
                    value = loglik(logits, target).sum()
                    grads = torch.autograd.grad(
                        value, tensors, retain_graph=j < len(passes) - 1, allow_unused=True
                    )
                    for key, grad in zip(keys, grads):
                        if grad is not None:
                            squared = grad.detach().to(accumulator.dtype).square() * float(
                                weights[b]
                            )
                            accumulator.add_squared(key, squared)
    finally:
        for p, flag in zip(tensors, previous):
            p.requires_grad_(flag)
