"""`compute --statistic gram` against a brute-force reference: every linear layer's inputs collected
with plain forward hooks, one example at a time (no padding), in float64. Then the Grams feed a
`regmean` merge that must equal the least-squares merge of the collected inputs themselves."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tiny
import torch
from estimator_helpers import lm_reference_examples
from merge_world import run_recipe

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.estimator.checkpoint import checkpoint_path
from mergekit_fisher.estimator.runner import ComputeOptions, Interrupted, run_compute
from mergekit_fisher.fisher_file import open_fisher

ROWS = [{"text": t} for t in tiny.CORPUS] + [
    {"text": "a b"},
    {"prompt": "odd one", "completion": " out"},
]
COMMON = dict(dtype="float64", accumulator_dtype="float64", progress=False, shuffle=False)


def linear_modules(model):
    """name of the weight -> module, for every nn.Linear / Conv1D not tied to an embedding."""
    from transformers.pytorch_utils import Conv1D

    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {
        f"{name}.weight": module
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and id(module.weight) not in embedded
    }


def brute_force_inputs(model_dir, tokenizer_dir, rows, *, model=None):
    """weight name -> every input row its layer saw (float64), examples run one at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.eval()
    seen = {}
    handles = []
    for name, module in linear_modules(model).items():

        def hook(_module, args, name=name):
            x = args[0].detach().to(torch.float64)
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids, _labels in lm_reference_examples(tokenizer, rows):
            model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


def gram_of(out):
    """The file and every layer's Gram, shared ones (`gram_shared`: stored once) included."""
    gram = open_fisher(out)
    values = {name: gram.get_tensor(name, check=False).double() for name in gram.names()}
    for name, stored in (gram.config.gram_shared or {}).items():
        assert name not in values
        values[name] = values[stored]
    return gram, values


def assert_grams_match(out, inputs, rtol=1e-6):
    """Grams are stored float32: equal to float32 rounding (|G_ij| <= max diag bounds the atol)."""
    gram, values = gram_of(out)
    assert gram.config.statistic == "gram"
    assert set(values) == set(inputs), sorted(set(values) ^ set(inputs))
    for name, x in inputs.items():
        expected = x.T @ x
        scale = float(expected.diagonal().max())
        torch.testing.assert_close(values[name], expected, rtol=rtol, atol=rtol * scale, msg=name)
        assert gram.config.gram_counts[name] == x.shape[0], name
    return gram


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("gram")
    model = str(root / "m")
    tiny.make_llama(model, seed=41, tokenizer_dir=tokenizer_dir)
    data = tiny.write_jsonl(str(root / "d.jsonl"), ROWS)
    inputs = brute_force_inputs(model, tokenizer_dir, ROWS)
    return {"model": model, "data": data, "inputs": inputs, "root": root}


def compute_gram(model, out, data, **options):
    return run_compute(
        ComputeOptions(model=model, out_dir=out, data=data, statistic="gram", **options)
    )


def test_padded_batches_equal_brute_force(world, tmp_path):
    out = str(tmp_path / "g")
    config = compute_gram(world["model"], out, world["data"], batch_size=4, **COMMON)
    # every linear layer, the head too (untied); none transposed; tokens = non-padding tokens
    assert len(world["inputs"]) == 2 * 7 + 1
    gram = assert_grams_match(out, world["inputs"])
    assert config.num_tokens == world["inputs"]["lm_head.weight"].shape[0]
    assert config.fisher_type is None and not gram.config.gram_transposed
    # q/k/v read one input, gate/up another: their Grams are stored once
    expected_shared = {}
    for layer in (0, 1):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        expected_shared[f"{attn}.k_proj.weight"] = f"{attn}.q_proj.weight"
        expected_shared[f"{attn}.v_proj.weight"] = f"{attn}.q_proj.weight"
        expected_shared[f"{mlp}.up_proj.weight"] = f"{mlp}.gate_proj.weight"
    assert gram.config.gram_shared == expected_shared
    assert len(gram.names()) == 15 - 6
    assert config.num_examples == len(ROWS)
    with open(os.path.join(out, "README.md"), encoding="utf-8") as fp:
        card = fp.read()  # the card says what the file is and how to merge with it
    assert "# Gram matrices (RegMean)" in card and "merge_method: regmean" in card
    assert f"gram: {out}" in card and "jin2023dataless" in card


def test_tied_head_gets_no_gram_and_conv1d_is_marked_transposed(tmp_path, tokenizer_dir):
    model_dir = str(tmp_path / "gpt2")
    tiny.make_family("gpt2", model_dir, seed=3, tokenizer_dir=tokenizer_dir, dtype=torch.float64)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS)
    inputs = brute_force_inputs(model_dir, tokenizer_dir, ROWS)
    assert "lm_head.weight" not in inputs  # tied to the token embedding
    out = str(tmp_path / "g")
    compute_gram(model_dir, out, data, batch_size=3, **COMMON)
    gram = assert_grams_match(out, inputs)
    assert sorted(gram.config.gram_transposed) == sorted(inputs)  # every GPT-2 linear is a Conv1D


