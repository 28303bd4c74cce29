"""Sampled Fisher: same draws as an independent batch-1 reference, reproducible per seed, independent of
batching, and its Monte Carlo mean approaches the exact expectation on a tiny classifier."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import tiny
from estimator_helpers import IGNORE, assert_fisher_close, compute, lm_reference_examples
from mergekit_fisher.estimator.objectives import draw_seed

ROWS = [
    {"text": tiny.CORPUS[1]},
    {"prompt": "q: fisher?", "completion": " yes"},
    {"text": tiny.CORPUS[7]},
    {"text": "a b c"},
    {"text": tiny.CORPUS[3]},
]
CLS_ROWS = [{"text": t, "label": i % 2} for i, t in enumerate(tiny.CORPUS[:4])]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("sampled")
    lm = str(root / "lm")
    tiny.make_llama(lm, seed=5, tie=True, tokenizer_dir=tokenizer_dir)
    cls = str(root / "cls")
    tiny.make_llama_classifier(cls, seed=6, num_labels=2, tokenizer_dir=tokenizer_dir)
    return {
        "lm": lm, "cls": cls, "tokenizer": AutoTokenizer.from_pretrained(tokenizer_dir),
        "lm_data": tiny.write_jsonl(str(root / "lm.jsonl"), ROWS),
        "cls_data": tiny.write_jsonl(str(root / "cls.jsonl"), CLS_ROWS),
    }


def sampled_reference(model, examples, *, seed: int, samples: int) -> dict:
    """Batch-1 loop; the label at each predicted position is drawn by inverse CDF from the uniforms of the
    documented stream (seed, example index, sample index); gradient of the summed log-likelihood, squared."""
    model = model.double().eval()
    named = dict(model.named_parameters())
    for p in named.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p) for n, p in named.items()}
    for index, (ids, labels) in enumerate(examples):
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        positions = [t for t in range(len(ids) - 1) if labels[t + 1] != IGNORE]
        for k in range(samples):
            generator = torch.Generator().manual_seed(draw_seed(seed, index, k))
            uniforms = torch.rand(len(positions), generator=generator, dtype=torch.float64)
            total = 0
            for t, u in zip(positions, uniforms):
                cdf = logp[t].detach().exp().cumsum(0)
                token = min(int((cdf < u * cdf[-1]).sum()), cdf.numel() - 1)
                total = total + logp[t, token]
            grads = torch.autograd.grad(total, list(named.values()), retain_graph=True)
            for n, g in zip(named, grads):
                sums[n] += g.double() ** 2 / samples
    return {n: v / len(examples) for n, v in sums.items()}


def test_sampled_lm_equals_reference_draws(world, tmp_path):
    got = compute(world["lm"], str(tmp_path / "f"), world["lm_data"], fisher_type="sampled", samples=2, seed=11,
                  batch_size=4, dtype="float64", accumulator_dtype="float64")
    reference = sampled_reference(LlamaForCausalLM.from_pretrained(world["lm"], dtype=torch.float64),
                                  lm_reference_examples(world["tokenizer"], ROWS), seed=11, samples=2)
    assert_fisher_close(got, reference)


def test_sampled_reproducible_and_independent_of_batching(world, tmp_path):
    run = lambda name, **kw: compute(world["lm"], str(tmp_path / name), world["lm_data"], fisher_type="sampled",
                                     dtype="float64", accumulator_dtype="float64", **kw)
    first = run("a", seed=1, batch_size=2)
    again = run("b", seed=1, batch_size=2)
    other_batching = run("c", seed=1, batch_size=5)
    other_seed = run("d", seed=2, batch_size=2)
    for name in first:
        assert torch.equal(first[name], again[name]), name
        torch.testing.assert_close(other_batching[name], first[name], rtol=1e-5, atol=1e-12)
    differs = sum(not torch.allclose(other_seed[n], first[n], rtol=1e-3) for n in first)
    assert differs == len(first)


def test_sampled_mean_approaches_exact_on_classifier(world, tmp_path):
    common = dict(task="seq-cls", batch_size=4, dtype="float64", accumulator_dtype="float64")
    exact = compute(world["cls"], str(tmp_path / "exact"), world["cls_data"], fisher_type="exact", **common)
    empirical = compute(world["cls"], str(tmp_path / "emp"), world["cls_data"], fisher_type="empirical", **common)
    runs = [compute(world["cls"], str(tmp_path / f"s{seed}"), world["cls_data"], fisher_type="sampled",
                    samples=100, seed=seed, **common) for seed in range(4)]
    flat = lambda d: torch.cat([d[n].double().flatten() for n in sorted(exact)])
    target = flat(exact)
    mean = sum(flat(r) for r in runs) / len(runs)
    one = flat(runs[0])
    error = lambda v: float((v - target).norm() / target.norm())
    assert error(mean) < 0.05  # 400 draws per example (2 classes)
    assert error(mean) < error(one)  # more draws, closer
    assert error(flat(empirical)) > 5 * error(mean)  # and it is not just the empirical Fisher


def test_sampled_classifier_equals_reference_draws(world, tmp_path):
    """K separate draws, one backward each (the reference) == the grouped-by-class passes of `compute`."""
    from transformers import LlamaForSequenceClassification

    samples, seed = 3, 7
    got = compute(world["cls"], str(tmp_path / "f"), world["cls_data"], task="seq-cls", fisher_type="sampled",
                  samples=samples, seed=seed, batch_size=4, dtype="float64", accumulator_dtype="float64")
    model = LlamaForSequenceClassification.from_pretrained(world["cls"], dtype=torch.float64).eval()
    named = dict(model.named_parameters())
    for p in named.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p) for n, p in named.items()}
    tokenizer = world["tokenizer"]
    for index, row in enumerate(CLS_ROWS):
        logp = torch.log_softmax(model(input_ids=torch.tensor([tokenizer(row["text"])["input_ids"]])).logits[0], -1)
        for k in range(samples):
            u = torch.rand(1, generator=torch.Generator().manual_seed(draw_seed(seed, index, k)), dtype=torch.float64)
            cdf = logp.detach().exp().cumsum(0)
            label = int((cdf < u * cdf[-1]).sum())
            grads = torch.autograd.grad(logp[label], list(named.values()), retain_graph=True)
            for n, g in zip(named, grads):
                sums[n] += g ** 2 / samples
    assert_fisher_close(got, {n: v / len(CLS_ROWS) for n, v in sums.items()})
