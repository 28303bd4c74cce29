"""`merge_method: regmean` through mergekit's own entry points, against independent references.

Each model's Gram file is built here from known layer inputs Xᵢ (random, features at very different
scales), so the exact least-squares merge of every linear layer -- min Σᵢ wᵢ/nᵢ ‖XᵢWᵀ − XᵢWᵢᵀ‖²
over the mean Grams XᵢᵀXᵢ/nᵢ -- is computed in the test by `torch.linalg.lstsq` on the Xᵢ
themselves. Bad Gram files go through the stock `mergekit-yaml` command.
"""

from __future__ import annotations

import os

import pytest
import tiny
import torch
from merge_world import World, run_recipe
from test_merge_errors import assert_clean_failure, run_stock_cli

from mergekit_fisher.fisher_file import FisherConfig, write_fisher

LINEAR = "model.layers.1.mlp.down_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
EMBED = "model.embed_tokens.weight"


def is_linear(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and (name.endswith("proj.weight") or name == "lm_head.weight")


def layer_inputs(state, seed: int, rows: int):
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, tensor in state.items():
        if is_linear(name, tensor):
            width = tensor.shape[1]
            scale = torch.logspace(-1, 1, width, dtype=torch.float64)
            scale = scale[torch.randperm(width, generator=generator)]
            inputs[name] = (
                torch.randn(rows, width, generator=generator, dtype=torch.float64) * scale
            )
    return inputs


def write_gram(path: str, inputs, model: str, **config) -> str:
    grams = {name: (x.T @ x).float() for name, x in inputs.items()}
    counts = {name: int(x.shape[0]) for name, x in inputs.items()}
    write_fisher(
        grams,
        path,
        FisherConfig(model=model, statistic="gram", gram_counts=counts, **config),
    )
    return path


class GramWorld(World):
    def __init__(self, root: str, rows=(40, 90)):
        super().__init__(root, n_models=2)
        self.inputs, self.grams = {}, []
        for index, model in enumerate(self.models):
            self.inputs[model] = layer_inputs(self.states[model], 500 + index, rows[index])
            path = os.path.join(root, f"gram{index}")
            self.grams.append(write_gram(path, self.inputs[model], model))

    def regmean(self, weights=(1.0, 1.0), grams=None, shared=None):
        return recipe_with(self.models, "regmean", weights, grams or self.grams, shared)


def recipe_with(models, method, weights, grams=None, shared=None):
    entries = []
    for index, (model, weight) in enumerate(zip(models, weights)):
        params = {"weight": weight}
        if grams is not None and grams[index] is not None:
            params["gram"] = grams[index]
        entries.append({"model": model, "parameters": params})
    recipe = {"merge_method": method, "dtype": "float32", "models": entries}
    if shared:
        recipe["parameters"] = dict(shared)
    return recipe


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return GramWorld(str(tmp_path_factory.mktemp("regmean")))


def lstsq_merge(world, name, weights):
    blocks, targets = [], []
    for model, weight in zip(world.models, weights):
        x = world.inputs[model][name]
        factor = (weight / x.shape[0]) ** 0.5  # the mean Gram: each model's rows weigh 1/nᵢ
        blocks.append(factor * x)
        targets.append(factor * x @ world.states[model][name].double().T)
    return torch.linalg.lstsq(torch.cat(blocks), torch.cat(targets)).solution.T


def test_exact_least_squares_for_every_linear_layer(world, tmp_path):
    weights = [1.0, 3.0]
    merged = run_recipe(
        world.regmean(weights, shared={"regmean_alpha": 1.0, "regmean_ridge": 0.0}),
        str(tmp_path / "out"),
    )
    linear_names = [n for n, t in world.states[world.models[0]].items() if is_linear(n, t)]
    assert len(linear_names) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    for name in linear_names:
        expected = lstsq_merge(world, name, weights)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-4, atol=1e-5, msg=name)
    # everything else: the weighted average, as in the paper
    for name in (NORM, EMBED):
        a, b = (world.states[m][name].double() for m in world.models)
        torch.testing.assert_close(merged[name].double(), (a + 3 * b) / 4, msg=name)
    # and the closed form is not the average (the check above could not pass by accident)
    a, b = (world.states[m][LINEAR].double() for m in world.models)
    assert (merged[LINEAR].double() - (a + 3 * b) / 4).abs().max() > 1e-3


def test_equal_grams_give_mergekits_linear(world, tmp_path):
    same = [world.grams[0], world.grams[0]]  # model 0's Gram file for both models
    merged = run_recipe(
        world.regmean((1.0, 2.0), grams=same, shared={"gram_provenance": "warn"}),
        str(tmp_path / "regmean"),
    )
    linear = run_recipe(recipe_with(world.models, "linear", [1.0, 2.0]), str(tmp_path / "linear"))
    assert merged.keys() == linear.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], linear[name], rtol=1e-5, atol=1e-6, msg=name)


