"""LoRA: the dense Fisher of W0 + BA equals the Fisher of the merged dense model; adapter space
equals brute force on lora_A / lora_B under the adapter file's names."""

from __future__ import annotations

import pytest
import tiny
import torch
from estimator_helpers import assert_fisher_close, compute, lm_reference_examples
from transformers import AutoTokenizer, LlamaForCausalLM

ROWS = [{"text": t} for t in tiny.CORPUS[:5]] + [{"prompt": "p: merge", "completion": " done"}]
TARGETS = ["q_proj", "v_proj", "down_proj"]
F64 = dict(fisher_type="empirical", batch_size=3, dtype="float64", accumulator_dtype="float64")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    base_dir, adapter_dir, merged_dir = (
        str(root / "base"),
        str(root / "adapter"),
        str(root / "merged"),
    )
    tiny.make_llama(base_dir, seed=12, tie=True, tokenizer_dir=tokenizer_dir)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1, init_lora_weights=False
    )
    get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config).save_pretrained(adapter_dir)
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_dir), adapter_dir
    ).merge_and_unload()
    merged.save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(merged_dir)
    return {
        "base": base_dir,
        "adapter": adapter_dir,
        "merged": merged_dir,
        "data": tiny.write_jsonl(str(root / "d.jsonl"), ROWS),
        "tokenizer": AutoTokenizer.from_pretrained(tokenizer_dir),
    }


def test_dense_lora_fisher_equals_merged_model_fisher(world, tmp_path):
    dense = compute(
        world["base"], str(tmp_path / "lora"), world["data"], lora=world["adapter"], **F64
    )
    merged = compute(world["merged"], str(tmp_path / "merged"), world["data"], **F64)
    assert set(dense) == set(tiny.state_dict_from_dir(world["base"]))  # base checkpoint names
    assert_fisher_close(dense, merged)
    base_only = compute(world["base"], str(tmp_path / "base"), world["data"], **F64)
    name = "model.layers.0.self_attn.q_proj.weight"  # the adapter changes the Fisher of the targets
    assert not torch.allclose(base_only[name], dense[name], rtol=1e-3)


def test_adapter_targets_only(world, tmp_path):
    dense = compute(
        world["base"], str(tmp_path / "all"), world["data"], lora=world["adapter"], **F64
    )
    targets = compute(
        world["base"],
        str(tmp_path / "t"),
        world["data"],
        lora=world["adapter"],
        params="adapter-targets",
        **F64,
    )
    expected = {
        f"model.layers.{i}.{part}.{t}.weight"
        for i in range(2)
        for part, t in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]
    }
    assert set(targets) == expected
    for name in expected:
        torch.testing.assert_close(targets[name], dense[name], rtol=1e-6, atol=0)


def test_adapter_space_equals_brute_force(world, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    got = compute(
        world["base"],
        str(tmp_path / "a"),
        world["data"],
        lora=world["adapter"],
        space="adapter",
        **F64,
    )
    with safe_open(f"{world['adapter']}/adapter_model.safetensors", framework="pt") as handle:
        assert set(got) == set(handle.keys())
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(world["base"], dtype=torch.float64), world["adapter"]
    )
    full = tiny.brute_force_fisher(model, lm_reference_examples(world["tokenizer"], ROWS))
    reference = {
        name.replace(".default.", "."): value for name, value in full.items() if ".lora_" in name
    }
    assert_fisher_close(got, reference)


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens_dense_and_adapter_space(tokenizer_dir, tmp_path, tie):
    """peft's trainable tokens (LoRA + trainable_token_indices): the embedding runs W0 with the
    trained rows replaced (a TrainableTokensLayer, tied to the LM head too when the weights are
    tied). Dense: the Fisher of that effective weight under the base name, equal to the merged
    model's; adapter space: the trained rows (trainable_tokens_delta) under the adapter file's name,
    equal to brute force."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors import safe_open

    from mergekit_fisher.fisher_file import open_fisher

    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    tiny.make_llama(base_dir, seed=21, tie=tie, tokenizer_dir=tokenizer_dir)
    torch.manual_seed(1)
    config = LoraConfig(
        r=4,
        target_modules=["q_proj"],
        init_lora_weights=False,
        trainable_token_indices=[223, 85, 7],
    )
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(adapter_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS)
    examples = lm_reference_examples(AutoTokenizer.from_pretrained(tokenizer_dir), ROWS)
    assert any(t in ids for t in (223, 85) for ids, _ in examples)  # the trained rows are used

    dense = compute(base_dir, str(tmp_path / "dense"), data, lora=adapter_dir, **F64)
    assert set(dense) == set(tiny.state_dict_from_dir(base_dir))
    assert (
        open_fisher(str(tmp_path / "dense")).config.fallback_tensors == []
    )  # hooked: W_eff's Fisher
    merged = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float64), adapter_dir
    ).merge_and_unload()
    reference = tiny.brute_force_fisher(merged, examples)
    assert_fisher_close(dense, {name: reference[name] for name in dense})

    space = compute(
        base_dir, str(tmp_path / "space"), data, lora=adapter_dir, space="adapter", **F64
    )
    with safe_open(f"{adapter_dir}/adapter_model.safetensors", framework="pt") as handle:
        assert set(space) == set(handle.keys())
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float64), adapter_dir
    )
    full = tiny.brute_force_fisher(model, examples)
    from mergekit_fisher.estimator.lora import adapter_names

    by_param = {id(p): full[n] for n, p in model.named_parameters() if n in full}
    assert_fisher_close(
        space, {names[0]: by_param[pid] for pid, names in adapter_names(model).items()}
    )
