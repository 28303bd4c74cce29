"""explain over a tokenizer merge of different vocabularies: it runs the merge's own permutation,
so every model's rows line up with the output vocabulary (it crashed on the size mismatch)."""

from __future__ import annotations

import json

import tiny
import torch
from click.testing import CliRunner
from merge_world import wide_fisher, write_recipe
from test_merge_names import _word_tokenizer

from mergekit_fisher.cli import main as cli
from mergekit_fisher.fisher_file import FisherConfig, write_fisher


def test_explain_with_a_union_tokenizer_over_different_vocabularies(tmp_path):
    words = [f"w{i}" for i in range(20)]
    orders = {
        "a": ["<pad>", "<unk>", *words, "only_a", "also_a"],
        "b": ["<pad>", "<unk>", *reversed(words), "only_b"],
    }
    states, values, models = {}, {}, []
    for index, (label, order) in enumerate(orders.items()):
        path = str(tmp_path / label)
        _word_tokenizer(path, order)
        tiny.make_llama(
            path,
            seed=index,
            vocab_size=len(order),
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
        )
        _word_tokenizer(path, order)
        states[label] = tiny.state_dict_from_dir(path)
        values[label] = wide_fisher(states[label], seed=80 + index)
        write_fisher(values[label], str(tmp_path / f"f{label}"), FisherConfig(model=path))
        models.append({"model": path, "parameters": {"fisher": str(tmp_path / f"f{label}")}})
    recipe = {
        "merge_method": "fisher",
        "dtype": "float32",
        "tokenizer": {"source": "union"},
        "models": models,
    }
    result = CliRunner().invoke(
        cli, ["explain", write_recipe(recipe, str(tmp_path / "r.yml")), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    embed = next(r for r in report["groups"] if r["module"] == "embed_tokens")
    union = len(set(orders["a"]) | set(orders["b"]))  # 25 rows in the merged vocabulary
    hidden = states["a"]["model.embed_tokens.weight"].shape[1]
    assert embed["elements"] == union * hidden
    # masses: each model's mean-normalized, floored Fisher over its own rows (the permutation moves
    # rows; a row a model lacks gets 0 from it)
    mass = {}
    for label in orders:
        flat = torch.cat([v.double().flatten() for v in values[label].values()])
        mass[label] = float(
            (values[label]["model.embed_tokens.weight"].double() / flat.mean() + 1e-6).sum()
        )
    share_a = mass["a"] / (mass["a"] + mass["b"])
    labels = report["models"]
    assert abs(embed["shares"][labels[0]] - share_a) < 1e-6