def test_alpha_scales_the_off_diagonal(world, tmp_path):
    alpha = 0.5
    merged = run_recipe(
        world.regmean(shared={"regmean_alpha": alpha, "regmean_ridge": 0.0}), str(tmp_path / "o")
    )
    tilde, rhs = 0, 0
    for model in world.models:
        x = world.inputs[model][LINEAR]
        g = x.T @ x / x.shape[0]
        g = alpha * g + (1 - alpha) * torch.diag(torch.diag(g))
        tilde = tilde + g
        rhs = rhs + g @ world.states[model][LINEAR].double().T
    expected = torch.linalg.solve(tilde, rhs).T
    torch.testing.assert_close(merged[LINEAR].double(), expected, rtol=1e-4, atol=1e-5)


def test_base_plus_adapter_models(tmp_path):
    """LoRA adapters as `base+adapter` references: mergekit merges W0 + BA, regmean merges those."""
    from peft import LoraConfig, get_peft_model

    tokenizer = str(tmp_path / "tokenizer")
    tiny.make_tokenizer(tokenizer)
    base_dir = str(tmp_path / "base")
    tiny.make_llama(base_dir, seed=0, tokenizer_dir=tokenizer)
    entries, dense_states, inputs = [], [], []
    for index in range(2):
        model = tiny.make_llama(seed=0)
        torch.manual_seed(10 + index)  # after make_llama, which seeds itself: distinct adapters
        peft_model = get_peft_model(
            model,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
        )
        adapter = str(tmp_path / f"adapter{index}")
        peft_model.save_pretrained(adapter)
        dense = {
            k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()
        }
        dense_states.append(dense)
        inputs.append(layer_inputs(dense, 700 + index, 50 + 20 * index))
        gram = write_gram(str(tmp_path / f"gram{index}"), inputs[-1], base_dir, adapter=adapter)
        entries.append({"model": f"{base_dir}+{adapter}", "parameters": {"gram": gram}})
    recipe = {
        "merge_method": "regmean",
        "dtype": "float32",
        "parameters": {"regmean_alpha": 1.0, "regmean_ridge": 0.0},
        "models": entries,
    }
    merged = run_recipe(recipe, str(tmp_path / "out"), lora_merge_cache=str(tmp_path / "cache"))
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.allclose(dense_states[0][name], dense_states[1][name])
    blocks, targets = [], []
    for state, x in zip(dense_states, inputs):
        x = x[name] / x[name].shape[0] ** 0.5
        blocks.append(x)
        targets.append(x @ state[name].double().T)
    expected = torch.linalg.lstsq(torch.cat(blocks), torch.cat(targets)).solution.T
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad Gram files, bad recipes


def edited_gram(world, tmp_path, label, edit=None, **config):
    inputs = {k: v.clone() for k, v in world.inputs[world.models[1]].items()}
    grams = {name: (x.T @ x).float() for name, x in inputs.items()}
    counts = {name: int(x.shape[0]) for name, x in inputs.items()}
    if edit is not None:
        edit(grams, counts)
    path = str(tmp_path / label)
    fields = {"model": world.models[1], "statistic": "gram", "gram_counts": counts, **config}
    write_fisher(grams, path, FisherConfig(**fields))
    return path


def _nan(grams, counts):
    grams[LINEAR][3, 4] = float("nan")


def _asymmetric(grams, counts):
    grams[LINEAR][0, 5] += 10 * float(grams[LINEAR].diagonal().max())


def _negative_diagonal(grams, counts):
    grams[LINEAR][2, 2] = -1.0


def _wrong_shape(grams, counts):
    grams[LINEAR] = torch.eye(32)


def _no_count(grams, counts):
    del counts[LINEAR]


def _missing_layer(grams, counts):
    del grams[LINEAR], counts[LINEAR]


@pytest.mark.parametrize(
    "edit,needles",
    [
        (_nan, ["non-finite", LINEAR]),
        (_asymmetric, ["not symmetric", LINEAR]),
        (_negative_diagonal, ["negative diagonal", LINEAR]),
        (_wrong_shape, ["Gram shape (32, 32)", LINEAR]),
        (_no_count, ["gram_counts", LINEAR]),
        (_missing_layer, ["has a Gram for this tensor, this model's has none", LINEAR]),
    ],
)
def test_bad_gram_file(world, tmp_path, edit, needles):
    bad = edited_gram(world, tmp_path, "bad", edit)
    result, shards = run_stock_cli(world.regmean(grams=[world.grams[0], bad]), tmp_path)
    assert_clean_failure(result, shards, bad, *needles)


def test_fisher_file_given_as_gram(world, tmp_path):
    result, shards = run_stock_cli(
        world.regmean(grams=[world.grams[0], world.fishers[1]]), tmp_path
    )
    assert_clean_failure(result, shards, world.fishers[1], "not a Gram file", "--statistic gram")


