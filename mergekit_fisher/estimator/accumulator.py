"""Sums of weighted squared per-example gradients, kept in float32 or float64 whatever the model
dtype."""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from mergekit_fisher.estimator import outer_squares
from mergekit_fisher.estimator.gradient_terms import (
    DenseGrads,
    ExpertGrads,
    OuterGrads,
    RowGrads,
    add_squared_sum,
)

# devices where per-example gradients are formed example by example (see outer_squares)
PER_EXAMPLE_LOOP_DEVICES = ("cpu",)


class FisherAccumulator:
    """`sums[key] += sum_b w_b * G_b**2`, keyed by parameter key (a stable string chosen by the
    planner)."""

    def __init__(
        self, shapes: Dict[str, torch.Size], *, dtype: torch.dtype, devices: Dict[str, torch.device]
    ):
        self.dtype = dtype
        self.sums: Dict[str, torch.Tensor] = {
            key: torch.zeros(shape, dtype=dtype, device=devices[key])
            for key, shape in shapes.items()
        }

    def add_terms(self, key: str, terms: Sequence, weights: torch.Tensor) -> None:
        """``sums[key] += sum_b w_b * (sum of the terms' G_b)**2`` (see gradient_terms): summed,
        THEN squared."""
        target = self.sums[key]
        if isinstance(terms[0], ExpertGrads):  # disjoint slices [e]: each squared on its own
            for expert, term in ExpertGrads.merged(terms).items():
                _add_terms_to(target[expert], [term], weights)
            return
        if len(terms) == 1:
            (term,) = terms
            if isinstance(term, RowGrads):
                return self.add_rows(
                    key, term.rows, term.values, weights.to(term.values.device)[term.examples]
                )
            if isinstance(term, DenseGrads):
                return self.add_dense(key, term.per_example, weights)
        _add_terms_to(target, terms, weights)

    def add_dense(self, key: str, per_example: torch.Tensor, weights: torch.Tensor) -> None:
        """`per_example`: (B, *shape) gradients; squared here (in place: callers hand over
        ownership)."""
        target = self.sums[key]
        squared = per_example.square_() if not per_example.requires_grad else per_example.square()
        flat = squared.reshape(squared.shape[0], -1)
        # w @ G**2 : the weighted sum over examples as one matrix-vector product
        total = weights.to(flat.dtype).unsqueeze(0).matmul(flat).reshape(target.shape)
        target.add_(total.to(device=target.device, dtype=self.dtype))

    def add_rows(
        self, key: str, rows: torch.Tensor, row_grads: torch.Tensor, row_weights: torch.Tensor
    ) -> None:
        """Sparse form (embeddings): row `rows[k]` receives `row_weights[k] * row_grads[k]**2`.

        Each (example, row) pair must appear once: the caller sums an example's contributions to a
        row first.
        """
        target = self.sums[key]
        squared = row_grads.square_().mul_(row_weights.to(row_grads.dtype).unsqueeze(-1))
        target.index_add_(
            0, rows.to(target.device), squared.to(device=target.device, dtype=self.dtype)
        )

    def add_squared(self, key: str, squared_sum: torch.Tensor) -> None:
        target = self.sums[key]
        target.add_(squared_sum.to(device=target.device, dtype=self.dtype))

    # ---------------------------------------------------------------- state (checkpoints, reduce)
    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.sums[key].copy_(value.to(self.sums[key].device, self.dtype))


def _add_terms_to(target: torch.Tensor, terms: Sequence, weights: torch.Tensor) -> None:
    """``target += sum_b w_b * (sum of the terms' G_b)**2`` for linear-map terms (and mixes)."""
    per_example_device = target.device.type in PER_EXAMPLE_LOOP_DEVICES
    if len(terms) == 1 and isinstance(terms[0], OuterGrads):
        (term,) = terms
        if per_example_device and term.left.device == target.device:
            return outer_squares.add_per_example(target, term.left, term.right, weights)
    # row blocks of all B examples at once (a CPU's blocks a few L2-sized per-example blocks big)
    budget = (
        outer_squares.BLOCK_ELEMENTS_CPU * 4
        if per_example_device
        else outer_squares.BLOCK_ELEMENTS_GPU
    )
    add_squared_sum(target, terms, weights, budget)
