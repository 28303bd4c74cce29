"""`eval` reads what `compute` reads and scores the tokens compute differentiates: prompt/completion
(completion only), chat messages (assistant turns only), saved datasets; `base+adapter` models
(peft in memory, nothing written); every model and file checked before the first forward pass."""

from __future__ import annotations

import json
import os

import pytest
import tiny
import torch
from click.testing import CliRunner

from mergekit_fisher.cli import main

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
PAIRS = [
    ("def merge(models):", " return sum(models) / len(models)"),
    ("the quick brown fox", " jumps over the lazy dog"),
    ("fisher information", " weighs each parameter by how much the data cares"),
]


def nll(model_dir, sequences, adapter=None):
    """Brute force: the summed NLL of (ids, predicted positions) pairs and the token count, one
    unpadded sequence at a time, in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for ids, positions in sequences:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        for position in positions:  # predicting ids[position] from ids[:position]
            log_probs = logits[position - 1] - torch.logsumexp(logits[position - 1], dim=0)
            total -= log_probs[ids[position]].item()
            count += 1
    return total / count, count


def run_eval(*args):
    result = CliRunner().invoke(main, ["eval", *args, "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("evalfmt") / "m")
    tiny.make_llama(path, seed=3, tokenizer_dir=tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def test_prompt_completion_scores_the_completion_only(model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    data = tiny.write_jsonl(str(tmp_path / "pc.jsonl"), rows)
    sequences = []
    for prompt, completion in PAIRS:
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        sequences.append((head + tail, range(len(head), len(head) + len(tail))))
    expected, count = nll(model, sequences)
    cell = run_eval(model, "--data", data)[model]["pc"]
    assert cell["tokens"] == count
    assert cell["loss"] == pytest.approx(expected, rel=1e-5)
    # the same rows as plain text (prompt + completion) score the prompt too: another number
    text = tiny.write_jsonl(str(tmp_path / "t.jsonl"), [{"text": p + c} for p, c in PAIRS])
    assert run_eval(model, "--data", text)[model]["t"]["tokens"] > count


def test_chat_messages_score_the_assistant_turns_on_computes_tokens(model, tmp_path):
    """Reference: compute's own selection of differentiated tokens (`estimator.data.prepare`, the
    definition eval must follow), scored by brute force."""
    from transformers import AutoTokenizer

    from mergekit_fisher.estimator.data import prepare

    rows = [
        {
            "messages": [
                {"role": "user", "content": p},
                {"role": "assistant", "content": c},
                {"role": "user", "content": "and then?"},
                {"role": "assistant", "content": "the end"},
            ]
        }
        for p, c in PAIRS
    ]
    data = tiny.write_jsonl(str(tmp_path / "chat.jsonl"), rows)
    tokenizer = AutoTokenizer.from_pretrained(model)
    examples = prepare(
        data, tokenizer, task="causal-lm", num_examples=None, max_length=256, seed=0, shuffle=False
    ).examples
    sequences = [
        (e.input_ids, [t for t in range(1, len(e.labels)) if e.labels[t] != -100]) for e in examples
    ]
    expected, count = nll(model, sequences)
    total = sum(len(e.input_ids) - 1 for e in examples)
    assert 0 < count < total  # user turns are masked
    cell = run_eval(model, "--data", data, "--batch-size", "2")[model]["chat"]
    assert cell["tokens"] == count and cell["loss"] == pytest.approx(expected, rel=1e-5)


def test_saved_dataset_equals_jsonl(model, tmp_path):
    import datasets

    rows = [{"prompt": p, "completion": c} for p, c in PAIRS]
    jsonl = tiny.write_jsonl(str(tmp_path / "a.jsonl"), rows)
    saved = str(tmp_path / "b")
    datasets.Dataset.from_list(rows).save_to_disk(saved)
    payload = run_eval(model, "--data", jsonl, "--data", saved)[model]
    assert payload["a"] == payload["b"]
    assert payload["mean"]["loss"] == pytest.approx(payload["a"]["loss"])


def test_base_plus_adapter_equals_the_merged_model(model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    merged = str(tmp_path / "merged")
    peft_model.merge_and_unload().save_pretrained(merged)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model).save_pretrained(merged)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), [{"text": p + c} for p, c in PAIRS])
    before = sorted(os.listdir(tmp_path))
    payload = run_eval(f"{model}+{adapter}", merged, model, "--data", data)
    assert sorted(os.listdir(tmp_path)) == before  # nothing merged or cached
    adapted, dense, base = (payload[k]["d"]["loss"] for k in payload)
    assert adapted == pytest.approx(dense, rel=1e-5)
    assert abs(adapted - base) > 1e-4  # the adapter is applied


@pytest.mark.parametrize("bad", ["no-config", "other-base", "bad-data", "missing-data"])
def test_everything_is_checked_before_the_first_forward(model, tmp_path, monkeypatch, bad):
    import mergekit_fisher.demo.evaluate as evaluate

    calls = []
    original = evaluate.token_loss
    monkeypatch.setattr(
        evaluate, "token_loss", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    good = tiny.write_jsonl(str(tmp_path / "good.jsonl"), [{"text": "a b c d"}])
    models, data, needle = [model], [good], None
    if bad == "no-config":
        empty = tmp_path / "empty"
        empty.mkdir()
        models.append(str(empty))
        needle = ["no config.json", str(empty)]
    elif bad == "other-base":
        from peft import LoraConfig, get_peft_model

        other = tiny.make_llama(seed=0, hidden=64)
        adapter = str(tmp_path / "wide")
        get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
        models.append(f"{model}+{adapter}")
        needle = ["another base", adapter, "q_proj"]
    elif bad == "bad-data":
        data.append(
            tiny.write_jsonl(str(tmp_path / "bad.jsonl"), [{"prompt": None, "completion": "x"}])
        )
        needle = ['"prompt" is null', "bad.jsonl:1"]
    else:
        data.append(str(tmp_path / "nowhere.jsonl"))
        needle = ["does not exist", "nowhere.jsonl"]
    args = ["eval", *models]
    for path in data:
        args += ["--data", path]
    result = CliRunner().invoke(main, args + ["--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in needle), (errors, needle)
    assert calls == []  # no forward pass ran, not even for the good model