def test_gram_file_given_as_fisher(world, tmp_path):
    recipe = world.recipe("fisher", fishers=[world.fishers[0], world.grams[1]])
    result, shards = run_stock_cli(recipe, tmp_path)
    assert_clean_failure(result, shards, world.grams[1], "is a Gram file")


def test_model_without_gram(world, tmp_path):
    result, shards = run_stock_cli(world.regmean(grams=[world.grams[0], None]), tmp_path)
    assert_clean_failure(result, shards, world.models[1], "no Gram file", "gram:")


def test_missing_gram_file(world, tmp_path):
    missing = str(tmp_path / "nowhere")
    result, shards = run_stock_cli(world.regmean(grams=[world.grams[0], missing]), tmp_path)
    assert_clean_failure(result, shards, missing, "does not exist")


@pytest.mark.parametrize(
    "shared,needles",
    [
        ({"regmean_alpha": 1.5}, ["regmean_alpha must be between 0 and 1"]),
        ({"regmean_ridge": -1.0}, ["regmean_ridge must be a finite number"]),
        ({"gram_validate": "some"}, ["unknown gram_validate"]),
        ({"regmean_alpah": 0.5}, ["unknown parameter `regmean_alpah`", "regmean_alpha"]),
    ],
)
def test_bad_shared_parameters(world, tmp_path, shared, needles):
    result, shards = run_stock_cli(world.regmean(shared=shared), tmp_path)
    assert_clean_failure(result, shards, *needles)


def test_negative_weight_is_refused(world, tmp_path):
    result, shards = run_stock_cli(world.regmean(weights=(1.0, -1.0)), tmp_path)
    assert_clean_failure(result, shards, "negative weight")


def test_singular_system_without_ridge(world, tmp_path):
    def dead_feature(grams, counts):
        for name in grams:
            grams[name][:, 0] = 0.0
            grams[name][0, :] = 0.0

    dead = [edited_gram(world, tmp_path, f"dead{i}", dead_feature) for i in range(2)]
    shared = {"regmean_alpha": 1.0, "regmean_ridge": 0.0, "gram_provenance": "warn"}
    result, shards = run_stock_cli(world.regmean(grams=dead, shared=shared), tmp_path)
    assert_clean_failure(result, shards, "regmean_ridge", "not positive definite")


def test_headers_validation_still_refuses_bad_values_without_output(world, tmp_path):
    bad = edited_gram(world, tmp_path, "bad", _nan)
    recipe = world.regmean(grams=[world.grams[0], bad], shared={"gram_validate": "headers"})
    result, shards = run_stock_cli(recipe, tmp_path)
    assert_clean_failure(result, shards, bad, "non-finite", LINEAR)
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------- inspect / explain


def _cli(*args):
    from click.testing import CliRunner

    from mergekit_fisher.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_reports_a_gram_file(world):
    import json

    import numpy as np

    result = _cli("inspect", world.grams[0], "--model", world.models[0], "--json", "--check")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["statistic"] == "gram"
    rows = {row["name"]: row for row in report["gram"]["rows"]}
    query = "model.layers.0.self_attn.q_proj.weight"
    x = world.inputs[world.models[0]][query]  # 40 rows, width 32: full rank
    mean = (x.T @ x / x.shape[0]).numpy()
    row = rows[query]
    assert row["rows"] == x.shape[0] and row["width"] == x.shape[1] and row["problem"] is None
    assert row["trace"] == pytest.approx(float(np.trace(mean)), rel=1e-5)
    assert row["condition"] == pytest.approx(float(np.linalg.cond(mean)), rel=1e-3)
    assert row["rank"] == x.shape[1]
    inputs = world.inputs[world.models[0]]
    traces = {n: float(np.trace((v.T @ v).numpy())) / v.shape[0] for n, v in inputs.items()}
    assert row["share"] == pytest.approx(traces[query] / sum(traces.values()), rel=1e-5)
    # down_proj: width 64 from 40 rows -- rank 40, singular (condition inf: null in JSON)
    assert rows[LINEAR]["rank"] == 40 and rows[LINEAR]["condition"] is None
    coverage = report["gram"]["coverage"]
    assert coverage["covered"] == 15 and not coverage["extra"] and not coverage["shape_mismatches"]
    assert EMBED in coverage["without_gram"]
    text = _cli("inspect", world.grams[0])
    assert text.exit_code == 0 and "Gram file:" in text.output and "condition" in text.output


def test_inspect_check_flags_a_bad_gram(world, tmp_path):
    bad = edited_gram(world, tmp_path, "bad", _asymmetric)
    result = _cli("inspect", bad, "--check")
    assert result.exit_code == 1
    assert "not symmetric" in result.output


