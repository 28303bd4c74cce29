"""Parameters the hooks do not cover go through the exact batch-1 fallback; the total still equals
brute force."""

from __future__ import annotations

import tiny
import torch
from estimator_helpers import IGNORE, assert_fisher_close
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from mergekit_fisher.estimator.data import Example, collate
from mergekit_fisher.estimator.engine import FisherEngine


class OffsetRMSNorm(nn.Module):
    """Gemma-style ``x_hat * (1 + weight)`` with its epsilon hard-coded (no `eps` attribute): the
    formula cannot be verified against a known normalizer -> must fall back. (Gemma's own RMSNorm,
    with `eps`, is verified and fast: tests/test_families.py.)"""

    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class GainedNorm(nn.Module):
    """A custom module with a parameter named neither weight nor bias, around a covered RMSNorm."""

    def __init__(self, hidden: int):
        super().__init__()
        self.inner = LlamaRMSNorm(hidden)
        self.gain = nn.Parameter(1 + torch.randn(hidden, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return self.inner(x) * self.gain


def test_fallback_covers_custom_modules_exactly(tokenizer_dir):
    from transformers import AutoTokenizer

    model = tiny.make_llama(seed=9, hidden=32, layers=2).double()
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, LlamaRMSNorm):
                norm.weight.add_(torch.randn_like(norm.weight) * 0.1)
    model.model.layers[0].post_attention_layernorm = OffsetRMSNorm(32)
    model.model.norm = GainedNorm(32).double()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [tiny.CORPUS[0], "tiny", tiny.CORPUS[5]]
    examples = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        labels = [IGNORE] * 2 + ids[2:]  # a masked prefix, too
        examples.append(Example(i, ids, labels))
    engine = FisherEngine(model, fisher_type="empirical", accumulator_dtype=torch.float64)
    assert set(engine.fallback) == {
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.gain",
    }
    covered = {key for handler in engine.handlers for key in handler.keys.values()}
    assert (
        "model.norm.inner.weight" in covered
        and "model.layers.1.post_attention_layernorm.weight" in covered
    )
    engine.step(collate(examples, 0, "causal-lm"))
    got = engine.fisher()
    engine.close()
    reference = tiny.brute_force_fisher(model, [(e.input_ids, e.labels) for e in examples])
    assert_fisher_close(got, reference)


class TableBias(nn.Module):
    """A covered nn.Linear applied to a batch-less table; its result is broadcast over the batch.
    The Linear's output gradient is a batch sum, so its weight must go to the exact fallback."""

    def __init__(self, hidden: int):
        super().__init__()
        self.register_buffer("table", torch.randn(3, hidden, dtype=torch.float64))
        self.proj = nn.Linear(hidden, hidden, dtype=torch.float64)

    def forward(self, x):
        return x + self.proj(self.table).mean(0)


def test_batchless_outputs_of_covered_modules_fall_back(tokenizer_dir):
    from transformers import AutoTokenizer

    model = tiny.make_llama(seed=10, hidden=32, layers=1).double()
    layer = model.model.layers[0]
    inner = layer.mlp
    layer.mlp = nn.Sequential(TableBias(32), inner)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = [
        Example(i, tokenizer(t)["input_ids"], tokenizer(t)["input_ids"])
        for i, t in enumerate(tiny.CORPUS[:3])
    ]
    engine = FisherEngine(model, fisher_type="empirical", accumulator_dtype=torch.float64)
    assert not engine.fallback  # planned as fast ...
    engine.step(collate(examples, 0, "causal-lm"))
    assert engine.fallback_keys() == [
        "model.layers.0.mlp.0.proj.bias",
        "model.layers.0.mlp.0.proj.weight",
    ]
    got = engine.fisher()
    engine.close()
    assert_fisher_close(
        got, tiny.brute_force_fisher(model, [(e.input_ids, e.labels) for e in examples])
    )