def test_resume_after_interrupt_equals_one_run(world, tmp_path):
    options = dict(batch_size=2, checkpoint_every=4, **COMMON)
    out = str(tmp_path / "resumed")
    opts = ComputeOptions(
        model=world["model"], out_dir=out, data=world["data"], statistic="gram", **options
    )
    with pytest.raises(Interrupted):
        run_compute(opts, interrupt_after_rounds=3)
    assert not os.path.exists(out) and os.path.exists(checkpoint_path(out))
    # a Fisher run on the same OUT does not resume the Gram checkpoint
    fisher_opts = ComputeOptions(
        model=world["model"], out_dir=out, data=world["data"], fisher_type="empirical", **options
    )
    with pytest.raises(FisherInputError, match="different options"):
        run_compute(fisher_opts)
    run_compute(opts)
    assert not os.path.exists(checkpoint_path(out))
    assert_grams_match(out, world["inputs"])


def test_lora_wrapped_layers_get_their_inputs_under_base_names(world, tmp_path, tokenizer_dir):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float64)
    torch.manual_seed(7)
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False
        ),
    )
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float64), adapter
    ).merge_and_unload()
    inputs = brute_force_inputs(None, tokenizer_dir, ROWS, model=merged)
    out = str(tmp_path / "g")
    compute_gram(world["model"], out, world["data"], lora=adapter, batch_size=3, **COMMON)
    assert_grams_match(out, inputs)
    # the adapter changes what later layers see: these are not the base model's Grams
    name = "model.layers.1.self_attn.q_proj.weight"
    base_x = world["inputs"][name]
    assert not torch.allclose(inputs[name].T @ inputs[name], base_x.T @ base_x)


def test_adapter_targets_only(world, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float64)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["v_proj", "down_proj"]))
    adapter = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter)  # B = 0: the dense model is the base
    out = str(tmp_path / "g")
    compute_gram(
        world["model"], out, world["data"], lora=adapter, params="adapter-targets", **COMMON
    )
    wanted = {n: x for n, x in world["inputs"].items() if "v_proj" in n or "down_proj" in n}
    assert len(wanted) == 4
    assert_grams_match(out, wanted)


def test_adapter_space_is_refused(world, tmp_path):
    with pytest.raises(FisherInputError, match="--space dense"):
        compute_gram(
            world["model"], str(tmp_path / "g"), world["data"], lora=str(tmp_path), space="adapter"
        )


def test_two_processes_equal_one(world, tmp_path):
    one = str(tmp_path / "one")
    compute_gram(world["model"], one, world["data"], batch_size=2, **COMMON)
    two = str(tmp_path / "two")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        *("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"),
        *("-m", "mergekit_fisher", "compute", world["model"], two, "--data", world["data"]),
        *("--statistic", "gram", "--batch-size", "2", "--dtype", "float64"),
        *("--accumulator-dtype", "float64", "--no-shuffle", "--no-progress"),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = gram_of(one), gram_of(two)
    assert second[0].config.num_processes == 2
    assert first[0].config.gram_counts == second[0].config.gram_counts
    for name, value in first[1].items():
        torch.testing.assert_close(second[1][name], value, rtol=1e-12, atol=1e-12, msg=name)
    assert_grams_match(two, world["inputs"])


def _fine_tunes_merged(base, parts, tmp_path, tokenizer_dir, *, seed, batch_size):
    """Perturbed copies of `base`, one per part of the rows, each with its computed Gram and the
    brute-force inputs of its layers; merged by `regmean` at α = 1 without a ridge (exact least
    squares). Returns (merged state, per-model inputs, per-model states)."""
    models, grams, inputs, states = [], [], [], []
    for index, rows in enumerate(parts):
        path = str(tmp_path / f"ft{index}")
        tiny.perturbed_copy(base, path, seed=seed + index, scale=0.05, tokenizer_dir=tokenizer_dir)
        data = tiny.write_jsonl(str(tmp_path / f"d{index}.jsonl"), rows)
        gram = str(tmp_path / f"gram{index}")
        compute_gram(path, gram, data, batch_size=batch_size, **COMMON)
        models.append(path)
        grams.append(gram)
        inputs.append(brute_force_inputs(path, tokenizer_dir, rows))
        states.append(tiny.state_dict_from_dir(path))
    recipe = {
        "merge_method": "regmean",
        "dtype": "float64",
        "parameters": {"regmean_alpha": 1.0, "regmean_ridge": 0.0},
        "models": [{"model": m, "parameters": {"gram": g}} for m, g in zip(models, grams)],
    }
    return run_recipe(recipe, str(tmp_path / "out")), inputs, states


