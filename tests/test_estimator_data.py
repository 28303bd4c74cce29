"""Data formats: .txt lines, a dataset saved to disk, chat messages (loss on assistant turns only),
truncation, shuffling and the dataset hash."""

from __future__ import annotations

import tiny
import torch
from estimator_helpers import IGNORE, compute

from mergekit_fisher.estimator.data import prepare

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def _tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_txt_saved_dataset_and_dataset_repo_equal_jsonl(tokenizer_dir, tmp_path):
    import datasets

    model = str(tmp_path / "m")
    tiny.make_llama(model, seed=2, tokenizer_dir=tokenizer_dir)
    texts = tiny.CORPUS[:4]
    jsonl = tiny.write_jsonl(str(tmp_path / "d.jsonl"), [{"text": t} for t in texts])
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(texts) + "\n\n")
    saved = str(tmp_path / "ds")
    datasets.Dataset.from_dict({"text": texts, "source": ["x"] * 4}).save_to_disk(saved)
    # laid out like a hub dataset repository (what `load_dataset("user/name")` downloads):
    # parquet under data/
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": texts}).to_parquet(
        str(repo / "data" / "train-00000-of-00001.parquet")
    )
    # the rows must be the same, in the same batches: files group their rows by length (their
    # sizes are known from the scan), `datasets` sources do not, so none of the runs groups here
    options = dict(fisher_type="empirical", batch_size=2, group_by_length=False)
    reference = compute(model, str(tmp_path / "a"), jsonl, **options)
    for name, data in [("b", str(txt)), ("c", saved), ("d", str(repo))]:
        other = compute(model, str(tmp_path / name), data, **options)
        for key in reference:
            assert torch.equal(other[key], reference[key]), (data, key)


def test_chat_messages_label_only_assistant_turns(tokenizer_dir, tmp_path):
    tokenizer = _tokenizer(tokenizer_dir)
    tokenizer.chat_template = TEMPLATE
    rows = [
        {
            "messages": [
                {"role": "user", "content": "the quick brown fox"},
                {"role": "assistant", "content": "jumps over"},
                {"role": "user", "content": "and then"},
                {"role": "assistant", "content": "the lazy dog"},
            ]
        }
    ]
    data = prepare(
        tiny.write_jsonl(str(tmp_path / "chat.jsonl"), rows),
        tokenizer,
        task="causal-lm",
        num_examples=None,
        max_length=512,
        seed=0,
        shuffle=False,
    )
    example = data.examples[0]
    assert len(example.labels) == len(example.input_ids)
    labelled = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    )
    assert labelled == " jumps over</s> the lazy dog</s>"
    rendered = tokenizer.decode(example.input_ids)
    assert rendered == tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)


def test_truncation_counted_and_shuffle_selects_by_seed(tokenizer_dir, tmp_path):
    tokenizer = _tokenizer(tokenizer_dir)
    path = tiny.write_jsonl(str(tmp_path / "d.jsonl"), [{"text": t} for t in tiny.CORPUS])
    lengths = [len(tokenizer(t)["input_ids"]) for t in tiny.CORPUS]
    data = prepare(
        path, tokenizer, task="causal-lm", num_examples=None, max_length=10, seed=0, shuffle=False
    )
    assert data.num_truncated == sum(n > 10 for n in lengths)
    assert [len(e.input_ids) for e in data.examples] == [min(n, 10) for n in lengths]

    def pick(seed):
        return [
            e.input_ids
            for e in prepare(
                path,
                tokenizer,
                task="causal-lm",
                num_examples=3,
                max_length=64,
                seed=seed,
                shuffle=True,
            ).examples
        ]

    assert pick(1) == pick(1) and pick(1) != pick(2)
    assert len(pick(1)) == 3
    other = tiny.write_jsonl(str(tmp_path / "e.jsonl"), [{"text": t} for t in tiny.CORPUS[:-1]])
    assert (
        prepare(
            other,
            tokenizer,
            task="causal-lm",
            num_examples=None,
            max_length=64,
            seed=0,
            shuffle=False,
        ).dataset_hash
        != data.dataset_hash
    )


def test_sharded_output_holds_the_same_fisher(tokenizer_dir, tmp_path):
    import json
    import os

    model = str(tmp_path / "m")
    tiny.make_llama(model, seed=4, tokenizer_dir=tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), [{"text": t} for t in tiny.CORPUS[:3]])
    single = compute(model, str(tmp_path / "one"), data, fisher_type="empirical")
    sharded = compute(
        model, str(tmp_path / "many"), data, fisher_type="empirical", max_shard_size="40KB"
    )
    with open(os.path.join(tmp_path, "many", "fisher.safetensors.index.json")) as fp:
        assert len(set(json.load(fp)["weight_map"].values())) > 1
    assert set(sharded) == set(single)
    for name in single:
        assert torch.equal(sharded[name], single[name])
