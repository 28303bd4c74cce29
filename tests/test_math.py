"""The pure math, on values small enough to compute by hand."""

import pytest
import torch

from mergekit_fisher.math import (
    fisher_element_weights,
    fisher_task_arithmetic,
    fisher_weighted_average,
    normalize_fisher,
)


def test_weighted_average_by_hand():
    a, b = torch.tensor([0.0, 10.0]), torch.tensor([4.0, 20.0])
    fa, fb = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    merged = fisher_weighted_average([a, b], [fa, fb], [1.0, 2.0])
    # element 0: (1*3*0 + 2*1*4) / (3 + 2) = 1.6 ; element 1: (10 + 40) / 3
    torch.testing.assert_close(merged, torch.tensor([1.6, 50.0 / 3.0]))


def test_zero_or_equal_fishers_fall_back_to_weighted_average():
    a, b = torch.tensor([1.0]), torch.tensor([3.0])
    for fisher in (torch.zeros(1), torch.full((1,), 1e-3)):
        merged = fisher_weighted_average([a, b], [fisher, fisher], [1.0, 3.0])
        torch.testing.assert_close(merged, torch.tensor([2.5]))


def test_scalar_fisher_broadcasts_as_uniform():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    merged = fisher_weighted_average(
        [a, b], [torch.tensor(1.0), torch.tensor([[1.0, 3.0]])], [1.0, 1.0]
    )
    torch.testing.assert_close(merged, torch.tensor([[2.0, (2.0 + 18.0) / 4.0]]))


@pytest.mark.parametrize(
    "mode,kwargs,expected",
    [
        ("mean", {"global_mean": 2.0}, [0.5, 1.0, 2.0]),
        ("l2", {"global_l2": 4.0}, [0.25, 0.5, 1.0]),
        ("tensor", {}, [1 / (7 / 3), 2 / (7 / 3), 4 / (7 / 3)]),
        ("none", {}, [1.0, 2.0, 4.0]),
    ],
)
def test_normalizations(mode, kwargs, expected):
    out = normalize_fisher(torch.tensor([1.0, 2.0, 4.0]), mode, **kwargs)
    torch.testing.assert_close(out, torch.tensor(expected))


@pytest.mark.parametrize(
    "mode,kwargs,level",
    [
        ("mean", {"global_mean": 2.0}, 0.1),  # (F + 0.1·2) / 2 = F/2 + 0.1
        ("l2", {"global_mean": 2.0, "global_l2": 4.0}, 0.05),  # (F + 0.1·2) / 4
        ("tensor", {}, 0.1),  # (F + 0.1·7/3) / (7/3)
        ("none", {"global_mean": 2.0}, 0.2),  # F + 0.1·2
    ],
)
def test_floor_is_relative_to_the_mean_fisher(mode, kwargs, level):
    fisher = torch.tensor([1.0, 2.0, 4.0])
    plain = normalize_fisher(fisher, mode, **kwargs)
    floored = normalize_fisher(fisher, mode, floor=0.1, **kwargs)
    torch.testing.assert_close(floored - plain, torch.full((3,), level))


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="unknown Fisher normalization"):
        normalize_fisher(torch.ones(2), "max")


def test_element_weights_average_to_the_recipe_weights():
    out = fisher_element_weights(
        [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])], [1.0, 2.0], (2,)
    )
    # factors [0.5, 1] and [1.5, 1] (an all-zero element gets factor 1), times weights 1 and 2
    torch.testing.assert_close(out, torch.tensor([[0.5, 1.0], [3.0, 2.0]]))
    # a scalar (uniform) Fisher broadcasts: [1, 3] vs 2 -> means [1.5, 2.5]
    out = fisher_element_weights([torch.tensor([1.0, 3.0]), torch.tensor(2.0)], [1.0, 1.0], (2,))
    torch.testing.assert_close(out, torch.tensor([[1 / 1.5, 3 / 2.5], [2 / 1.5, 2 / 2.5]]))


def test_task_arithmetic_by_hand():
    base = torch.tensor([0.0, 0.0])
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])
    fa, fb = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0])
    # relative factors: [0.5, 1], [1.5, 1]; no normalize: base + Σ w·r·δ
    out = fisher_task_arithmetic(base, [a, b], [fa, fb], [1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([0.5 * 1 + 1.5 * 3, -2.0 + 2.0]))
    # TIES sum consensus, normalized: element 1 weighted deltas -2 and 2 -> sum 0 -> sign +,
    # only b agrees
    out = fisher_task_arithmetic(
        base, [a, b], [fa, fb], [1.0, 1.0], consensus="sum", normalize=True
    )
    torch.testing.assert_close(out, torch.tensor([(0.5 * 1 + 1.5 * 3) / 2.0, 2.0]))


def test_l2_merge_of_large_skewed_fishers_is_not_a_plain_average():
    """At millions of elements l2-normalized values are ~1/√N: an absolute 1e-6 floor would swamp
    most of them and turn the merge into a plain average. The relative floor does not."""
    n = 4_000_000
    generator = torch.Generator().manual_seed(0)
    fishers = [torch.exp(3 * torch.randn(n, generator=generator)) for _ in range(2)]
    thetas = [torch.zeros(n), torch.ones(n)]
    floored = []
    for fisher in fishers:
        flat = fisher.double()
        mean, l2 = float(flat.mean()), float(flat.square().sum().sqrt())
        assert float((flat / l2 < 1e-6).double().mean()) > 0.5  # what an absolute floor would swamp
        floored.append(normalize_fisher(fisher, "l2", global_mean=mean, global_l2=l2, floor=1e-6))
    merged = fisher_weighted_average(thetas, floored, [1.0, 1.0])
    # reference: θ* = F̃₁ / (F̃₀ + F̃₁) with F̃ᵢ = (Fᵢ + 1e-6·meanᵢ) / l2ᵢ, in float64
    ref = [
        (f.double() + 1e-6 * f.double().mean()) / f.double().square().sum().sqrt() for f in fishers
    ]
    torch.testing.assert_close(merged.double(), ref[1] / (ref[0] + ref[1]), rtol=1e-4, atol=1e-6)
    near_plain = ((merged - 0.5).abs() < 0.01).double().mean()
    assert float(near_plain) < 0.05
