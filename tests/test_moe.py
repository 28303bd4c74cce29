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

from mergekit_fisher.fisher_file import FisherConfig, open_fisher, write_fisher

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
    # experts, routers (and Qwen2-MoE's shared expert) on the fast path: nothing went batch-1
    assert open_fisher(str(tmp_path / "f")).config.fallback_tensors == []
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


def _stored_expert_names(family: str) -> list:
    _c, _x, template, parts, (_router_mem, router_stored) = FAMILIES[family]
    names = [router_stored.format(l=layer) for layer in range(LAYERS)]
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            names += [template.format(l=layer, e=e, part=part) for part in parts.values()]
    return sorted(names)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fallback_lists_the_stored_expert_names(family, tmp_path, tokenizer_dir, monkeypatch):
    """With the experts and routers forced onto the exact batch-1 path, `fallback_tensors` names
    the checkpoint's per-expert tensors (not the fused in-memory ones), and the Fisher is still
    the brute-force one."""
    from mergekit_fisher.estimator import coverage

    monkeypatch.setattr(coverage, "verified_experts", lambda *_a: False)
    monkeypatch.setattr(coverage, "_verified_router", lambda *_a: False)
    model_dir = str(tmp_path / family)
    make_moe(family, model_dir, tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS[:3])
    got = compute(
        model_dir,
        str(tmp_path / "f"),
        data,
        fisher_type="empirical",
        batch_size=2,
        dtype="float64",
        accumulator_dtype="float64",
    )
    assert open_fisher(str(tmp_path / "f")).config.fallback_tensors == _stored_expert_names(family)
    reference_model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float64, experts_implementation="eager"
    )
    reference = tiny.brute_force_fisher(
        reference_model,
        lm_reference_examples(AutoTokenizer.from_pretrained(tokenizer_dir), ROWS[:3]),
    )
    expected = stored_from_memory(family, reference)
    assert_fisher_close(got, {k: v for k, v in expected.items() if k in got})


def _engine_fisher(model, rows):
    from mergekit_fisher.estimator.data import Example, collate
    from mergekit_fisher.estimator.engine import FisherEngine

    model.eval().requires_grad_(False)
    engine = FisherEngine(model, fisher_type="empirical", accumulator_dtype=torch.float64)
    engine.step(collate([Example(i, ids, list(ids)) for i, ids in enumerate(rows)], 0, "causal-lm"))
    engine.close()
    return engine, engine.fisher()


TOKEN_ROWS = [[5, 9, 9, 4, 12, 3], [6, 7, 8], [9, 3, 3, 3, 1]]


def _tiny_mixtral():
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").double()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)  # routers of random init, not all-equal: routing varies
    return model


def test_experts_of_another_formula_take_the_exact_path():
    """Experts computing act(up) * gate (halves swapped) fail the plan-time numerical check: exact
    fallback, still equal to brute force."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    class SwappedExperts(MixtralExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in range(self.num_experts):
                token, slot = torch.where(top_k_index == e)
                up, gate = torch.nn.functional.linear(
                    hidden_states[token], self.gate_up_proj[e]
                ).chunk(2, dim=-1)
                y = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
                out.index_add_(0, token, y * top_k_weights[token, slot, None])
            return out

    model = _tiny_mixtral()
    block = model.model.layers[1].mlp
    swapped = SwappedExperts(model.config).double()
    swapped.load_state_dict(block.experts.state_dict())
    block.experts = swapped
    engine, got = _engine_fisher(model, TOKEN_ROWS)
    prefix = "model.layers.1.mlp.experts."
    assert {prefix + "gate_up_proj", prefix + "down_proj"} <= set(engine.fallback)
    assert not any(k.startswith("model.layers.0.mlp.experts") for k in engine.fallback_keys())
    assert_fisher_close(got, tiny.brute_force_fisher(model, [(r, list(r)) for r in TOKEN_ROWS]))


class TokenMajorMLP(torch.nn.Module):
    """Flattens tokens position-major ((T, B) order): the same B*T rows as an MoE block's
    ``view(-1, H)``, but example b's are not rows [b*T, (b+1)*T) -- must not take the fast path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        flat = x.transpose(0, 1).reshape(-1, x.shape[-1])
        out = self.inner(flat)
        return out.reshape(x.shape[1], x.shape[0], -1).transpose(0, 1)


