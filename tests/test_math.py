"""The pure math, on values small enough to compute by hand."""

import pytest
import torch

from mergekit_fisher.math import fisher_task_arithmetic, fisher_weighted_average, normalize_fisher, fisher_element_weights


def test_weighted_average_by_hand():
    a, b = torch.tensor([0.0, 10.0]), torch.tensor([4.0, 20.0])
    fa, fb = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    merged = fisher_weighted_average([a, b], [fa, fb], [1.0, 2.0])
    # element 0: (1*3*0 + 2*1*4) / (3 + 2) = 1.6 ; element 1: (10 + 40) / 3
    torch.testing.assert_close(merged, torch.tensor([1.6, 50.0 / 3.0]))


def test_floor_and_zero_fisher_fall_back_to_weighted_average():
    a, b = torch.tensor([1.0]), torch.tensor([3.0])
    zero = torch.zeros(1)
    for floor in (0.0, 1e-3):
        merged = fisher_weighted_average([a, b], [zero, zero], [1.0, 3.0], floor=floor)
        torch.testing.assert_close(merged, torch.tensor([2.5]))


def test_scalar_fisher_broadcasts_as_uniform():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    merged = fisher_weighted_average([a, b], [torch.tensor(1.0), torch.tensor([[1.0, 3.0]])], [1.0, 1.0])
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


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="unknown Fisher normalization"):
        normalize_fisher(torch.ones(2), "max")


def test_element_weights_average_to_the_recipe_weights():
    out = fisher_element_weights([torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])], [1.0, 2.0], (2,))
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
    # TIES sum consensus, normalized: element 1 weighted deltas -2 and 2 -> sum 0 -> sign +, only b agrees
    out = fisher_task_arithmetic(base, [a, b], [fa, fb], [1.0, 1.0], consensus="sum", normalize=True)
    torch.testing.assert_close(out, torch.tensor([(0.5 * 1 + 1.5 * 3) / 2.0, 2.0]))