def test_explain_shows_each_models_share_of_the_trace(world, tmp_path):
    import json

    from merge_world import write_recipe

    recipe = write_recipe(world.regmean(weights=(1.0, 3.0)), str(tmp_path / "r.yml"))
    result = _cli("explain", recipe, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["merge_method"] == "regmean"
    group = next(g for g in report["groups"] if g["layer"] == 1 and g["module"] == "mlp.down_proj")
    traces = []
    for model, weight in zip(world.models, (1.0, 3.0)):
        x = world.inputs[model][LINEAR]
        traces.append(weight * float((x * x).sum()) / x.shape[0])
    shares = list(group["shares"].values())
    assert shares == pytest.approx([t / sum(traces) for t in traces], rel=1e-5)


def test_demo_regmean_recipe():
    from mergekit_fisher.demo.recipes import MERGE_METHODS, recipe_for

    assert "regmean" in MERGE_METHODS
    recipe = recipe_for(
        "regmean",
        base="/m/base",
        specialists={"docs": "/m/docs", "asyncio": "/m/asyncio"},
        fishers={"docs": "/f/docs", "asyncio": "/f/asyncio"},
        grams={"docs": "/g/docs", "asyncio": "/g/asyncio"},
        density=0.5,
    )
    assert recipe == {
        "merge_method": "regmean",
        "dtype": "float32",
        "models": [
            {"model": "/m/docs", "parameters": {"weight": 1.0, "gram": "/g/docs"}},
            {"model": "/m/asyncio", "parameters": {"weight": 1.0, "gram": "/g/asyncio"}},
        ],
    }


def test_hub_references_for_gram_files(world, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from test_hub import SHA, cache_repo

    cache = str(tmp_path / "hf_cache")
    os.makedirs(cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    cache_repo(cache, "org/grams", world.grams[1], sub="model1")
    local = run_recipe(world.regmean(), str(tmp_path / "local"))
    merged = run_recipe(
        world.regmean(grams=[world.grams[0], f"org/grams/model1@{SHA}"]), str(tmp_path / "hub")
    )
    for name, value in local.items():
        assert torch.equal(merged[name], value), name
    result, shards = run_stock_cli(world.regmean(grams=[world.grams[0], "org/no-grams"]), tmp_path)
    assert_clean_failure(result, shards, "org/no-grams", "neither a local path")


def _qkv_shared_files(world, tmp_path, label, share: bool, target=None):
    """Gram files where k_proj and v_proj read q_proj's input (as in a real model): stored three
    times, or once with `gram_shared`."""
    paths = []
    for index, model in enumerate(world.models):
        inputs = dict(world.inputs[model])
        shared = {}
        for layer in (0, 1):
            q = f"model.layers.{layer}.self_attn.q_proj.weight"
            for other in ("k_proj", "v_proj"):
                name = f"model.layers.{layer}.self_attn.{other}.weight"
                inputs[name] = inputs[q]
                shared[name] = target or q
        grams = {name: (x.T @ x).float() for name, x in inputs.items()}
        counts = {name: int(x.shape[0]) for name, x in inputs.items()}
        config = {"model": model, "statistic": "gram", "gram_counts": counts}
        if share:
            grams = {name: g for name, g in grams.items() if name not in shared}
            config["gram_shared"] = shared
        path = str(tmp_path / f"{label}{index}")
        write_fisher(grams, path, FisherConfig(**config))
        paths.append(path)
    return paths


def test_shared_grams_merge_like_stored_copies(world, tmp_path):
    copies = _qkv_shared_files(world, tmp_path, "copies", share=False)
    shared = _qkv_shared_files(world, tmp_path, "shared", share=True)
    a = run_recipe(world.regmean(grams=copies), str(tmp_path / "a"))
    b = run_recipe(world.regmean(grams=shared), str(tmp_path / "b"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    k = "model.layers.1.self_attn.k_proj.weight"
    plain = run_recipe(world.regmean(), str(tmp_path / "plain"))
    assert not torch.allclose(a[k], plain[k])  # k_proj did use q_proj's (different) Gram
    import json

    report = json.loads(_cli("inspect", shared[0], "--model", world.models[0], "--json").stdout)
    assert report["gram"]["coverage"]["covered"] == 15
    q_row = next(
        r for r in report["gram"]["rows"] if r["name"].endswith("1.self_attn.q_proj.weight")
    )
    assert q_row["shared_by"] == [k, "model.layers.1.self_attn.v_proj.weight"]


def test_shared_gram_pointing_nowhere(world, tmp_path):
    bad = _qkv_shared_files(world, tmp_path, "bad", share=True, target="model.nothing.weight")
    result, shards = run_stock_cli(world.regmean(grams=bad), tmp_path)
    assert_clean_failure(result, shards, "gram_shared", "model.nothing.weight", bad[0])