def test_token_flattened_input_in_another_order_takes_the_exact_path():
    model = tiny.make_llama(seed=5).double()
    layer = model.model.layers[0]
    layer.mlp = TokenMajorMLP(layer.mlp)
    engine, got = _engine_fisher(model, TOKEN_ROWS)
    mlp = "model.layers.0.mlp.inner."
    assert {mlp + "gate_proj.weight", mlp + "down_proj.weight"} <= set(engine.fallback_keys())
    reference = tiny.brute_force_fisher(model, [(r, list(r)) for r in TOKEN_ROWS])
    assert_fisher_close(got, reference)


def test_fused_experts_fast_path_equals_brute_force_in_float64():
    """Tokens of every example spread over all experts, padding in the batch: the per-example
    grouping of the routed tokens is exact (float64, 1e-9), experts and routers on the fast path."""
    model = _tiny_mixtral()
    engine, got = _engine_fisher(model, TOKEN_ROWS + [[2, 2]])
    assert engine.fallback_keys() == []
    reference = tiny.brute_force_fisher(model, [(r, list(r)) for r in TOKEN_ROWS + [[2, 2]]])
    for name in (
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.gate.weight",
    ):
        torch.testing.assert_close(got[name], reference[name], rtol=1e-9, atol=1e-14)


def test_experts_shared_by_two_blocks_are_summed_then_squared():
    """One experts module (and router) called by both layers: each example's two contributions per
    expert are summed before squaring (ExpertGrads.merged), not squared apart."""
    model = _tiny_mixtral()
    first, second = model.model.layers[0].mlp, model.model.layers[1].mlp
    second.experts, second.gate = first.experts, first.gate
    engine, got = _engine_fisher(model, TOKEN_ROWS)
    assert engine.fallback_keys() == []
    reference = tiny.brute_force_fisher(model, [(r, list(r)) for r in TOKEN_ROWS])
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        torch.testing.assert_close(got[name], reference[name], rtol=1e-9, atol=1e-14)
    assert_fisher_close(got, reference)


def test_only_some_expert_tensors_selected():
    """A Fisher of one gate_up_proj and one router alone (as --params would select): those
    tensors, equal to brute force, and no other. The experts stay on the fast path; the layer-0
    router, with nothing selected upstream, has logits that need no gradient (its scores were
    computed inside the router already): exact fallback, still exact."""
    from mergekit_fisher.estimator.data import Example, collate
    from mergekit_fisher.estimator.engine import FisherEngine

    model = _tiny_mixtral().eval().requires_grad_(False)
    wanted = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight"]
    named = dict(model.named_parameters())
    engine = FisherEngine(
        model,
        fisher_type="empirical",
        accumulator_dtype=torch.float64,
        keys={id(named[name]): name for name in wanted},
    )
    examples = [Example(i, ids, list(ids)) for i, ids in enumerate(TOKEN_ROWS)]
    engine.step(collate(examples, 0, "causal-lm"))
    engine.close()
    got = engine.fisher()
    assert sorted(got) == sorted(wanted)
    assert engine.fallback_keys() == ["model.layers.0.mlp.gate.weight"]
    assert "needs no gradient" in engine.exact_reasons()["model.layers.0.mlp.gate.weight"]
    reference = tiny.brute_force_fisher(model, [(r, list(r)) for r in TOKEN_ROWS])
    assert_fisher_close(got, {name: reference[name] for name in wanted})
