"""Fisher-weighted merging, element-wise (Matena & Raffel 2021, arXiv 2111.09832).

    θ* = Σᵢ λᵢ F̃ᵢ θᵢ / Σᵢ λᵢ F̃ᵢ,    F̃ᵢ = (Fᵢ + floor · m̄ᵢ) / sᵢ

Fisher scales differ between models (data, sequence lengths, confidence), so each model's Fisher is
brought to a common scale (divided by sᵢ, `normalize_fisher`) and floored, so that elements no model
cares about fall back to the plain weighted average instead of 0/0. The floor is *relative*: m̄ᵢ is
model i's mean Fisher (the tensor's own mean under `tensor` normalization), so `floor = 1e-6` means
"one millionth of that model's average importance" under every normalization. (An absolute floor
would not: l2-normalized values scale like 1/√N, and at 7B parameters nearly every element would sit
below a 1e-6 floor, turning an `l2` merge into a plain average.)

The task-arithmetic family (TIES, DARE, ...) keeps every mergekit convention and only replaces each
model's scalar weight wᵢ by the per-element weight wᵢ·F̃ᵢ/mean_j(F̃ⱼ) (`fisher_element_weights`):
with equal Fishers the weights are exactly the recipe's, and `normalize: false` keeps task
arithmetic's scale.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Optional, Sequence

import torch


class Normalization(str, Enum):
    """How each model's Fisher is brought to a common scale before merging."""

    MEAN = "mean"  # divide by the mean over all elements of the model's Fisher file
    L2 = "l2"  # divide by the file's global L2 norm (the paper's code)
    TENSOR = "tensor"  # divide each tensor by its own mean
    NONE = "none"  # raw values


NORMALIZATIONS = tuple(mode.value for mode in Normalization)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16/fp16/fp32) is computed in float32, as
    mergekit's linear."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_fisher(
    fisher: torch.Tensor,
    mode: str,
    *,
    global_mean: Optional[float] = None,
    global_l2: Optional[float] = None,
    floor: float = 0.0,
) -> torch.Tensor:
    """One model's Fisher tensor on a comparable scale, with its relative floor: (F + floor·m̄) / s.

    - ``mean``:   s = m̄ = the mean over *all* elements of that model's Fisher file (`global_mean`),
                  so model size and data scale do not move the result;
    - ``l2``:     s = the file's global L2 norm (`global_l2`; what the paper's code does),
                  m̄ = `global_mean`;
    - ``tensor``: s = m̄ = this tensor's own mean (each tensor is weighted on its own);
    - ``none``:   s = 1, m̄ = `global_mean`.
    A zero scale (an all-zero Fisher) leaves the values unscaled: the floor (0 then) and the other
    models decide.
    """
    try:
        mode = Normalization(mode)
    except ValueError:
        raise ValueError(
            f"unknown Fisher normalization {mode!r}; expected one of {NORMALIZATIONS}"
        ) from None
    if mode is Normalization.TENSOR:
        scale = reference = float(fisher.double().mean()) if fisher.numel() else 0.0
    else:
        reference = global_mean
        scales = {Normalization.MEAN: global_mean, Normalization.L2: global_l2}
        scale = scales.get(mode, 1.0)
        if scale is None or (floor and reference is None):
            raise ValueError(f"normalization {mode.value!r} needs the file's global statistics")
    floored = fisher + floor * reference if floor else fisher
    if scale <= 0:
        return floored
    return floored / scale


