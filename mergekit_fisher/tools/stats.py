"""Summary statistics of Fisher tensors, computed one tensor at a time and merged into groups.

Sums run in float64. NaN/Inf values are counted, not summed: `sum`, `mean`, `min` and `max` cover
the finite elements only, so one bad value does not hide the rest of the picture.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch


def _opt(op, a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None:
        return b
    if b is None:
        return a
    return op(a, b)


@dataclass(frozen=True)
class Summary:
    tensors: int = 0
    numel: int = 0
    finite: int = 0  # finite elements: the ones sum/mean/min/max describe
    sum: float = 0.0
    min: Optional[float] = None
    max: Optional[float] = None
    zeros: int = 0
    negative: int = 0
    nonfinite: int = 0

    @property
    def mean(self) -> Optional[float]:
        return self.sum / self.finite if self.finite else None

    @property
    def zero_fraction(self) -> Optional[float]:
        return self.zeros / self.numel if self.numel else None

    def __add__(self, other: "Summary") -> "Summary":
        return Summary(
            tensors=self.tensors + other.tensors,
            numel=self.numel + other.numel,
            finite=self.finite + other.finite,
            sum=self.sum + other.sum,
            min=_opt(min, self.min, other.min),
            max=_opt(max, self.max, other.max),
            zeros=self.zeros + other.zeros,
            negative=self.negative + other.negative,
            nonfinite=self.nonfinite + other.nonfinite,
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["mean"] = self.mean
        out["zero_fraction"] = self.zero_fraction
        return out


def summarize(values: torch.Tensor) -> Summary:
    """Statistics of one tensor (any float dtype; summed in float64).

    Three passes over the data in the common case (sum, min/max, zeros): the finite subset is
    found and copied only when NaN/Inf are present, negatives counted only when the minimum is < 0.
    """
    values = values.detach().reshape(-1)
    numel = int(values.numel())
    if numel == 0:
        return Summary(tensors=1)
    total = float(values.sum(dtype=torch.float64))
    if math.isfinite(total):
        # a float64 sum of float32/bf16 values cannot overflow, so a finite sum means every value
        # is finite: the common case skips the isfinite pass and its mask
        nfinite, finite_values = numel, values
    else:
        finite_mask = torch.isfinite(values)
        nfinite = int(finite_mask.sum())
        finite_values = values[finite_mask]
        total = float(finite_values.sum(dtype=torch.float64)) if nfinite else 0.0
    low = high = None
    negative = 0
    if nfinite:
        low_t, high_t = torch.aminmax(finite_values)
        low, high = float(low_t), float(high_t)
        if low < 0:
            negative = int((finite_values < 0).sum())
    if nfinite != numel:
        negative += int((values == float("-inf")).sum())
    return Summary(
        tensors=1,
        numel=numel,
        finite=nfinite,
        sum=total,
        min=low,
        max=high,
        zeros=numel - int(torch.count_nonzero(values)),
        negative=negative,
        nonfinite=numel - nfinite,
    )
