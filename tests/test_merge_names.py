"""The Fisher is looked up under each *input's* tensor name: slices with layer offsets, tied
embeddings, and vocabulary rows permuted by a tokenizer merge."""

from __future__ import annotations

import re

import pytest
import tiny
import torch
from merge_world import World, run_recipe, wide_fisher
from test_merge_methods import normalized_reference

from mergekit_fisher.fisher_file import FisherConfig, write_fisher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("names")), n_models=2)


def fisher_average(thetas, fishers, weights, floor):
    numerator = sum(w * (f + floor) * t.double() for t, f, w in zip(thetas, fishers, weights))
    return numerator / sum(w * (f + floor) for f, w in zip(fishers, weights))


def test_slices_with_layer_offsets(world, tmp_path):
    m0, m1 = world.models
    f0, f1 = world.fishers
    recipe = {
        "merge_method": "fisher",
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": m0, "layer_range": [1, 2], "parameters": {"fisher": f0}},
                    {"model": m1, "layer_range": [0, 1], "parameters": {"fisher": f1}},
                ]
            },
            {
                "sources": [
                    {"model": m0, "layer_range": [0, 1], "parameters": {"fisher": f0}},
                    {"model": m1, "layer_range": [1, 2], "parameters": {"fisher": f1}},
                ]
            },
        ],
    }
    merged = run_recipe(recipe, str(tmp_path / "out"))
    norm = {m: normalized_reference(world.fisher_values[m], "mean") for m in world.models}
    # output layer -> (input layer of m0, input layer of m1)
    layer_map = {0: (1, 0), 1: (0, 1)}
    checked = 0
    for name, value in merged.items():
        match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if match:
            out_layer, rest = int(match.group(1)), match.group(2)
            n0 = f"model.layers.{layer_map[out_layer][0]}.{rest}"
            n1 = f"model.layers.{layer_map[out_layer][1]}.{rest}"
        else:
            n0 = n1 = name
        expected = fisher_average(
            [world.states[m0][n0], world.states[m1][n1]],
            [norm[m0][n0], norm[m1][n1]],
            [1.0, 1.0],
            1e-6,
        )
        torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(world.states[m0])


def test_tied_embeddings_use_the_stored_embedding_fisher(tmp_path, tokenizer_dir):
    untied = str(tmp_path / "untied")
    tied = str(tmp_path / "tied")
    tiny.make_llama(untied, seed=1, tie=False, tokenizer_dir=tokenizer_dir)
    tiny.make_llama(tied, seed=2, tie=True, tokenizer_dir=tokenizer_dir)
    states = {m: tiny.state_dict_from_dir(m) for m in (untied, tied)}
    assert "lm_head.weight" not in states[tied]  # transformers stores a tied head once
    fishers, values = {}, {}
    for index, model in enumerate((untied, tied)):
        values[model] = wide_fisher(states[model], seed=50 + index)
        fishers[model] = str(tmp_path / f"fisher{index}")
        write_fisher(values[model], fishers[model], FisherConfig(model=model))
    recipe = {
        "merge_method": "fisher",
        "dtype": "float32",
        "models": [{"model": m, "parameters": {"fisher": fishers[m]}} for m in (untied, tied)],
    }
    merged = run_recipe(recipe, str(tmp_path / "out"))
    norm = {m: normalized_reference(values[m], "mean") for m in (untied, tied)}
    expected_head = fisher_average(
        [states[untied]["lm_head.weight"], states[tied]["model.embed_tokens.weight"]],
        [norm[untied]["lm_head.weight"], norm[tied]["model.embed_tokens.weight"]],
        [1.0, 1.0],
        1e-6,
    )
    torch.testing.assert_close(
        merged["lm_head.weight"].double(), expected_head, rtol=2e-5, atol=1e-6
    )
    expected_embed = fisher_average(
        [states[untied]["model.embed_tokens.weight"], states[tied]["model.embed_tokens.weight"]],
        [norm[untied]["model.embed_tokens.weight"], norm[tied]["model.embed_tokens.weight"]],
        [1.0, 1.0],
        1e-6,
    )
    torch.testing.assert_close(
        merged["model.embed_tokens.weight"].double(), expected_embed, rtol=2e-5, atol=1e-6
    )


def _word_tokenizer(path: str, tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)