def fisher_weighted_average(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> torch.Tensor:
    """Σᵢ wᵢF̃ᵢθᵢ / Σᵢ wᵢF̃ᵢ, in the dtype of the tensors (float32 or float64).

    `fishers` are already normalized and floored (`normalize_fisher`); each may be a full tensor or
    a scalar (a uniform Fisher). Where the denominator is exactly 0 (every Fisher 0) the plain
    weighted average is used.
    """
    if not (len(tensors) == len(fishers) == len(weights)) or not tensors:
        raise ValueError("need one Fisher and one weight per tensor")
    dtype = tensors[0].dtype
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for tensor, fisher, weight in zip(tensors, fishers, weights):
        coefficient = fisher.to(dtype=dtype) * weight
        numerator.addcmul_(coefficient.expand_as(tensor), tensor)
        denominator.add_(coefficient.expand_as(tensor))
    empty = denominator == 0
    if bool(empty.any()):
        total_weight = float(sum(weights))
        plain = sum(t * w for t, w in zip(tensors, weights)) / (
            total_weight if total_weight != 0 else 1.0
        )
        numerator = torch.where(empty, plain, numerator)
        denominator = torch.where(empty, torch.ones_like(denominator), denominator)
    return numerator.div_(denominator).to(dtype)


def fisher_element_weights(
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """wᵢ·F̃ᵢ/meanⱼ(F̃ⱼ) per element, stacked to [n, *shape] (F̃: normalized and floored).

    The factors average to 1 over the models, so equal Fishers give exactly the recipe's weights
    (up to rounding) -- which is what makes each `fisher_X` reduce to mergekit's `X`. Elements
    where every Fisher is 0 get factor 1. Built in one buffer: n+1 tensors of memory.
    """
    out = torch.empty((len(fishers), *shape), dtype=dtype, device=fishers[0].device)
    for index, fisher in enumerate(fishers):
        out[index].copy_(fisher.expand(shape))
    mean = out.mean(dim=0)
    empty = mean <= 0
    if bool(empty.any()):
        out[:, empty] = 1.0
        mean[empty] = 1.0
    out.div_(mean)
    scale = torch.tensor(list(weights), dtype=dtype, device=out.device)
    return out.mul_(scale.view(-1, *([1] * len(shape))))


def fisher_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify_delta: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
    consensus: Optional[str] = None,
    normalize: bool = False,
    lambda_: float = 1.0,
    mask_dtype: Optional[torch.dtype] = None,
    observe_kept: Optional[Callable[[torch.Tensor], None]] = None,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic with per-element weights wᵢ·F̃ᵢ/meanⱼ(F̃ⱼ).

    Mirrors ``GeneralizedTaskArithmeticMerge.merge_group`` step by step (sparsify each delta,
    weight, TIES sign consensus on the weighted deltas, normalize by the weight mass of the agreeing
    models, scale by lambda); only the scalar weight became a tensor.
    `sparsify_delta(i, delta)` sparsifies model i's delta (mergekit.sparsify, same RNG order).
    `consensus` is None, "sum" or "count" (mergekit's TIES mask, `get_mask`).
    `observe_kept`, if given, is called with the [n, *shape] bool mask of the deltas the merge
    uses: those that survived sparsification and (with `consensus`) agree with the elected sign.
    """
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    if not tensors:
        return base
    deltas = base.new_empty((len(tensors), *base.shape))
    for index, tensor in enumerate(tensors):
        delta = tensor - base
        if sparsify_delta is not None:
            delta = sparsify_delta(index, delta)
        deltas[index] = delta
        del delta

    element_weights = fisher_element_weights(fishers, weights, base.shape, dtype=base.dtype)
    deltas.mul_(element_weights)

    if observe_kept is not None:
        # a zero (dropped, or zero-weight) delta never agrees with a sign: get_mask excludes it too
        kept = deltas != 0
        if consensus:
            kept &= get_mask(deltas, method=consensus, mask_dtype=mask_dtype or base.dtype).bool()
        observe_kept(kept)
    if consensus:
        mask = get_mask(deltas, method=consensus, mask_dtype=mask_dtype or base.dtype)
        mixed_delta = (deltas * mask).sum(dim=0)
        divisor = (element_weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed_delta = deltas.sum(dim=0)
        divisor = element_weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1

    if normalize:
        mixed_delta /= divisor
    if lambda_ != 1:
        mixed_delta *= lambda_
    return (base + mixed_delta).to(base.dtype)
