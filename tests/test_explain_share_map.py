"""`explain` for the TIES/DARE family (shares of the deltas the merge keeps, checked by hand and
against the real merge's random draws), `base+adapter` inputs read lazily (nothing written), and the
share map's content (every tensor group, plan order, numbers printed) checked from its data."""

from __future__ import annotations

import json
import os
import re

import pytest
import tiny
import torch
from click.testing import CliRunner
from merge_world import World, run_recipe, write_recipe

from mergekit_fisher.cli import main as cli
from mergekit_fisher.fisher_file import FisherConfig, write_fisher

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("kept")), n_models=2)


def explain_json(recipe_path, *extra):
    result = CliRunner().invoke(cli, ["explain", recipe_path, "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def row(report, layer, module):
    return next(r for r in report["groups"] if r["layer"] == layer and r["module"] == module)


def group_of(name):
    """The test's own reading of Llama names: (layer, module)."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, re.sub(r"^model\.", "", name).rsplit(".", 1)[0]


def test_fisher_ties_shares_count_only_the_kept_deltas(world, tmp_path):
    """Hand-computed TIES: top-50 % magnitudes of each delta, sign elected by the Fisher-weighted
    sum, each model's Fisher mass over the elements where its delta survives both."""
    recipe = world.recipe(
        "fisher_ties",
        base=world.base,
        per_model={"density": 0.5},
        shared={"fisher_normalize": "none", "fisher_floor": 0.0},
    )
    report = explain_json(write_recipe(recipe, str(tmp_path / "r.yml")))
    assert report["share_of"] == "kept_fisher_mass" and not report["random"]
    base = world.states[world.base][Q0].double()
    deltas, fishers = [], []
    for model in world.models:
        delta = world.states[model][Q0].double() - base
        k = int(0.5 * delta.numel())
        keep = torch.zeros(delta.numel(), dtype=torch.bool)
        keep[delta.abs().flatten().argsort(descending=True)[:k]] = True
        deltas.append(delta * keep.view_as(delta))
        fishers.append(world.fisher_values[model][Q0].double())
    mean = sum(fishers) / len(fishers)
    elected = sum(f / mean * d for f, d in zip(fishers, deltas))
    majority = torch.where(elected >= 0, 1.0, -1.0)
    masses = [
        float((f * ((d != 0) & (d.sign() == majority))).sum()) for f, d in zip(fishers, deltas)
    ]
    q0 = row(report, 0, "self_attn.q_proj")
    assert q0["shares"]["model0"] == pytest.approx(masses[0] / sum(masses), rel=1e-6)
    untrimmed = float(fishers[0].sum() / (fishers[0].sum() + fishers[1].sum()))
    assert abs(q0["shares"]["model0"] - untrimmed) > 1e-3  # the kept shares are another quantity
    none = sum(((d != 0) & (d.sign() == majority)) for d in deltas) == 0
    assert q0["none_kept_fraction"] == pytest.approx(float(none.double().mean()))


def test_dare_shares_use_the_merges_own_random_draws(world, tmp_path):
    """fisher_dare_ties with --random-seed: the elements where the real merge (mergekit's
    run_merge, same seed) left the base unchanged are exactly those explain counts as keeping no
    delta, per tensor group; another seed draws differently."""
    recipe = world.recipe("fisher_dare_ties", base=world.base, per_model={"density": 0.5})
    path = write_recipe(recipe, str(tmp_path / "r.yml"))
    merged = run_recipe(recipe, str(tmp_path / "out"), random_seed=7)
    base = world.states[world.base]
    unchanged = {}
    for name, tensor in merged.items():
        key = group_of(name)
        count, total = unchanged.get(key, (0, 0))
        unchanged[key] = (count + int((tensor == base[name]).sum()), total + tensor.numel())
    report = explain_json(path, "--random-seed", "7")
    assert report["random"] and report["random_seed"] == 7
    for group in report["groups"]:
        count, total = unchanged[(group["layer"], group["module"])]
        assert group["elements"] == total
        assert round(group["none_kept_fraction"] * total) == count, group
    other = explain_json(path, "--random-seed", "8")
    assert any(
        a["none_kept_fraction"] != b["none_kept_fraction"]
        for a, b in zip(report["groups"], other["groups"])
    )


def test_base_plus_adapter_is_read_lazily_and_writes_nothing(tmp_path, tokenizer_dir):
    """explain on `base+adapter` models without --lora-merge-cache: no merged copy anywhere, and
    the same report as the same recipe over peft's merged models (merge_and_unload)."""
    from peft import LoraConfig, get_peft_model

    base_dir = str(tmp_path / "base")
    tiny.make_llama(base_dir, seed=0, tokenizer_dir=tokenizer_dir)
    adapted, dense = [], []
    for index in range(2):
        torch.manual_seed(10 + index)
        peft_model = get_peft_model(
            tiny.make_llama(seed=0),
            LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
            ),
        )
        adapter_dir = str(tmp_path / f"adapter{index}")
        peft_model.save_pretrained(adapter_dir)
        dense_dir = str(tmp_path / f"dense{index}")
        peft_model.merge_and_unload().save_pretrained(dense_dir)
        adapted.append(f"{base_dir}+{adapter_dir}")
        dense.append(dense_dir)
    state = tiny.state_dict_from_dir(base_dir)
    fishers = []
    for index in range(2):
        generator = torch.Generator().manual_seed(50 + index)
        values = {k: torch.rand(v.shape, generator=generator) + 0.1 for k, v in state.items()}
        fishers.append(str(tmp_path / f"fisher{index}"))
        write_fisher(values, fishers[-1], FisherConfig(model=base_dir))

    def recipe(models):
        return {
            "merge_method": "fisher_ties",
            "dtype": "float32",
            "base_model": base_dir,
            "models": [
                {"model": m, "parameters": {"fisher": f, "density": 0.5}}
                for m, f in zip(models, fishers)
            ],
        }

    before = sorted(os.listdir(tmp_path))
    lazy = explain_json(write_recipe(recipe(adapted), str(tmp_path / "lazy.yml")))
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["lazy.yml"])  # no cache, no model
    reference = explain_json(write_recipe(recipe(dense), str(tmp_path / "dense.yml")))
    changed = row(lazy, 0, "self_attn.q_proj")
    assert 0 < list(changed["shares"].values())[0] < 1 and changed["none_kept_fraction"] < 1
    # a module the adapters leave alone has no delta to keep: the merge there is the base
    assert row(lazy, 0, "mlp.up_proj")["none_kept_fraction"] == 1.0
    for mine, theirs in zip(lazy["groups"], reference["groups"]):
        assert (mine["layer"], mine["module"]) == (theirs["layer"], theirs["module"])
        assert list(mine["shares"].values()) == pytest.approx(
            list(theirs["shares"].values()), rel=1e-5, nan_ok=True
        )
        assert mine["none_kept_fraction"] == pytest.approx(theirs["none_kept_fraction"])
    # a merge in the same process still needs mergekit's cache (explain's loaders are gone)
    from mergekit_fisher.errors import FisherInputError

    with pytest.raises(FisherInputError, match="--lora-merge-cache"):
        run_recipe(recipe(adapted), str(tmp_path / "out"))


