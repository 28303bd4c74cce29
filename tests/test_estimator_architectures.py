"""Other module types on the fast path: GPT-2 (HF Conv1D, LayerNorm with bias, learned position
embeddings whose output starts the graph, tied wte/lm_head) equals brute force; `--device-map` (GPUs
only) gives the single-device result."""

from __future__ import annotations

import pytest
import tiny
import torch
from estimator_helpers import assert_fisher_close, compute, lm_reference_examples

ROWS = [{"text": t} for t in tiny.CORPUS[:4]] + [{"prompt": "p:", "completion": " the end"}]


def _gpt2(path, tokenizer_dir):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(8)
    config = GPT2Config(
        vocab_size=300,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(torch.randn_like(module.weight) * 0.2)
                module.bias.add_(torch.randn_like(module.bias) * 0.2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)


def test_gpt2_equals_brute_force(tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model_dir = str(tmp_path / "gpt2")
    _gpt2(model_dir, tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS)
    got = compute(
        model_dir,
        str(tmp_path / "f"),
        data,
        fisher_type="empirical",
        batch_size=3,
        dtype="float64",
        accumulator_dtype="float64",
    )
    from mergekit_fisher.fisher_file import open_fisher

    assert open_fisher(str(tmp_path / "f")).config.fallback_tensors == []  # all on the fast path
    reference = tiny.brute_force_fisher(
        GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float64),
        lm_reference_examples(AutoTokenizer.from_pretrained(tokenizer_dir), ROWS),
    )
    stored = set(tiny.state_dict_from_dir(model_dir))
    assert set(got) == stored
    assert_fisher_close(got, {name: reference[name] for name in stored})


def _device_map_world(tmp_path, tokenizer_dir, layers: int = 2):
    model_dir = str(tmp_path / "m")
    tiny.make_llama(model_dir, seed=3, layers=layers, tokenizer_dir=tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS)
    return model_dir, data


def _brute_force(model_dir, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    reference = tiny.brute_force_fisher(
        LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64),
        lm_reference_examples(AutoTokenizer.from_pretrained(tokenizer_dir), ROWS),
    )
    return {name: reference[name] for name in tiny.state_dict_from_dir(model_dir)}


FLOAT64 = dict(fisher_type="empirical", batch_size=2, dtype="float64", accumulator_dtype="float64")

# On a CPU-only machine `--device-map auto` loads the whole model on the CPU with no accelerate
# hooks: the same code as a plain run, so there is nothing to compare there. These need GPUs.


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="--device-map auto only places the model on GPUs"
)
def test_device_map_auto_on_a_gpu_equals_brute_force_and_the_plain_run(tokenizer_dir, tmp_path):
    model_dir, data = _device_map_world(tmp_path, tokenizer_dir)
    mapped = compute(model_dir, str(tmp_path / "mapped"), data, device_map="auto", **FLOAT64)
    plain = compute(
        model_dir, str(tmp_path / "plain"), data, **FLOAT64
    )  # moved to the accelerator's GPU
    assert_fisher_close(mapped, _brute_force(model_dir, tokenizer_dir))
    for name in plain:
        torch.testing.assert_close(mapped[name], plain[name], rtol=1e-10, atol=0, msg=name)


def _split_over_two_gpus(model_dir):
    """Layer-wise map: embeddings and the first half of the layers on cuda:0, the rest and lm_head
    on cuda:1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    layers = len(model.model.layers)
    device_map = {}
    for name, _child in model.model.named_children():
        if name == "layers":
            device_map.update(
                {f"model.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)}
            )
        else:
            device_map[f"model.{name}"] = 1 if name == "norm" else 0
    device_map["lm_head"] = 1
    return device_map


def _auto_spreads_over_gpus(model_dir) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="auto", dtype=torch.float64)
    devices = {p.device for p in model.parameters()}
    del model
    return len(devices) > 1


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="splitting one model over devices needs 2 CUDA GPUs"
)
@pytest.mark.parametrize("how", ["auto", "explicit"])
def test_device_map_over_two_gpus_equals_the_single_device_run(tokenizer_dir, tmp_path, how):
    """The model's layers on different GPUs (accelerate hooks move activations between them; the
    per-example gradient terms of a layer meet its accumulator on its own device): same Fisher as
    the plain single-device run, and as brute force."""
    model_dir, data = _device_map_world(tmp_path, tokenizer_dir, layers=4)
    if how == "auto":
        if not _auto_spreads_over_gpus(model_dir):
            pytest.skip(
                "device_map='auto' put this tiny model on a single GPU; "
                "the explicit map covers the split"
            )
        device_map = "auto"
    else:
        device_map = _split_over_two_gpus(model_dir)
    mapped = compute(model_dir, str(tmp_path / "mapped"), data, device_map=device_map, **FLOAT64)
    plain = compute(model_dir, str(tmp_path / "plain"), data, **FLOAT64)
    assert_fisher_close(mapped, _brute_force(model_dir, tokenizer_dir))
    for name in plain:
        torch.testing.assert_close(mapped[name], plain[name], rtol=1e-10, atol=0, msg=name)
