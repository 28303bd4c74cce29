"""``target += sum_b w_b * (left_b^T right_b)**2``: squared per-example gradients of a linear map,
on a CPU.

left (B, T, R), right (B, T, C); example b's gradient G_b = left_b^T right_b (R x C) sums over its T
tokens. Never the batch-summed gradient. GPUs form row blocks of all B examples in one batched
matmul (`gradient_terms.add_squared_sum`); on a CPU `add_per_example` keeps blocks in L2 cache while
every example's block is formed and squared into them (``addcmul_``), small layers taking a few
examples per batched matmul. bench/bench_compute.py --strategy compares the two: 1.6x the batched
way at hidden 1024.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

# elements of per-example gradient formed at once
BLOCK_ELEMENTS_CPU = (
    1 << 18
)  # 1 MiB of float32: the block, the buffer and the target block fit a 2-4 MiB L2
BLOCK_ELEMENTS_GPU = 1 << 26


def _nonzero_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, T) bool: the row has a non-zero (or NaN) entry; amax/amin are ~10x faster
    than ne().any()."""
    return tensor.amax(-1).ne(0) | tensor.amin(-1).ne(0)


def live_spans(left: torch.Tensor, right: torch.Tensor) -> Tuple[List[int], List[int]]:
    """Per example, the first and last token whose row is non-zero on both sides (last = -1: none).

    A token with a zero output gradient (padding, positions after the last label) adds exactly
    nothing to left_b^T right_b, so only the span between these needs multiplying.
    """
    live = _nonzero_rows(left) & _nonzero_rows(right)
    positions = torch.arange(live.shape[1], device=live.device).expand_as(live)
    first = torch.where(live, positions, live.shape[1]).amin(1).tolist()
    last = torch.where(live, positions, -1).amax(1).tolist()
    return first, last


def add_per_example(
    target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, weights: torch.Tensor
) -> None:
    # Small-K matmuls run faster with the longer side as output rows, so a wide weight (R < C) forms
    # G_b^T = right_b^T left_b instead, in a scratch block whose transpose is added at the end of
    # the block.
    transposed = left.shape[2] < right.shape[2]
    if transposed:
        left, right, target = right, left, target.t()
    batch, rows, cols = left.shape[0], left.shape[2], right.shape[2]
    dtype = left.dtype
    first, last = live_spans(left, right)
    weight_list = weights.tolist()
    w = weights.to(dtype)
    block = max(1, min(rows, BLOCK_ELEMENTS_CPU // cols))
    chunk = max(
        1, min(batch, BLOCK_ELEMENTS_CPU // (block * cols))
    )  # small layers: examples per bmm
    groups = [(start, min(batch, start + chunk)) for start in range(0, batch, chunk)]
    left_t = left.transpose(1, 2)  # (B, R, T)
    buffer = torch.empty(chunk, block, cols, dtype=dtype)
    in_place = not transposed and target.dtype == dtype
    scratch = None if in_place else torch.empty(block, cols, dtype=dtype)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        size = stop - start
        acc = target[start:stop] if in_place else scratch[:size].zero_()
        for lo, hi in groups:
            span = slice(min(first[lo:hi]), max(last[lo:hi]) + 1)
            if span.stop <= 0:
                continue
            if hi - lo == 1:
                if weight_list[lo] == 0:
                    continue
                grad = torch.mm(left_t[lo, start:stop, span], right[lo, span], out=buffer[0, :size])
                acc.addcmul_(grad, grad, value=weight_list[lo])
            else:
                grads = torch.bmm(
                    left_t[lo:hi, start:stop, span],
                    right[lo:hi, span],
                    out=buffer[: hi - lo, :size],
                )
                acc.view(-1).addmv_(grads.square_().view(hi - lo, -1).t(), w[lo:hi])
        if not in_place:
            target[start:stop].add_(acc.to(target.dtype))
