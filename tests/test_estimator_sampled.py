"""Sampled Fisher: an unbiased Monte Carlo estimate of the exact (expected) Fisher, checked
statistically against an independent enumeration over every label; reproducible per seed and
independent of batching.

The references never look at how `compute` seeds its draws (that scheme is not part of the
contract): with enough draws the estimate must land within a few Monte Carlo standard errors of the
expectation, and estimators that are wrong in expectation (argmax labels, the data's own labels)
must not."""

from __future__ import annotations

import pytest
import tiny
import torch
from estimator_helpers import IGNORE, compute, lm_reference_examples
from transformers import AutoTokenizer, LlamaForCausalLM

ROWS = [
    {"text": tiny.CORPUS[1]},
    {"prompt": "q: fisher?", "completion": " yes"},
    {"text": tiny.CORPUS[7]},
    {"text": "a b c"},
    {"text": tiny.CORPUS[3]},
]
CLS_ROWS = [{"text": t, "label": i % 2} for i, t in enumerate(tiny.CORPUS[:4])]
# a 7-token vocabulary, so the exact LM Fisher can be enumerated over every label at every position;
# 16 distinct word sequences (fixed generator) of 3 to 6 words
WORDS = ["a", "b", "c", "d", "e"]
_g = torch.Generator().manual_seed(0)
SMALL_ROWS = []
while len(SMALL_ROWS) < 16:
    text = " ".join(
        WORDS[i]
        for i in torch.randint(0, 5, (int(torch.randint(3, 7, (1,), generator=_g)),), generator=_g)
    )
    if {"text": text} not in SMALL_ROWS:
        SMALL_ROWS.append({"text": text})


