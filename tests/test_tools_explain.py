"""`explain`: shares against hand-computed values; fails on bad recipes exactly as the merge
does."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from merge_world import World, write_recipe
from test_merge_errors import run_stock_cli

from mergekit_fisher.cli import main as cli
from mergekit_fisher.fisher_file import FisherConfig, write_fisher

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("explain")), n_models=2)


@pytest.fixture(scope="module")
def crafted(world, tmp_path_factory):
    """model0: Fisher 1 everywhere but 3 on layer-0 q_proj and 0 on layer-1 k_proj; model1: 1
    everywhere but 0 on layer-1 k_proj (so there, both are 0 and the floor decides)."""
    root = tmp_path_factory.mktemp("crafted")
    paths = []
    for index, model in enumerate(world.models):
        values = {k: torch.ones_like(v) for k, v in world.states[model].items()}
        if index == 0:
            values[Q0] *= 3
        values["model.layers.1.self_attn.k_proj.weight"].zero_()
        path = str(root / f"f{index}")
        write_fisher(values, path, FisherConfig(model=model))
        paths.append(path)
    return paths


def explain_json(recipe_path):
    result = CliRunner().invoke(cli, ["explain", recipe_path, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(
        result.stdout
    )  # the report; warnings (e.g. a uniform Fisher) are logged to stderr


def row(report, layer, module):
    return next(r for r in report["groups"] if r["layer"] == layer and r["module"] == module)


def test_shares_without_normalization(world, crafted, tmp_path):
    recipe = world.recipe(
        "fisher",
        weights=[1.0, 1.0],
        fishers=crafted,
        shared={"fisher_normalize": "none", "fisher_floor": 0.0},
    )
    report = explain_json(write_recipe(recipe, str(tmp_path / "r.yml")))
    labels = report["models"]
    assert labels == ["model0", "model1"]
    q0 = row(report, 0, "self_attn.q_proj")
    assert q0["shares"]["model0"] == pytest.approx(0.75)
    assert q0["shares"]["model1"] == pytest.approx(0.25)
    assert row(report, 1, "self_attn.q_proj")["shares"]["model0"] == pytest.approx(0.5)
    k1 = row(report, 1, "self_attn.k_proj")
    assert k1["floor_fraction"] == pytest.approx(1.0)
    assert q0["floor_fraction"] == pytest.approx(0.0)
    # overall: hand-computed masses
    sizes = {k: v.numel() for k, v in world.states[world.models[0]].items()}
    total = sum(sizes.values())
    k1_size = sizes["model.layers.1.self_attn.k_proj.weight"]
    mass0 = total - k1_size + 2 * sizes[Q0]
    mass1 = total - k1_size
    assert report["overall"]["shares"]["model0"] == pytest.approx(mass0 / (mass0 + mass1))
    assert report["overall"]["floor_fraction"] == pytest.approx(k1_size / total)


def test_shares_follow_weights_and_mean_normalization(world, crafted, tmp_path):
    recipe = world.recipe(
        "fisher", weights=[1.0, 3.0], fishers=crafted, shared={"fisher_floor": 0.0}
    )
    report = explain_json(write_recipe(recipe, str(tmp_path / "r.yml")))
    sizes = {k: v.numel() for k, v in world.states[world.models[0]].items()}
    total = sum(sizes.values())
    k1_size = sizes["model.layers.1.self_attn.k_proj.weight"]
    mean0 = (total - k1_size + 2 * sizes[Q0]) / total
    mean1 = (total - k1_size) / total
    m0, m1 = 3 / mean0, 3 * 1 / mean1  # q_proj of layer 0: weight·F/mean per element
    assert row(report, 0, "self_attn.q_proj")["shares"]["model0"] == pytest.approx(m0 / (m0 + m1))
    o0, o1 = 1 / mean0, 3 / mean1
    assert row(report, 0, "mlp.up_proj")["shares"]["model0"] == pytest.approx(o0 / (o0 + o1))


def test_plot_is_a_valid_png(world, crafted, tmp_path):
    from PIL import Image

    recipe = write_recipe(world.recipe("fisher", fishers=crafted), str(tmp_path / "r.yml"))
    png = str(tmp_path / "share.png")
    result = CliRunner().invoke(cli, ["explain", recipe, "--plot", png])
    assert result.exit_code == 0, result.output
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


@pytest.mark.parametrize(
    "case", ["missing_file", "unknown_normalize", "missing_tensor", "no_fisher", "nan_value"]
)
def test_explain_fails_like_the_merge(world, tmp_path, case):
    """The same bad recipe through the stock `mergekit-yaml` command (the real merge) and through
    `explain`: both fail, write no model, and their one `Error:` line names the problem this test
    planted (the model, file, tensor or parameter), not the good model or its file -- the same line
    for both."""
    fishers = list(world.fishers)
    shared = {}
    bad_model = world.models[1]
    if case == "missing_file":
        fishers[1] = str(tmp_path / "nowhere")
        needles = ["does not exist", f"model {bad_model}", f"Fisher file {fishers[1]}"]
    elif case == "unknown_normalize":
        shared["fisher_normalize"] = "max"
        needles = ["fisher_normalize", "'max'"]
    elif case == "missing_tensor":
        values = dict(world.fisher_values[bad_model])
        values.pop(Q0)
        fishers[1] = str(tmp_path / "holey")
        write_fisher(values, fishers[1])
        needles = ["missing", f"model {bad_model}", f"Fisher file {fishers[1]}", f"tensor {Q0}"]
    elif case == "nan_value":
        values = {k: v.clone() for k, v in world.fisher_values[bad_model].items()}
        values[Q0][1, 2] = float("nan")
        fishers[1] = str(tmp_path / "nan")
        write_fisher(values, fishers[1])
        needles = ["non-finite", f"model {bad_model}", f"Fisher file {fishers[1]}", f"tensor {Q0}"]
    else:
        fishers[1] = None
        needles = ["no Fisher file", f"model {bad_model}", "fisher:"]
    recipe = world.recipe("fisher", fishers=fishers, shared=shared)
    merge_result, shards = run_stock_cli(recipe, tmp_path)  # mergekit's own `mergekit-yaml` command
    explain_result = CliRunner().invoke(cli, ["explain", str(tmp_path / "recipe.yml")])
    assert merge_result.exit_code == 2, merge_result.output
    assert explain_result.exit_code != 0, explain_result.output
    assert not shards
    errors = {}
    for label, result in (("merge", merge_result), ("explain", explain_result)):
        lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1, (label, result.output)
        errors[label] = lines[0]
        for needle in needles:
            assert needle in lines[0], (label, needle, lines[0])
        assert f"model {world.models[0]}" not in lines[0] and world.fishers[0] not in lines[0], (
            label,
            lines[0],
        )
    assert errors["merge"] == errors["explain"]


def test_uniform_fisher_counts_every_element(world, tmp_path):
    """A tensor missing from model1's file gets a uniform Fisher (1 after mean normalization): its
    mass is 1·numel, not 1."""
    values = {k: torch.ones_like(v) for k, v in world.states[world.models[0]].items()}
    full = str(tmp_path / "full")
    write_fisher(values, full)
    holey_values = dict(values)
    holey_values.pop(Q0)
    holey = str(tmp_path / "holey")
    write_fisher(holey_values, holey)
    recipe = world.recipe(
        "fisher", fishers=[full, holey], shared={"missing_fisher": "uniform", "fisher_floor": 0.0}
    )
    report = explain_json(write_recipe(recipe, str(tmp_path / "r.yml")))
    q0 = row(report, 0, "self_attn.q_proj")
    assert q0["shares"]["model1"] == pytest.approx(0.5)
    assert q0["elements"] == world.states[world.models[0]][Q0].numel()


def test_models_with_the_same_directory_name_stay_apart(world, crafted, tmp_path):
    import shutil

    copies = []
    for index, parent in enumerate(("a", "b")):
        target = tmp_path / parent / "final"
        shutil.copytree(world.models[index], target)
        copies.append(str(target))
    recipe = world.recipe(
        "fisher",
        models=copies,
        fishers=crafted,
        shared={"fisher_normalize": "none", "fisher_floor": 0.0},
    )
    report = explain_json(write_recipe(recipe, str(tmp_path / "r.yml")))
    assert report["models"] == ["a/final", "b/final"]
    assert row(report, 0, "self_attn.q_proj")["shares"] == {
        "a/final": pytest.approx(0.75),
        "b/final": pytest.approx(0.25),
    }