def test_computed_grams_merge_to_the_least_squares_solution(world, tmp_path, tokenizer_dir):
    """End to end: two fine-tunes, each measured on its own data; regmean = lstsq on those
    inputs (mean Grams: each model's rows weigh 1/nᵢ)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float64)
    merged, inputs, states = _fine_tunes_merged(
        base, [ROWS[:5], ROWS[5:]], tmp_path, tokenizer_dir, seed=60, batch_size=2
    )
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        blocks = [x[name] / x[name].shape[0] ** 0.5 for x in inputs]
        targets = [b @ s[name].double().T for b, s in zip(blocks, states)]
        expected = torch.linalg.lstsq(torch.cat(blocks), torch.cat(targets)).solution.T
        # Grams are stored float32: the solve inherits their rounding times the condition number
        torch.testing.assert_close(merged[name], expected, rtol=1e-4, atol=1e-5, msg=name)
        assert (merged[name] - sum(s[name] for s in states) / 2).abs().max() > 1e-3


def test_conv1d_weights_merge_in_their_own_layout(tmp_path, tokenizer_dir):
    """GPT-2 stores its linear weights [in, out] (y = x W): regmean solves W = (Σ Gᵢ)⁻¹ Σ Gᵢ Wᵢ
    there, the square attention c_proj included (whose layout a shape cannot tell)."""
    base = tiny.make_family("gpt2", seed=5, dtype=torch.float64)
    merged, inputs, states = _fine_tunes_merged(
        base, [ROWS[:6], ROWS[4:]], tmp_path, tokenizer_dir, seed=80, batch_size=3
    )
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"):
        blocks = [x[name] / x[name].shape[0] ** 0.5 for x in inputs]
        targets = [b @ s[name].double() for b, s in zip(blocks, states)]  # x W: [in, out]
        expected = torch.linalg.lstsq(torch.cat(blocks), torch.cat(targets)).solution
        # float32 Grams, condition numbers up to ~4e5 here: agreement to ~1e-4 of max |W|
        torch.testing.assert_close(merged[name], expected, rtol=1e-3, atol=1e-3, msg=name)
        if name.endswith("c_attn.weight"):
            continue  # [32, 96]: no other layout is possible; c_proj [32, 32] is square
        # the other layout (solving as if the weight were [out, in]) is far off
        flipped = [b @ s[name].double().T for b, s in zip(blocks, states)]
        wrong = torch.linalg.lstsq(torch.cat(blocks), torch.cat(flipped)).solution.T
        assert (merged[name] - wrong).abs().max() > 0.05, name


def test_combine_refuses_gram_files(world, tmp_path):
    from click.testing import CliRunner

    from mergekit_fisher.cli import main

    gram = str(tmp_path / "g")
    compute_gram(world["model"], gram, world["data"], batch_size=4, **COMMON)
    result = CliRunner().invoke(main, ["combine", gram, gram, str(tmp_path / "out")])
    assert result.exit_code == 2 and "is a Gram file" in result.output, result.output
    assert not os.path.exists(tmp_path / "out")


def test_sequence_classifier(tmp_path, tokenizer_dir):
    """--task seq-cls: the head runs on every position (then pools), so it sees every token too."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = str(tmp_path / "cls")
    tiny.make_llama_classifier(model_dir, seed=4, tokenizer_dir=tokenizer_dir, dtype=torch.float64)
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(tiny.CORPUS)]
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), rows)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float64)
    seen, handles = {}, []
    for name, module in linear_modules(model).items():

        def hook(_module, args, name=name):
            x = args[0].detach()
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in rows:
            model(input_ids=torch.tensor([tokenizer(row["text"])["input_ids"]]))
    inputs = {name: torch.cat(chunks) for name, chunks in seen.items()}
    assert "score.weight" in inputs
    out = str(tmp_path / "g")
    compute_gram(model_dir, out, data, task="seq-cls", batch_size=3, **COMMON)
    assert_grams_match(out, inputs)


def test_bfloat16_grams_are_the_float32_ones_rounded(world, tmp_path):
    """--save-dtype bfloat16 halves a Gram file: the stored values are the float32 run's rounded to
    bfloat16, and the shared-input map and counts are unchanged."""
    full, half = str(tmp_path / "f32"), str(tmp_path / "bf16")
    compute_gram(world["model"], full, world["data"], **COMMON)
    compute_gram(world["model"], half, world["data"], save_dtype="bfloat16", **COMMON)
    (f32, values), (b16, rounded) = gram_of(full), gram_of(half)
    assert b16.config.dtype == "bfloat16" and {b16.header(n).dtype for n in b16.names()} == {"BF16"}
    assert b16.config.gram_shared == f32.config.gram_shared
    assert b16.config.gram_counts == f32.config.gram_counts
    for name, value in values.items():
        expected = value.float().to(torch.bfloat16).double()
        torch.testing.assert_close(rounded[name], expected, rtol=0, atol=0, msg=name)
