"""MoE families: transformers 5 fuses the experts in memory, checkpoints store them one by one.

`compute` must write the checkpoint's stored per-expert tensors, and the merge must find them for
mergekit's fused inputs. The references here fuse and split by hand (the families' documented
layouts), independently of the code under test, which uses transformers' and mergekit's converters.
"""

from __future__ import annotations

import os

import pytest
import tiny
import torch
from estimator_helpers import assert_fisher_close, compute, lm_reference_examples
from merge_world import run_recipe, wide_fisher
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_fisher.fisher_file import FisherConfig, write_fisher

ROWS = [{"text": text} for text in tiny.CORPUS[:5]]
EXPERTS = 3

# family -> (config builder kwargs, stored name of expert e's (gate, up, down) in layer l, router)
FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        dict(intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=2),
        "model.layers.{l}.block_sparse_moe.experts.{e}.{part}.weight",
        {"gate": "w1", "up": "w3", "down": "w2"},
        ("model.layers.{l}.mlp.gate.weight", "model.layers.{l}.block_sparse_moe.gate.weight"),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
        ),
        "model.layers.{l}.mlp.experts.{e}.{part}.weight",
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        ("model.layers.{l}.mlp.gate.weight", "model.layers.{l}.mlp.gate.weight"),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
        ),
        "model.layers.{l}.mlp.experts.{e}.{part}.weight",
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        ("model.layers.{l}.mlp.gate.weight", "model.layers.{l}.mlp.gate.weight"),
    ),
}
LAYERS = 2


def make_moe(family: str, out_dir: str, tokenizer_dir: str, seed: int = 0):
    import transformers

    config_name, extra, *_ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def stored_from_memory(family: str, tensors: dict) -> dict:
    """In-memory (fused) names -> stored per-expert names, by hand."""
    _c, _x, template, parts, (router_mem, router_stored) = FAMILIES[family]
    out = {}
    for name, value in tensors.items():
        fused = name.rsplit(".", 1)[-1]
        if ".mlp.experts." in name and fused in ("gate_up_proj", "down_proj"):
            layer = int(name.split(".")[2])
            for e in range(value.shape[0]):
                if fused == "gate_up_proj":
                    gate, up = value[e].chunk(2, dim=0)  # rows: [gate; up]
                    out[template.format(l=layer, e=e, part=parts["gate"])] = gate
                    out[template.format(l=layer, e=e, part=parts["up"])] = up
                else:
                    out[template.format(l=layer, e=e, part=parts["down"])] = value[e]
            continue
        for layer in range(LAYERS):
            if name == router_mem.format(l=layer):
                name = router_stored.format(l=layer)
        out[name] = value
    return out


def fused_from_stored(family: str, tensors: dict, layer: int) -> dict:
    """The fused in-memory expert tensors (and router) of one layer from stored ones, by hand."""
    _c, _x, template, parts, (router_mem, router_stored) = FAMILIES[family]

    def part(e, key):
        return tensors[template.format(l=layer, e=e, part=parts[key])]

    gate_up = torch.stack([torch.cat([part(e, "gate"), part(e, "up")]) for e in range(EXPERTS)])
    down = torch.stack([part(e, "down") for e in range(EXPERTS)])
    prefix = f"model.layers.{layer}.mlp.experts."
    return {
        prefix + "gate_up_proj": gate_up,
        prefix + "down_proj": down,
        router_mem.format(l=layer): tensors[router_stored.format(l=layer)],
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compute_writes_stored_expert_tensors_equal_to_brute_force(family, tmp_path, tokenizer_dir):
    model_dir = str(tmp_path / family)
    make_moe(family, model_dir, tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS)
    got = compute(
        model_dir,
        str(tmp_path / "f"),
        data,
        fisher_type="empirical",
        batch_size=2,
        dtype="float64",
        accumulator_dtype="float64",
    )
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    assert set(got) == stored  # exactly the checkpoint's names, no fused in-memory name
    reference_model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, experts_implementation="eager"
    )
    reference = tiny.brute_force_fisher(
        reference_model, lm_reference_examples(AutoTokenizer.from_pretrained(tokenizer_dir), ROWS)
    )
    expected = stored_from_memory(family, reference)
    # tied or not, brute force names parameters as the module does: keep the stored ones
    assert_fisher_close(got, {k: v for k, v in expected.items() if k in stored})


