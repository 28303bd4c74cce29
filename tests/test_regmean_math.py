"""RegMean's closed form against independent references: least squares (torch.linalg.lstsq) on the
layer inputs themselves, the weighted average, and the paper's α formula written out by hand."""

import pytest
import torch

from mergekit_fisher.math import SingularGramError, regmean_merge, scale_off_diagonal

OUT, IN = 5, 7


def _problem(seed, n_models=3, rows=(20, 11, 30)):
    generator = torch.Generator().manual_seed(seed)
    xs, ws = [], []
    for index in range(n_models):
        # features at very different scales, so that a wrong formula is far off
        scale = torch.logspace(-1, 1, IN, dtype=torch.float64)
        xs.append(torch.randn(rows[index], IN, generator=generator, dtype=torch.float64) * scale)
        ws.append(torch.randn(OUT, IN, generator=generator, dtype=torch.float64))
    return xs, ws


def test_alpha_one_is_the_least_squares_minimizer():
    xs, ws = _problem(0)
    coefficients = [1.0, 2.5, 0.5]
    # min_W Σ cᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²  ==  ‖A Wᵀ − B‖² with A, B the stacked √cᵢ-scaled rows
    a = torch.cat([c**0.5 * x for x, c in zip(xs, coefficients)])
    b = torch.cat([c**0.5 * x @ w.T for x, w, c in zip(xs, ws, coefficients)])
    expected = torch.linalg.lstsq(a, b).solution.T
    merged = regmean_merge(ws, [x.T @ x for x in xs], coefficients, alpha=1.0, ridge=0.0)
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)
    # and it is not the plain average (the test could not pass by accident)
    assert (merged - sum(ws) / 3).abs().max() > 1e-2


def test_float32_inputs_are_solved_in_float64():
    xs, ws = _problem(1)
    grams = [(x.T @ x).float() for x in xs]
    merged = regmean_merge([w.float() for w in ws], grams, [1.0] * 3, alpha=1.0, ridge=0.0)
    assert merged.dtype == torch.float64
    a = torch.cat(xs)
    expected = torch.linalg.lstsq(a, torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha,ridge", [(1.0, 0.0), (0.9, 1e-6), (0.3, 1e-2)])
def test_equal_grams_give_the_weighted_average(alpha, ridge):
    xs, ws = _problem(2)
    gram = xs[0].T @ xs[0]
    coefficients = [1.0, 3.0, 0.5]
    merged = regmean_merge(ws, [gram] * 3, coefficients, alpha=alpha, ridge=ridge)
    expected = sum(c * w for c, w in zip(coefficients, ws)) / sum(coefficients)
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)


def test_alpha_follows_the_papers_formula():
    xs, ws = _problem(3)
    grams = [x.T @ x for x in xs]
    alpha = 0.6
    # G̃ = α G + (1 − α) diag(G), written out independently
    tilde = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    expected = torch.linalg.solve(sum(tilde), sum(t @ w.T for t, w in zip(tilde, ws))).T
    merged = regmean_merge(ws, grams, [1.0] * 3, alpha=alpha, ridge=0.0)
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scale_off_diagonal(grams[0], alpha), tilde[0])


def test_alpha_zero_is_a_per_feature_weighted_average():
    xs, ws = _problem(4)
    grams = [x.T @ x for x in xs]
    merged = regmean_merge(ws, grams, [1.0, 2.0, 1.0], alpha=0.0, ridge=0.0)
    for column in range(IN):
        d = [2.0 ** (i == 1) * g[column, column] for i, g in enumerate(grams)]
        expected = sum(di * w[:, column] for di, w in zip(d, ws)) / sum(d)
        torch.testing.assert_close(merged[:, column], expected, rtol=1e-10, atol=1e-10)


def test_ridge_gives_a_dead_feature_the_weighted_average():
    xs, ws = _problem(5)
    for x in xs:
        x[:, 2] = 0.0  # no model ever sees feature 2: every Gram is singular
    grams = [x.T @ x for x in xs]
    with pytest.raises(SingularGramError):
        regmean_merge(ws, grams, [1.0] * 3, alpha=1.0, ridge=0.0)
    merged = regmean_merge(ws, grams, [1.0] * 3, alpha=1.0, ridge=1e-12)
    torch.testing.assert_close(merged[:, 2], sum(w[:, 2] for w in ws) / 3, rtol=1e-8, atol=1e-8)
    # the other columns stay the least-squares solution of the features that were seen
    keep = [i for i in range(IN) if i != 2]
    a = torch.cat([x[:, keep] for x in xs])
    b = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(merged[:, keep], expected, rtol=1e-6, atol=1e-6)


def test_all_zero_grams_give_the_weighted_average():
    _, ws = _problem(6)
    zero = torch.zeros(IN, IN, dtype=torch.float64)
    merged = regmean_merge(ws, [zero] * 3, [1.0, 1.0, 2.0])
    torch.testing.assert_close(merged, (ws[0] + ws[1] + 2 * ws[2]) / 4)
