"""Right-padded batches without the attention mask (estimator/padding.py): only where a plan-time
check shows the mask changes no real token's logits, and the Fisher stays the brute-force one."""

from __future__ import annotations

import tiny
import torch
from estimator_helpers import assert_fisher_close

from mergekit_fisher.estimator.data import Example, collate
from mergekit_fisher.estimator.engine import FisherEngine

ROWS = [[5, 9, 9, 4, 12, 3, 7], [6, 7, 8], [9, 3, 3, 3, 1], [2, 2]]


def _fisher(model, task="causal-lm"):
    model.eval().requires_grad_(False)
    engine = FisherEngine(
        model, task=task, fisher_type="empirical", accumulator_dtype=torch.float64
    )
    if task == "seq-cls":
        examples = [Example(i, ids, None, i % 3) for i, ids in enumerate(ROWS)]
    else:
        examples = [Example(i, ids, list(ids)) for i, ids in enumerate(ROWS)]
    engine.step(collate(examples, 0, task))
    engine.close()
    return engine, engine.fisher()


def _assert_close(got, reference):
    """assert_fisher_close on the tensors whose Fisher is not 0 analytically (BERT's key biases:
    softmax ignores them; they hold round-off, ~1e-43), a tiny absolute bound on the others."""
    zero = {name for name, value in reference.items() if float(value.abs().max()) < 1e-30}
    assert all(float(got[name].abs().max()) < 1e-30 for name in zero)
    assert_fisher_close(
        {k: v for k, v in got.items() if k not in zero},
        {k: v for k, v in reference.items() if k not in zero},
    )


def test_causal_lm_drops_the_mask_and_stays_exact():
    model = tiny.make_llama(seed=4).double()
    engine, got = _fisher(model)
    assert engine.drop_mask
    assert_fisher_close(got, tiny.brute_force_fisher(model, [(r, list(r)) for r in ROWS]))


def test_causal_classifier_drops_the_mask_and_stays_exact():
    model = tiny.make_llama_classifier(seed=4).double()
    engine, got = _fisher(model, "seq-cls")
    assert engine.drop_mask
    reference = tiny.brute_force_fisher(
        model, [(r, i % 3) for i, r in enumerate(ROWS)], task="seq-cls"
    )
    assert_fisher_close(got, reference)


def test_bidirectional_encoder_keeps_the_mask():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).double()
    engine, got = _fisher(model, "seq-cls")
    assert not engine.drop_mask
    reference = tiny.brute_force_fisher(
        model, [(r, i % 3) for i, r in enumerate(ROWS)], task="seq-cls"
    )
    _assert_close(got, reference)


class MaskReader(torch.nn.Module):
    """A causal LM whose real tokens' logits depend on how many tokens the mask holds (as a model
    with mask-derived scaling would): dropping the mask would change them -- it must be kept."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
        if attention_mask is not None:
            out.logits = out.logits * (1 + 0.1 * attention_mask.sum(1, keepdim=True)[..., None])
        return out


def test_a_model_whose_real_logits_read_the_mask_keeps_it():
    model = MaskReader(tiny.make_llama(seed=4).double())
    engine, got = _fisher(model)
    assert not engine.drop_mask
    # brute force runs batch 1 with an all-ones mask, as the estimator's batches do with theirs
    assert_fisher_close(got, tiny.brute_force_fisher(model, [(r, list(r)) for r in ROWS]))