def test_vocabulary_rows_follow_the_tokenizer_merge(tmp_path):
    """Two models whose tokenizers hold the same words at different ids (and one extra word
    each)."""
    words = [f"w{i}" for i in range(20)]
    specials = ["<pad>", "<unk>"]
    order_a = specials + words + ["only_a"]
    generator = torch.Generator().manual_seed(0)
    shuffled = [words[i] for i in torch.randperm(len(words), generator=generator).tolist()]
    order_b = specials + shuffled + ["only_b"]
    paths, states, values, fishers = {}, {}, {}, {}
    for index, (label, order) in enumerate((("a", order_a), ("b", order_b))):
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
        paths[label] = path
        states[label] = tiny.state_dict_from_dir(path)
        values[label] = wide_fisher(states[label], seed=70 + index)
        fishers[label] = str(tmp_path / f"fisher_{label}")
        write_fisher(values[label], fishers[label], FisherConfig(model=path))
    recipe = {
        "merge_method": "fisher",
        "dtype": "float32",
        "tokenizer": {"source": "union"},
        "models": [{"model": paths[k], "parameters": {"fisher": fishers[k]}} for k in ("a", "b")],
    }
    out = str(tmp_path / "out")
    merged = run_recipe(recipe, out)
    from transformers import AutoTokenizer

    out_vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert "only_a" in out_vocab and "only_b" in out_vocab
    ids = {"a": {t: i for i, t in enumerate(order_a)}, "b": {t: i for i, t in enumerate(order_b)}}
    norm = {k: normalized_reference(values[k], "mean") for k in ("a", "b")}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        checked = 0
        for token in specials + words:
            out_id = out_vocab[token]
            expected = fisher_average(
                [states[k][name][ids[k][token]] for k in ("a", "b")],
                [norm[k][name][ids[k][token]] for k in ("a", "b")],
                [1.0, 1.0],
                1e-6,
            )
            torch.testing.assert_close(
                merged[name][out_id].double(), expected, rtol=2e-5, atol=1e-6, msg=token
            )
            checked += 1
        assert checked == len(specials) + len(words)
        # a token only one model has keeps that model's row (mergekit copies it to every input)
        torch.testing.assert_close(
            merged[name][out_vocab["only_b"]], states["b"][name][ids["b"]["only_b"]]
        )


def test_lora_adapters_as_base_plus_adapter_references(tmp_path, tokenizer_dir):
    """`base+adapter` models, merged by mergekit with --lora-merge-cache; Fisher under the base's
    names."""
    from peft import LoraConfig, get_peft_model

    base_dir = str(tmp_path / "base")
    base = tiny.make_llama(base_dir, seed=0, tokenizer_dir=tokenizer_dir)
    adapters, dense_states, values, fishers = [], [], [], []
    for index in range(2):
        model = tiny.make_llama(seed=0)  # (it seeds torch itself: the adapter's seed comes after)
        torch.manual_seed(10 + index)
        peft_model = get_peft_model(
            model,
            LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
            ),
        )
        adapter_dir = str(tmp_path / f"adapter{index}")
        peft_model.save_pretrained(adapter_dir)
        dense = {
            k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()
        }
        dense_states.append(dense)
        values.append(wide_fisher(tiny.state_dict_from_dir(base_dir), seed=90 + index))
        fishers.append(str(tmp_path / f"fisher{index}"))
        write_fisher(values[-1], fishers[-1], FisherConfig(model=base_dir, adapter=adapter_dir))
        adapters.append(adapter_dir)
    recipe = {
        "merge_method": "fisher",
        "dtype": "float32",
        "models": [
            {"model": f"{base_dir}+{adapter}", "parameters": {"fisher": fisher}}
            for adapter, fisher in zip(adapters, fishers)
        ],
    }
    merged = run_recipe(recipe, str(tmp_path / "out"), lora_merge_cache=str(tmp_path / "cache"))
    norm = [normalized_reference(v, "mean") for v in values]
    changed = "model.layers.1.self_attn.q_proj.weight"
    # the adapters do change it, each its own way
    assert not torch.allclose(dense_states[0][changed], base.state_dict()[changed])
    assert not torch.allclose(dense_states[0][changed], dense_states[1][changed])
    for name in (
        changed,
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    ):
        expected = fisher_average(
            [s[name] for s in dense_states], [n[name] for n in norm], [1.0, 1.0], 1e-6
        )
        torch.testing.assert_close(merged[name].double(), expected, rtol=2e-5, atol=1e-6, msg=name)


def test_unsafe_truncation_follows_the_smallest_vocabulary_including_the_base(
    tmp_path, tokenizer_dir
):
    """fisher_ties with --unsafe-truncate-embeddings when the base has the smallest vocabulary: the
    Fisher rows are cut like mergekit cuts the weights; with identical Fishers the result equals
    mergekit's ties."""
    base = str(tmp_path / "base")
    tiny.make_llama(base, seed=0, vocab_size=290)
    models = []
    for index in range(2):
        path = str(tmp_path / f"m{index}")
        tiny.make_llama(path, seed=1 + index, vocab_size=300)
        models.append(path)
    same = str(tmp_path / "fisher")
    write_fisher(wide_fisher(tiny.state_dict_from_dir(models[0]), seed=5), same)
    recipe = lambda method, with_fisher: {  # noqa: E731
        "merge_method": method,
        "dtype": "float32",
        "base_model": base,
        "parameters": {"density": 1.0},
        "models": [
            {"model": m, "parameters": {"weight": 1.0, **({"fisher": same} if with_fisher else {})}}
            for m in models
        ],
    }
    ours = run_recipe(
        recipe("fisher_ties", True), str(tmp_path / "ours"), unsafe_truncate_embeddings=True
    )
    theirs = run_recipe(
        recipe("ties", False), str(tmp_path / "theirs"), unsafe_truncate_embeddings=True
    )
    assert ours["model.embed_tokens.weight"].shape[0] == 290
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
