"""RegMean, per linear layer (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of
Language Models", arXiv 2212.09849).

For a layer y = x Wᵀ with W stored [out, in] (nn.Linear) and model i's inputs Xᵢ (rows = tokens),
the merge minimizes Σᵢ cᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²; with Gᵢ = XᵢᵀXᵢ (the Gram of the inputs, [in, in])
the minimizer is

    Wᵀ = (Σᵢ cᵢ G̃ᵢ)⁻¹ Σᵢ cᵢ G̃ᵢ Wᵢᵀ,      G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ)

where cᵢ are the recipe's weights and α scales the off-diagonal entries (the paper's "reduce
non-diagonal items": α = 1 is the exact least-squares merge, α = 0 a per-input-feature weighted
average; α < 1 keeps the system well conditioned when Grams are estimated from little data).

A singular Σ cᵢG̃ᵢ (an input feature no model ever saw) has no unique solution; the ridge
λ = `ridge` · mean(diag(Σ cᵢG̃ᵢ)) pulls the solution towards the weighted average W̄ instead:

    Wᵀ = (Σᵢ cᵢ G̃ᵢ + λI)⁻¹ (Σᵢ cᵢ G̃ᵢ Wᵢᵀ + λ W̄ᵀ)

which minimizes Σᵢ cᵢ‖XᵢWᵀ − XᵢWᵢᵀ‖² + λ‖W − W̄‖². A dead feature's column thus gets the plain
weighted average, equal Grams give exactly the weighted average whatever λ, and λ → 0 is RegMean.
Everything is computed in float64.
"""

from __future__ import annotations

from typing import Sequence

import torch

# the authors' own experiment configs (bloomberg/dataless-model-merging: T5 and DeBERTa,
# `regmean_reduce_nondiag: 0.1`; their RoBERTa/DistilBERT configs leave the Grams unscaled, 1.0)
DEFAULT_ALPHA = 0.1
DEFAULT_RIDGE = 1e-6


class SingularGramError(ValueError):
    """Σ cᵢG̃ᵢ + λI is not positive definite (λ = 0 and a feature no model saw, or a bad Gram)."""


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G): off-diagonal entries times α, the diagonal unchanged."""
    return scale_off_diagonal_(gram.clone(), alpha)


def scale_off_diagonal_(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place (no second [in, in] copy: a 14336-wide float64 Gram is 1.6 GB)."""
    diagonal = gram.diagonal().clone()
    gram.mul_(alpha)
    gram.diagonal().copy_(diagonal)
    return gram


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σᵢ cᵢ Tᵢ / Σᵢ cᵢ in float64 (what every tensor without a Gram gets, as in the paper)."""
    total = float(sum(weights))
    result = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor.to(torch.float64), alpha=float(weight) / total)
    return result


def regmean_merge(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    *,
    alpha: float = DEFAULT_ALPHA,
    ridge: float = DEFAULT_RIDGE,
) -> torch.Tensor:
    """The merged [out, in] weight (float64, on the weights' device) from each model's [out, in]
    weight, its [in, in] input Gram and its recipe weight cᵢ > 0 (see the module docstring)."""
    device = weights[0].device
    in_features = weights[0].shape[-1]
    average = weighted_average(weights, coefficients)
    system = torch.zeros((in_features, in_features), dtype=torch.float64, device=device)
    rhs = torch.zeros((in_features, weights[0].shape[0]), dtype=torch.float64, device=device)
    for weight, gram, coefficient in zip(weights, grams, coefficients):
        scaled = gram.to(device=device, dtype=torch.float64, copy=True)
        scale_off_diagonal_(scaled, alpha).mul_(float(coefficient))
        system.add_(scaled)
        rhs.addmm_(scaled, weight.to(torch.float64).T)
        del scaled
    level = float(system.diagonal().mean()) if in_features else 0.0
    if level <= 0.0:
        return average  # no model saw any input (all Grams zero): nothing to prefer
    if ridge:
        lam = ridge * level
        system.diagonal().add_(lam)
        rhs.add_(average.T, alpha=lam)
    factor, info = torch.linalg.cholesky_ex(system)
    del system
    if int(info) != 0:
        raise SingularGramError(
            f"the weighted sum of the Grams is not positive definite (leading minor {int(info)})"
        )
    return torch.cholesky_solve(rhs, factor).T