def _merge_world(family, tmp_path, tokenizer_dir):
    base = make_moe(family, str(tmp_path / "base"), tokenizer_dir)
    models, fishers, states, values = [], [], {}, {}
    for index in range(2):
        path = str(tmp_path / f"m{index}")
        tiny.perturbed_copy(base, path, seed=10 + index, scale=0.05, tokenizer_dir=tokenizer_dir)
        states[path] = tiny.state_dict_from_dir(path)
        values[path] = wide_fisher(states[path], seed=20 + index)
        fisher = str(tmp_path / f"f{index}")
        write_fisher(values[path], fisher, FisherConfig(model=path))
        models.append(path)
        fishers.append(fisher)
    states[str(tmp_path / "base")] = tiny.state_dict_from_dir(str(tmp_path / "base"))
    return str(tmp_path / "base"), models, fishers, states, values


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["fisher", "fisher_ties"])
def test_stock_merge_of_moe_equals_the_formula(family, method, tmp_path, tokenizer_dir):
    base, models, fishers, states, values = _merge_world(family, tmp_path, tokenizer_dir)
    recipe = {
        "merge_method": method,
        "dtype": "float32",
        "models": [{"model": m, "parameters": {"fisher": f}} for m, f in zip(models, fishers)],
    }
    if method == "fisher_ties":
        recipe["base_model"] = base
        recipe["parameters"] = {"density": 1.0}
    merged = run_recipe(recipe, str(tmp_path / "out"))
    # reference, element-wise on the stored tensors: F̃ = F / mean(F over the file) + 1e-6
    normalized = {}
    for m in models:
        mean = torch.cat([v.double().flatten() for v in values[m].values()]).mean()
        normalized[m] = {k: v.double() / mean + 1e-6 for k, v in values[m].items()}
    expected = {}
    for name in states[models[0]]:
        thetas = [states[m][name].double() for m in models]
        weights = [normalized[m][name] for m in models]
        if method == "fisher":
            expected[name] = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
        else:
            b = states[base][name].double()
            rel = torch.stack(weights) / torch.stack(weights).mean(0)
            deltas = torch.stack([t - b for t in thetas])
            weighted = deltas * rel
            elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
            agree = (deltas.sign() == elected).double()
            divisor = (rel * agree).sum(0)
            divisor[divisor == 0] = 1
            expected[name] = b + (weighted * agree).sum(0) / divisor
    # mergekit ships architectures with fused in-memory names for mixtral and qwen3_moe, and
    # infers qwen2_moe's from the checkpoint (stored names): compare in whichever layout it wrote
    fused = {}
    for layer in range(LAYERS):
        fused.update(fused_from_stored(family, expected, layer))
    reference = fused if set(fused) <= set(merged) else {}
    reference.update({k: v for k, v in expected.items() if k in merged})
    assert set(reference) == set(merged)
    assert any("experts" in name for name in reference)
    for name, value in reference.items():
        torch.testing.assert_close(merged[name].double(), value, rtol=2e-5, atol=1e-6, msg=name)


def test_moe_fisher_without_an_expert_is_a_plan_time_error(tmp_path, tokenizer_dir):
    from test_merge_errors import assert_clean_failure, run_stock_cli

    base, models, fishers, states, values = _merge_world("mixtral", tmp_path, tokenizer_dir)
    holey = dict(values[models[1]])
    holey.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    write_fisher(holey, str(tmp_path / "holey"), FisherConfig(model=models[1]))
    recipe = {
        "merge_method": "fisher",
        "dtype": "float32",
        "models": [
            {"model": models[0], "parameters": {"fisher": fishers[0]}},
            {"model": models[1], "parameters": {"fisher": str(tmp_path / "holey")}},
        ],
    }
    result, shards = run_stock_cli(recipe, tmp_path)
    assert_clean_failure(
        result, shards, "model.layers.1.mlp.experts.gate_up_proj", "checkpoint conversion"
    )
