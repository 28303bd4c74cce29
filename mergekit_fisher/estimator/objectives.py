"""What gets differentiated: one or more weighted "passes" per batch.

A pass is (targets, weights): the loss is ``-sum_b log p(targets_b | x_b)`` (each example's SUMMED
log-likelihood) and example b's squared gradient is accumulated with weight ``weights[b]``.

* empirical: the data's own tokens / labels, weight 1;
* sampled:   targets drawn from the model's own predictive distribution (the true Fisher by
             Monte Carlo), K draws, weight 1/K each; the draw for (example index, sample index)
             uses its own generator seeded from (seed, example index, sample index) --
             independent of batching and process count;
* exact:     classifiers only, one pass per class c with weight p(c|x):
             sum_c p(c|x) (d log p(c|x))**2.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

import torch

from mergekit_fisher.math import working_dtype

IGNORE = -100
FISHER_TYPES = ("empirical", "sampled", "exact")


def lm_loglik(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-likelihood; `logits` (B, T, V) predict `targets` (B, T-1) = labels shifted
    left."""
    logp = torch.log_softmax(logits[:, :-1].to(working_dtype(logits.dtype)), dim=-1)
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(1)


def cls_loglik(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.to(working_dtype(logits.dtype)), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def draw_seed(seed: int, example_index: int, sample_index: int) -> int:
    digest = hashlib.sha256(
        f"mergekit-fisher:{seed}:{example_index}:{sample_index}".encode()
    ).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _uniforms(seed: int, example_index: int, sample_index: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(draw_seed(seed, example_index, sample_index))
    return torch.rand(count, generator=generator, dtype=torch.float64)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One category per row of `probs` (n, V) by inverse-CDF sampling with the given uniforms
    (n,)."""
    cdf = probs.to(torch.float64).cumsum(-1)
    u = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def lm_passes(
    fisher_type: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    indices: Sequence[int],
    *,
    samples: int,
    seed: int,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    targets = labels[:, 1:]
    batch = labels.shape[0]
    ones = torch.ones(batch, dtype=torch.float64, device=logits.device)
    if fisher_type == "empirical":
        return [(targets, ones)]
    if fisher_type != "sampled":
        raise ValueError(f"fisher type {fisher_type!r} is not available for language models")
    mask = targets != IGNORE
    # per example and only at predicted rows: a (B, T, V) float64 copy of a big-vocabulary model's
    # probabilities would cost more memory than the model
    rows_of = [mask[b].nonzero().squeeze(-1) for b in range(batch)]
    drawn_all = [torch.full_like(targets, IGNORE) for _ in range(samples)]
    with torch.no_grad():
        for b, index in enumerate(indices):
            rows = rows_of[b]
            if not rows.numel():
                continue
            probs = torch.softmax(logits[b, rows].detach().to(torch.float64), dim=-1)
            for k in range(samples):
                u = _uniforms(seed, index, k, rows.numel())
                drawn_all[k][b, rows] = _inverse_cdf(probs, u).to(targets.dtype)
    return [(drawn, ones / samples) for drawn in drawn_all]


def cls_passes(
    fisher_type: str,
    logits: torch.Tensor,
    labels: torch.Tensor,
    indices: Sequence[int],
    *,
    samples: int,
    seed: int,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    batch, classes = logits.shape
    ones = torch.ones(batch, dtype=torch.float64, device=logits.device)
    if fisher_type == "empirical":
        return [(labels, ones)]
    with torch.no_grad():
        probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    if fisher_type == "exact":
        return [(torch.full_like(labels, c), probs[:, c].clone()) for c in range(classes)]
    # K draws of one example only ever hit C distinct classes, and every draw of class c gives the
    # same squared gradient: one pass per drawn class with weight (count of c) / K equals K passes,
    # exactly.
    counts = torch.zeros(batch, classes, dtype=torch.float64, device=logits.device)
    for k in range(samples):
        u = torch.stack([_uniforms(seed, index, k, 1)[0] for index in indices])
        drawn = _inverse_cdf(probs, u)
        counts[torch.arange(batch, device=logits.device), drawn] += 1
    return [
        (torch.full_like(labels, c), counts[:, c] / samples)
        for c in range(classes)
        if bool(counts[:, c].any())
    ]