def _word_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<pad>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("sampled")
    lm = str(root / "lm")
    tiny.make_llama(lm, seed=5, tie=True, tokenizer_dir=tokenizer_dir)
    cls = str(root / "cls")
    tiny.make_llama_classifier(cls, seed=6, num_labels=2, tokenizer_dir=tokenizer_dir)
    small = str(root / "small")
    _word_tokenizer(small)
    tiny.make_llama(
        small,
        seed=5,
        tie=True,
        vocab_size=len(WORDS) + 2,
        hidden=16,
        layers=1,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return {
        "lm": lm,
        "cls": cls,
        "small": small,
        "tokenizer": AutoTokenizer.from_pretrained(tokenizer_dir),
        "lm_data": tiny.write_jsonl(str(root / "lm.jsonl"), ROWS),
        "cls_data": tiny.write_jsonl(str(root / "cls.jsonl"), CLS_ROWS),
        "small_data": tiny.write_jsonl(str(root / "small.jsonl"), SMALL_ROWS),
    }


def enumerated_lm_fishers(model, examples):
    """(exact, argmax) by enumeration over every label at every predicted position, batch-1,
    float64.

    exact: E over labels y_t drawn independently at every predicted position t from the model's p_t
    of (∂/∂θ Σ_t log p_t(y_t))², element-wise. The score has mean 0 at each position, so the cross
    terms vanish and the expectation is Σ_t Σ_c p_t(c) (∂ log p_t(c)/∂θ)².
    argmax: all the weight on the most likely label instead -- a classic wrong estimator, to show
    that the tolerance of the test tells a biased estimator apart.
    Both from the full Jacobian of log p (positions × vocabulary) per example
    (torch.func.jacrev)."""
    from torch.func import functional_call, jacrev

    model = model.double().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    exact = {n: torch.zeros_like(p) for n, p in params.items()}
    argmax = {n: torch.zeros_like(p) for n, p in params.items()}
    for ids, targets in examples:
        x = torch.tensor([ids])

        def logp(p, x=x):
            return torch.log_softmax(functional_call(model, p, (x,)).logits[0], -1)

        probs = logp(params).exp()
        top = probs.argmax(-1)
        jacobian = jacrev(logp)(params)  # name -> (positions, vocabulary, *shape)
        for t in range(len(ids) - 1):  # position t predicts token t+1
            if targets[t + 1] != IGNORE:
                for n in exact:
                    squares = jacobian[n][t] ** 2
                    exact[n] += torch.einsum("c,c...->...", probs[t], squares)
                    argmax[n] += squares[top[t]]
    return tuple({n: v / len(examples) for n, v in sums.items()} for sums in (exact, argmax))


def _flat(values: dict, names) -> torch.Tensor:
    return torch.cat([values[n].double().flatten() for n in names])


def mc_errors(estimate: dict, expected: dict):
    """Relative L2 error of the whole Fisher, and the worst relative L2 error of one tensor."""
    names = sorted(expected)
    target = _flat(expected, names)
    whole = float((_flat(estimate, names) - target).norm() / target.norm())
    worst = max(
        float((estimate[n].double() - expected[n]).norm() / expected[n].norm()) for n in names
    )
    return whole, worst


# 16 examples x 96 draws: over 10 seeds the whole-Fisher error was 0.03-0.054 and the worst tensor's
# 0.06-0.104 (Monte Carlo noise, ~1/sqrt(draws)); the bounds leave a 2x margin. argmax labels, the
# data's own labels, or one uniform reused at every position of an example are off by 0.76-1.16.
LM_SAMPLES, WHOLE_BOUND, TENSOR_BOUND = 96, 0.12, 0.25


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_sampled_lm_is_an_unbiased_estimate_of_the_exact_fisher(world, tmp_path):
    got = compute(
        world["small"],
        str(tmp_path / "f"),
        world["small_data"],
        fisher_type="sampled",
        samples=LM_SAMPLES,
        seed=3,
        batch_size=16,
        dtype="float64",
        accumulator_dtype="float64",
    )

    def model():
        return LlamaForCausalLM.from_pretrained(
            world["small"], dtype=torch.float64, attn_implementation="eager"
        )

    examples = lm_reference_examples(AutoTokenizer.from_pretrained(world["small"]), SMALL_ROWS)
    assert all(
        len(ids) >= 3 and set(ids) <= set(range(2, 7)) for ids, _ in examples
    )  # words, no <unk>
    expected, argmax = enumerated_lm_fishers(model(), examples)
    assert set(got) == set(expected)
    whole, worst = mc_errors(got, expected)
    assert whole < WHOLE_BOUND and worst < TENSOR_BOUND, (whole, worst)
    # the bounds discriminate: estimators that are wrong in expectation miss them by far
    for wrong in (
        argmax,
        tiny.brute_force_fisher(model(), examples),
    ):  # argmax labels, the data's own labels
        wrong_whole, wrong_worst = mc_errors(wrong, expected)
        assert wrong_whole > 3 * WHOLE_BOUND and wrong_worst > 2 * TENSOR_BOUND, (
            wrong_whole,
            wrong_worst,
        )


def test_sampled_reproducible_and_independent_of_batching(world, tmp_path):
    def run(name, **kw):
        return compute(
            world["lm"],
            str(tmp_path / name),
            world["lm_data"],
            fisher_type="sampled",
            dtype="float64",
            accumulator_dtype="float64",
            **kw,
        )

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
    """References by brute force (tiny.brute_force_fisher): Σ_c p(c|x) g_c² for the exact Fisher,
    the data's labels for the empirical one. Also: the draws do not depend on the batch size."""
    from transformers import LlamaForSequenceClassification

    common = dict(task="seq-cls", dtype="float64", accumulator_dtype="float64")
    runs = [
        compute(
            world["cls"],
            str(tmp_path / f"s{seed}"),
            world["cls_data"],
            fisher_type="sampled",
            samples=100,
            seed=seed,
            batch_size=4,
            **common,
        )
        for seed in range(4)
    ]
    one_by_one = compute(
        world["cls"],
        str(tmp_path / "b1"),
        world["cls_data"],
        fisher_type="sampled",
        samples=100,
        seed=0,
        batch_size=1,
        **common,
    )
    tokenizer = world["tokenizer"]
    examples = [(tokenizer(r["text"])["input_ids"], r["label"]) for r in CLS_ROWS]

    def model():
        return LlamaForSequenceClassification.from_pretrained(world["cls"], dtype=torch.float64)

    exact = tiny.brute_force_fisher(model(), examples, task="seq-cls", exact_classes=True)
    empirical = tiny.brute_force_fisher(model(), examples, task="seq-cls")
    names = sorted(exact)
    assert set(runs[0]) == set(names)
    target = _flat(exact, names)
    mean = sum(_flat(r, names) for r in runs) / len(runs)

    def error(v):
        return float((v - target).norm() / target.norm())

    assert error(mean) < 0.05  # 400 draws per example (2 classes)
    assert error(mean) < error(_flat(runs[0], names))  # more draws, closer
    assert error(_flat(empirical, names)) > 5 * error(
        mean
    )  # and it is not just the empirical Fisher
    for name in names:
        torch.testing.assert_close(one_by_one[name], runs[0][name], rtol=1e-5, atol=1e-12, msg=name)
