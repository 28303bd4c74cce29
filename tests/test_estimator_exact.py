"""Empirical / exact Fisher of `compute` against the brute-force batch-1 autograd loop
(tiny.brute_force_fisher).

The comparisons run the model in float64 (`--dtype float64 --accumulator-dtype float64`) so that
float32 round-off (batched vs batch-1 kernels) cannot blur a 1e-5 relative check; a float32 run is
checked too.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from estimator_helpers import assert_fisher_close, compute, lm_reference_examples
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

LM_ROWS = [
    {"text": tiny.CORPUS[0]},
    {"prompt": "question: what merges models?", "completion": " fisher weighted averaging"},
    {"text": tiny.CORPUS[2]},
    {"text": "short"},
    {"prompt": tiny.CORPUS[4], "completion": " ok"},
    {"text": tiny.CORPUS[6]},
]
CLS_ROWS = [
    {"text": tiny.CORPUS[0], "label": 0},
    {"text": tiny.CORPUS[1], "text_pair": "a pair", "label": 2},
    {"text": "tiny", "label": 1},
    {"text": tiny.CORPUS[3], "label": 1},
    {"text": tiny.CORPUS[5], "label": 0},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("exact")
    paths = {"root": root}
    for tie in (False, True):
        paths[f"lm_tie{tie}"] = str(root / f"lm_tie{tie}")
        tiny.make_llama(paths[f"lm_tie{tie}"], seed=3, tie=tie, tokenizer_dir=tokenizer_dir)
    paths["cls"] = str(root / "cls")
    tiny.make_llama_classifier(paths["cls"], seed=4, num_labels=3, tokenizer_dir=tokenizer_dir)
    paths["lm_data"] = tiny.write_jsonl(str(root / "lm.jsonl"), LM_ROWS)
    paths["cls_data"] = tiny.write_jsonl(str(root / "cls.jsonl"), CLS_ROWS)
    paths["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer_dir)
    return paths


def _cls_examples(tokenizer):
    return [(tokenizer(r["text"], r.get("text_pair"))["input_ids"], r["label"]) for r in CLS_ROWS]


@pytest.mark.parametrize("tie,batch_size", [(False, 1), (False, 4), (True, 4)])
def test_empirical_lm_equals_brute_force(world, tmp_path, tie, batch_size):
    model_dir = world[f"lm_tie{tie}"]
    got = compute(
        model_dir,
        str(tmp_path / "f"),
        world["lm_data"],
        fisher_type="empirical",
        batch_size=batch_size,
        dtype="float64",
        accumulator_dtype="float64",
    )
    reference = tiny.brute_force_fisher(
        LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64),
        lm_reference_examples(world["tokenizer"], LM_ROWS),
    )
    if tie:  # the checkpoint stores only the embedding; its Fisher must include the lm_head use
        assert "lm_head.weight" not in got and "model.embed_tokens.weight" in got
        assert "lm_head.weight" not in tiny.state_dict_from_dir(model_dir)
    assert set(got) == set(tiny.state_dict_from_dir(model_dir))
    assert_fisher_close(got, reference)


def test_tied_fisher_is_not_sum_of_separate_squares(world, tmp_path):
    """The trap: squaring embedding and lm_head contributions separately gives a different (wrong)
    value."""
    model = LlamaForCausalLM.from_pretrained(world["lm_tieTrue"], dtype=torch.float64)
    examples = lm_reference_examples(world["tokenizer"], LM_ROWS)
    right = tiny.brute_force_fisher(model, examples)["model.embed_tokens.weight"]
    got = compute(
        world["lm_tieTrue"],
        str(tmp_path / "f"),
        world["lm_data"],
        fisher_type="empirical",
        batch_size=3,
        dtype="float64",
        accumulator_dtype="float64",
    )["model.embed_tokens.weight"]
    untied = LlamaForCausalLM.from_pretrained(world["lm_tieTrue"], dtype=torch.float64)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.model.embed_tokens.weight.detach().clone())
    separate = tiny.brute_force_fisher(untied, examples)
    wrong = separate["model.embed_tokens.weight"] + separate["lm_head.weight"]
    torch.testing.assert_close(got.double(), right, rtol=1e-5, atol=1e-9)
    assert float((wrong - right).abs().max()) > 1e-3 * float(right.abs().max())


def test_float32_run_close_to_brute_force(world, tmp_path):
    got = compute(
        world["lm_tieFalse"],
        str(tmp_path / "f"),
        world["lm_data"],
        fisher_type="empirical",
        batch_size=4,
    )
    reference = tiny.brute_force_fisher(
        LlamaForCausalLM.from_pretrained(world["lm_tieFalse"], dtype=torch.float64),
        lm_reference_examples(world["tokenizer"], LM_ROWS),
    )
    # float32 round-off differs between batched and batch-1 kernels:
    # elementwise 1e-4, tensor-wise 1e-5
    assert_fisher_close(got, reference, rtol=1e-4)
    for name, value in reference.items():
        assert float((got[name].double() - value).norm() / value.norm()) < 1e-5, name


@pytest.mark.parametrize(
    "fisher_type,batch_size", [("empirical", 1), ("empirical", 4), ("exact", 3)]
)
def test_seq_cls_equals_brute_force(world, tmp_path, fisher_type, batch_size):
    got = compute(
        world["cls"],
        str(tmp_path / "f"),
        world["cls_data"],
        task="seq-cls",
        fisher_type=fisher_type,
        batch_size=batch_size,
        dtype="float64",
        accumulator_dtype="float64",
    )
    reference = tiny.brute_force_fisher(
        LlamaForSequenceClassification.from_pretrained(world["cls"], dtype=torch.float64),
        _cls_examples(world["tokenizer"]),
        task="seq-cls",
        exact_classes=fisher_type == "exact",
    )
    assert_fisher_close(got, reference)


def test_padding_does_not_leak(world, tmp_path):
    """Same examples, once padded next to a long one and once alone: same Fisher for the short
    ones."""
    rows = [{"text": "short"}, {"text": "tiny text"}]
    long_rows = rows + [{"text": " ".join(tiny.CORPUS)}]
    alone = compute(
        world["lm_tieFalse"],
        str(tmp_path / "a"),
        tiny.write_jsonl(str(tmp_path / "a.jsonl"), rows),
        fisher_type="empirical",
        batch_size=1,
        dtype="float64",
        accumulator_dtype="float64",
    )
    padded = compute(
        world["lm_tieFalse"],
        str(tmp_path / "b"),
        tiny.write_jsonl(str(tmp_path / "b.jsonl"), long_rows),
        fisher_type="empirical",
        batch_size=3,
        dtype="float64",
        accumulator_dtype="float64",
    )
    longest = compute(
        world["lm_tieFalse"],
        str(tmp_path / "c"),
        tiny.write_jsonl(str(tmp_path / "c.jsonl"), long_rows[2:]),
        fisher_type="empirical",
        batch_size=1,
        dtype="float64",
        accumulator_dtype="float64",
    )
    for name in alone:  # mean over 3 = (2 * mean over the short two + the long one) / 3
        expected = (2 * alone[name].double() + longest[name].double()) / 3
        torch.testing.assert_close(padded[name].double(), expected, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("strategy", ["per-example loop", "batched matmul"])
def test_row_blocked_per_example_gradients_equal_brute_force(
    world, tmp_path, monkeypatch, strategy, tie
):
    """Big weights are formed in row blocks (memory / cache); force 1-row blocks and check nothing
    changes, for both ways of forming per-example gradients (the CPU's per-example loop, the GPU's
    batched bmm), and for a tied embedding / lm_head (its two terms are summed block by block before
    squaring)."""
    from mergekit_fisher.estimator import accumulator, outer_squares

    monkeypatch.setattr(outer_squares, "BLOCK_ELEMENTS_CPU", 1)
    monkeypatch.setattr(outer_squares, "BLOCK_ELEMENTS_GPU", 1)
    if strategy == "batched matmul":
        monkeypatch.setattr(accumulator, "PER_EXAMPLE_LOOP_DEVICES", ())
    model = world[f"lm_tie{tie}"]
    got = compute(
        model,
        str(tmp_path / "f"),
        world["lm_data"],
        fisher_type="empirical",
        batch_size=4,
        dtype="float64",
        accumulator_dtype="float64",
    )
    reference = tiny.brute_force_fisher(
        LlamaForCausalLM.from_pretrained(model, dtype=torch.float64),
        lm_reference_examples(world["tokenizer"], LM_ROWS),
    )
    assert_fisher_close(got, reference)


def test_dropout_is_off_and_bf16_models_accumulate_in_float32(world, tmp_path, tokenizer_dir):
    """A model saved with heavy attention dropout: the estimator must run it in eval mode (the brute
    force does); a bfloat16 run still writes float32 values close to the float64 reference."""
    model_dir = str(tmp_path / "dropout")
    tiny.make_llama(model_dir, seed=5, tokenizer_dir=tokenizer_dir, attention_dropout=0.5)
    reference = tiny.brute_force_fisher(
        LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64),
        lm_reference_examples(world["tokenizer"], LM_ROWS),
    )
    got = compute(
        model_dir,
        str(tmp_path / "f64"),
        world["lm_data"],
        fisher_type="empirical",
        batch_size=4,
        dtype="float64",
        accumulator_dtype="float64",
    )
    assert_fisher_close(got, reference)
    from mergekit_fisher.fisher_file import open_fisher

    compute(
        model_dir,
        str(tmp_path / "bf16"),
        world["lm_data"],
        fisher_type="empirical",
        batch_size=4,
        dtype="bfloat16",
    )
    stored = open_fisher(str(tmp_path / "bf16"))
    assert {stored.header(n).dtype for n in stored.names()} == {"F32"}
    name = "model.layers.0.mlp.down_proj.weight"
    values = stored.get_tensor(name).double()
    # bf16 forward/backward: a few percent of noise, but no underflow to 0 and the right scale
    assert float((values > 0).double().mean()) > 0.99
    ratio = float(values.sum() / reference[name].sum())
    assert 0.8 < ratio < 1.25, ratio


def test_engine_ignores_requires_grad_of_the_parameters(world):
    """FisherEngine on a model straight from from_pretrained (parameters require grad) equals the
    frozen one."""
    from mergekit_fisher.estimator.data import collate, prepare
    from mergekit_fisher.estimator.engine import FisherEngine

    data = prepare(
        world["lm_data"],
        world["tokenizer"],
        task="causal-lm",
        num_examples=4,
        max_length=64,
        seed=0,
        shuffle=False,
    )
    totals = []
    for freeze in (True, False):
        model = LlamaForCausalLM.from_pretrained(world["lm_tieFalse"], dtype=torch.float64).eval()
        model.requires_grad_(not freeze)
        engine = FisherEngine(model, fisher_type="empirical", accumulator_dtype=torch.float64)
        engine.step(collate(data.examples, 0, "causal-lm"))
        totals.append(engine.fisher())
    assert sum(float(v.sum()) for v in totals[0].values()) > 0
    for name in totals[0]:
        torch.testing.assert_close(totals[1][name], totals[0][name])