def test_share_map_holds_every_group_in_plan_order(world, tmp_path):
    from mergekit_fisher.tools.plotting import figure_inches, plot_share_map
    from mergekit_fisher.tools.share_map import share_map

    recipe = world.recipe("fisher", shared={"fisher_normalize": "none", "fisher_floor": 0.0})
    report = explain_json(write_recipe(recipe, str(tmp_path / "r.yml")))
    data = share_map(report)
    names = list(world.states[world.models[0]])
    layers = sorted({group_of(n)[0] for n in names if group_of(n)[0] is not None})
    outside = [group_of(n)[1] for n in names if group_of(n)[0] is None]
    assert set(outside) == {"embed_tokens", "norm", "lm_head"}
    assert data.rows == ["embed_tokens", *[f"layer {i}" for i in layers], "norm", "lm_head"]
    assert data.spanning == [True] + [False] * len(layers) + [True, True]
    assert len(data.columns) == 9 and "q" in data.columns and "post_attn_norm" in data.columns
    # values: the model's share from its Fisher mass, computed here from the Fisher files
    f0, f1 = (world.fisher_values[m] for m in world.models)
    for name in names:
        layer, module = group_of(name)
        share = float(f0[name].double().sum() / (f0[name].double().sum() + f1[name].double().sum()))
        r = data.rows.index(module if layer is None else f"layer {layer}")
        if layer is None:
            assert data.shares[0, r] == pytest.approx(share)  # the whole row
        else:
            c = data.modules.index(module)
            assert data.shares[0, r, c] == pytest.approx(share)
            assert data.shares[1, r, c] == pytest.approx(1 - share)
    assert data.centre == 0.5
    png, printed = plot_share_map(data, str(tmp_path / "share.png"))
    from PIL import Image

    with Image.open(png) as image:
        width, height = figure_inches(data)
        assert abs(image.size[0] - width * 100) <= 1 and abs(image.size[1] - height * 100) <= 1
    title = next(t for t, *_ in printed if t.startswith("model0"))
    embed = float(
        f0["model.embed_tokens.weight"].sum()
        / (f0["model.embed_tokens.weight"].sum() + f1["model.embed_tokens.weight"].sum())
    )
    assert printed[(title, "embed_tokens", "*")] == f"{embed:.3f}"[1:]
    # one printed number per cell and panel: 2 shares + the floor
    cells = 3 + len(layers) * 9
    assert len(printed) == 3 * cells


def test_an_adapter_explain_cannot_read_exactly_is_refused(world, tmp_path):
    adapter = tmp_path / "dora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True})
    )
    recipe = world.recipe("fisher", models=[f"{world.base}+{adapter}", world.models[1]])
    result = CliRunner().invoke(cli, ["explain", write_recipe(recipe, str(tmp_path / "r.yml"))])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "use_dora" in errors[0] and str(adapter) in errors[0], errors
    assert sorted(os.listdir(tmp_path)) == ["dora", "r.yml"]
