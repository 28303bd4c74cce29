"""The two ways of squaring per-example linear-map gradients against a brute-force einsum, over
every branch: wide and tall weights (transposed scratch), one or several examples per matmul, row
blocks, padded tokens, zero-weight and all-padding examples, and a float64 accumulator fed float32
gradients."""

from __future__ import annotations

import pytest
import torch

from mergekit_fisher.estimator import outer_squares
from mergekit_fisher.estimator.gradient_terms import OuterGrads, add_squared_sum


def brute_force(left, right, weights):
    per_example = torch.einsum(
        "btr,btc->brc", left.double(), right.double()
    )  # G_b, one example at a time
    return torch.einsum("b,brc->rc", weights.double(), per_example.square())


def make(batch, tokens, rows, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(batch, tokens, rows, generator=generator)
    right = torch.randn(batch, tokens, cols, generator=generator)
    lengths = torch.randint(1, tokens + 1, (batch,), generator=generator)
    for b, length in enumerate(
        lengths.tolist()
    ):  # right padding: zero output gradient after the end
        left[b, length:] = 0
    left[-1] = 0  # an example with no live token at all
    weights = torch.rand(batch, generator=generator)
    weights[1] = 0  # e.g. a skipped sample
    return left, right, weights


@pytest.mark.parametrize("rows,cols", [(12, 5), (5, 12), (7, 7)])
@pytest.mark.parametrize(
    "budget",
    [1, 40, 150, 1 << 18],
    ids=["1-row blocks", "row blocks", "2-3 examples per matmul", "whole batch"],
)
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64])
def test_per_example_and_batched_equal_brute_force(rows, cols, budget, target_dtype, monkeypatch):
    monkeypatch.setattr(outer_squares, "BLOCK_ELEMENTS_CPU", budget)
    left, right, weights = make(6, 4, rows, cols, seed=rows * 100 + cols)
    expected = brute_force(left, right, weights)
    assert float(expected.abs().max()) > 0

    def batched(target, left, right, weights):  # the GPU's way, one batched matmul per row block
        add_squared_sum(target, [OuterGrads(left, right)], weights, budget)

    for add in (outer_squares.add_per_example, batched):
        target = torch.full((rows, cols), 0.5, dtype=target_dtype)  # adds to what is there
        add(target, left, right, weights)
        torch.testing.assert_close(
            target.double(), expected + 0.5, rtol=1e-5, atol=1e-5, msg=add.__name__
        )


def test_live_spans_skip_only_exact_zero_rows():
    left = torch.zeros(3, 5, 2)
    right = torch.ones(3, 5, 4)
    left[0, 1:4] = 1.0
    left[1, 4, 1] = float("nan")  # NaN is not zero: kept, so it reaches the non-finite checks
    first, last = outer_squares.live_spans(left, right)
    assert (first, last) == ([1, 4, 5], [3, 4, -1])
