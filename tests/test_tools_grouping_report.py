"""grouping: checkpoint name -> (layer, module type); report: number formats and aligned tables."""

import math

import pytest

from mergekit_fisher.tools.grouping import group_label, group_sort_key, layer_and_module
from mergekit_fisher.tools.report import format_table, human_count, human_float, percent


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.3.self_attn.q_proj.weight", (3, "self_attn.q_proj")),
        ("model.layers.12.mlp.down_proj.weight", (12, "mlp.down_proj")),
        ("model.layers.0.input_layernorm.weight", (0, "input_layernorm")),
        ("model.embed_tokens.weight", (None, "embed_tokens")),
        ("model.norm.weight", (None, "norm")),
        ("lm_head.weight", (None, "lm_head")),
        # GPT-2: weight and bias of one module share the module type
        ("transformer.h.0.attn.c_attn.weight", (0, "attn.c_attn")),
        ("transformer.h.11.attn.c_attn.bias", (11, "attn.c_attn")),
        ("transformer.wte.weight", (None, "wte")),
        ("transformer.ln_f.bias", (None, "ln_f")),
        # GPT-NeoX, MPT, BERT containers
        ("gpt_neox.layers.5.attention.query_key_value.weight", (5, "attention.query_key_value")),
        ("transformer.blocks.2.ffn.up_proj.weight", (2, "ffn.up_proj")),
        ("bert.encoder.layer.4.attention.self.query.weight", (4, "attention.self.query")),
        # PEFT: wrappers dropped, LoRA factor kept, adapter name dropped
        (
            "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
            (1, "self_attn.v_proj.lora_A"),
        ),
        (
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight",
            (1, "self_attn.v_proj.lora_B"),
        ),
        (
            "base_model.model.model.layers.1.self_attn.v_proj.base_layer.weight",
            (1, "self_attn.v_proj"),
        ),
        (
            "base_model.model.model.embed_tokens.lora_embedding_A",
            (None, "embed_tokens.lora_embedding_A"),
        ),
        # MoE experts group together across expert indices
        (
            "model.layers.2.block_sparse_moe.experts.7.w1.weight",
            (2, "block_sparse_moe.experts.*.w1"),
        ),
    ],
)
def test_layer_and_module(name, expected):
    assert layer_and_module(name) == expected


def test_group_label_and_order():
    names = [
        "model.layers.10.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "lm_head.weight",
        "model.layers.2.self_attn.k_proj.weight",
    ]
    assert [group_label(n, "tensor") for n in names] == names
    assert [group_label(n, "layer") for n in names] == ["layer 10", "layer 2", "lm_head", "layer 2"]
    assert [group_label(n, "module") for n in names] == [
        "mlp.up_proj",
        "mlp.up_proj",
        "lm_head",
        "self_attn.k_proj",
    ]
    labels = sorted({group_label(n, "layer") for n in names}, key=group_sort_key)
    assert labels == ["lm_head", "layer 2", "layer 10"]  # numeric, not lexicographic: 2 before 10
    with pytest.raises(ValueError):
        group_label(names[0], "row")


def test_number_formats():
    assert human_count(532) == "532"
    assert human_count(12345) == "12.3k"
    assert human_count(7_240_000_000) == "7.24G"
    assert human_count(None) == "-"
    assert human_float(0.000123456) == "0.0001235"
    assert human_float(1.5e-9) == "1.5e-09"
    assert human_float(2.0) == "2"
    assert human_float(float("nan")) == "nan"
    assert human_float(float("-inf")) == "-inf"
    assert human_float(None) == "-"
    assert percent(0.4213) == "42.1%"
    assert percent(None) == "-"
    assert percent(math.nan) == "-"


def test_format_table_aligns_numbers_right_and_text_left():
    text = format_table(
        ["name", "sum", "zeros"], [["a", "1.5", "10.0%"], ["longer_name", "123.25", "-"]]
    )
    lines = text.split("\n")
    assert lines[0] == "name            sum  zeros"
    assert lines[1] == "-----------  ------  -----"
    assert lines[2] == "a               1.5  10.0%"
    assert lines[3] == "longer_name  123.25      -"
    # explicit alignment wins; ragged rows are a programming error
    assert format_table(["x", "y"], [["1", "2"]], align="ll").split("\n")[2] == "1  2"
    with pytest.raises(ValueError):
        format_table(["x", "y"], [["1"]])


def _real_names():
    """Parameter names of real (tiny) transformers and PEFT models, not hand-written strings."""
    import re

    import tiny
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = tiny.make_llama(None, hidden=16, layers=3, vocab_size=32)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=8, n_head=2, vocab_size=32, n_positions=16))
    peft = get_peft_model(
        tiny.make_llama(None, hidden=16, layers=3, vocab_size=32),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    for model, container in ((llama, "layers"), (gpt2, "h"), (peft, "layers")):
        for name in model.state_dict():
            match = re.search(rf"\.{container}\.(\d+)\.", name)
            yield name, (int(match.group(1)) if match else None)


def test_real_model_names_group_by_their_block():
    names = list(_real_names())
    modules_per_layer = {}
    for name, layer in names:
        got_layer, module = layer_and_module(name)
        assert got_layer == layer, name
        # the module type names no layer, no parameter leaf and no PEFT wrapper
        assert not any(part.isdigit() for part in module.split(".")), name
        assert (
            not module.endswith((".weight", ".bias"))
            and "base_layer" not in module
            and "default" not in module
        )
        if layer is not None:
            modules_per_layer.setdefault(name.split(".")[0], {}).setdefault(layer, set()).add(
                module
            )
    for root, by_layer in modules_per_layer.items():  # every block has the same module types
        assert len({frozenset(types) for types in by_layer.values()}) == 1, root
    lora = {m for n, _ in names for m in [layer_and_module(n)[1]] if "lora" in n}
    assert lora == {
        "self_attn.q_proj.lora_A",
        "self_attn.q_proj.lora_B",
        "self_attn.v_proj.lora_A",
        "self_attn.v_proj.lora_B",
    }
