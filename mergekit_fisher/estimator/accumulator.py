"""Sums of weighted squared per-example gradients, kept in float32 or float64 whatever the model dtype."""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from mergekit_fisher.estimator.gradient_terms import OuterGrads, RowGrads, grad_dtype, on_device
from mergekit_fisher.math import working_dtype

# Per-example gradient blocks (elements). On a CPU one example's block is formed by a matmul and squared
# into the accumulator while still in L2 cache; bench/bench_compute.py: this per-example loop is 1.2-1.7x
# faster than one batched matmul + square + reduce. GPUs prefer a few big batched matmuls.
BLOCK_ELEMENTS_CPU = 1 << 18
BLOCK_ELEMENTS_GPU = 1 << 26
PER_EXAMPLE_LOOP_DEVICES = ("cpu",)


def _nonzero_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, T) bool, row has a non-zero (or NaN) entry; amax/amin are ~10x faster than ne().any()."""
    return tensor.amax(-1).ne(0) | tensor.amin(-1).ne(0)


class FisherAccumulator:
    """`sums[key] += sum_b w_b * G_b**2`, keyed by parameter key (a stable string chosen by the planner)."""

    def __init__(self, shapes: Dict[str, torch.Size], *, dtype: torch.dtype, devices: Dict[str, torch.device]):
        self.dtype = dtype
        self.sums: Dict[str, torch.Tensor] = {
            key: torch.zeros(shape, dtype=dtype, device=devices[key]) for key, shape in shapes.items()
        }

    def add_terms(self, key: str, terms: Sequence, weights: torch.Tensor) -> None:
        """``sums[key] += sum_b w_b * (sum of the terms' G_b)**2`` (see gradient_terms): summed, THEN squared."""
        if len(terms) == 1:
            (term,) = terms
            if isinstance(term, OuterGrads):
                return self.add_outer(key, term.left, term.right, weights)
            if isinstance(term, RowGrads):
                return self.add_rows(key, term.rows, term.values, weights.to(term.values.device)[term.examples])
            return self.add_dense(key, term.per_example, weights)
        target = self.sums[key]
        rows = target.shape[0] if target.dim() else 1
        cols = target.numel() // rows
        batch, device = weights.numel(), target.device
        dtype = working_dtype(grad_dtype(terms[0]))
        terms = [on_device(term, device) for term in terms]
        # row blocks of all B examples at once, bounded in size: never the whole B x rows x cols
        budget = BLOCK_ELEMENTS_CPU * 4 if device.type in PER_EXAMPLE_LOOP_DEVICES else BLOCK_ELEMENTS_GPU
        block = max(1, min(rows, budget // max(1, batch * cols)))
        edges = list(range(0, rows, block)) + [rows]
        row_parts = {id(t): t.split(edges) for t in terms if isinstance(t, RowGrads)}
        w = weights.to(device=device, dtype=dtype).unsqueeze(0)
        target_2d = target.view(rows, cols)
        for i, (start, stop) in enumerate(zip(edges, edges[1:])):
            out = torch.zeros(batch, stop - start, cols, dtype=dtype, device=device)
            for term in terms:
                if isinstance(term, RowGrads):
                    RowGrads.add_block(out, row_parts[id(term)][i])
                else:
                    term.add_block(out, start, stop)
            total = w.matmul(out.square_().reshape(batch, -1)).reshape(stop - start, cols)
            target_2d[start:stop].add_(total.to(self.dtype))

    def add_dense(self, key: str, per_example: torch.Tensor, weights: torch.Tensor) -> None:
        """`per_example`: (B, *shape) gradients; squared here (in place: callers hand over ownership)."""
        target = self.sums[key]
        squared = per_example.square_() if not per_example.requires_grad else per_example.square()
        flat = squared.reshape(squared.shape[0], -1)
        # w @ G**2 : the weighted sum over examples as one matrix-vector product
        total = weights.to(flat.dtype).unsqueeze(0).matmul(flat).reshape(target.shape)
        target.add_(total.to(device=target.device, dtype=self.dtype))

    def add_outer(self, key: str, left: torch.Tensor, right: torch.Tensor, weights: torch.Tensor) -> None:
        """``sums[key] += sum_b w_b * (left_b^T right_b)**2`` for left (B, T, R), right (B, T, C): the per-example
        gradient of a linear map summed over its T tokens, never the batch-summed one."""
        target = self.sums[key]
        dtype = working_dtype(left.dtype)
        if left.device.type in PER_EXAMPLE_LOOP_DEVICES and target.device == left.device:
            self._add_outer_per_example(target, left.to(dtype), right.to(dtype), weights)
            return
        batch, rows, cols = left.shape[0], left.shape[2], right.shape[2]
        left_t = left.to(dtype).transpose(1, 2)  # (B, R, T)
        right = right.to(dtype)
        block = max(1, BLOCK_ELEMENTS_GPU // max(1, batch * cols))
        w = weights.to(device=left.device, dtype=dtype).unsqueeze(0)
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            squared = torch.bmm(left_t[:, start:stop], right).square_().reshape(batch, -1)
            total = w.matmul(squared).reshape(stop - start, cols)
            target[start:stop].add_(total.to(device=target.device, dtype=self.dtype))

    @staticmethod
    def _add_outer_per_example(target, left, right, weights) -> None:
        rows, cols = left.shape[2], right.shape[2]
        # tokens whose output gradient is exactly zero (padding, positions after the last label) add nothing
        # to left_b^T right_b: each example uses only its span of non-zero rows
        live = _nonzero_rows(left) & _nonzero_rows(right)  # (B, T)
        positions = torch.arange(live.shape[1]).expand_as(live)
        first = torch.where(live, positions, live.shape[1]).amin(1).tolist()
        last = torch.where(live, positions, -1).amax(1).tolist()
        block = max(1, min(rows, BLOCK_ELEMENTS_CPU // max(1, cols)))
        buffer = torch.empty(block, cols, dtype=left.dtype)
        left_t = left.transpose(1, 2)  # (B, R, T)
        blocks = [(start, min(rows, start + block)) for start in range(0, rows, block)]
        for b, weight in enumerate(weights.tolist()):
            if weight == 0 or last[b] < 0:
                continue
            span = slice(first[b], last[b] + 1)
            left_b, right_b = left_t[b, :, span], right[b, span]  # (R, t), (t, C)
            if len(blocks) == 1:  # the common case, kept free of per-block slicing (Python overhead)
                grad = torch.mm(left_b, right_b, out=buffer)
                target.addcmul_(grad, grad, value=weight)
                continue
            for start, stop in blocks:
                grad = torch.mm(left_b[start:stop], right_b, out=buffer[: stop - start])
                target[start:stop].addcmul_(grad, grad, value=weight)

    def add_rows(self, key: str, rows: torch.Tensor, row_grads: torch.Tensor, row_weights: torch.Tensor) -> None:
        """Sparse form (embeddings): row `rows[k]` receives `row_weights[k] * row_grads[k]**2`.

        Each (example, row) pair must appear once: the caller sums an example's contributions to a row first.
        """
        target = self.sums[key]
        squared = row_grads.square_().mul_(row_weights.to(row_grads.dtype).unsqueeze(-1))
        target.index_add_(0, rows.to(target.device), squared.to(device=target.device, dtype=self.dtype))

    def add_squared(self, key: str, squared_sum: torch.Tensor) -> None:
        target = self.sums[key]
        target.add_(squared_sum.to(device=target.device, dtype=self.dtype))

    # ---------------------------------------------------------------- state (checkpoints, reduce)
    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.sums[key].copy_(value.to(self.sums[key].device, self.dtype))
