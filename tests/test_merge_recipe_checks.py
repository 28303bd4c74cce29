"""Strict recipes and trusted statistics: what mergekit would ignore or a doctored file would move,
the stock `mergekit-yaml` refuses with one `Error:` line naming the parameter, model or file."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from merge_world import World, run_recipe
from test_merge_errors import assert_clean_failure, run_stock_cli

from mergekit_fisher.fisher_file import FisherConfig, write_fisher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("recipe_checks")), n_models=2)


def _edit(recipe, where, key, value):
    if where == "shared":
        recipe.setdefault("parameters", {})[key] = value
    else:
        recipe["models"][where]["parameters"][key] = value
    return recipe


BAD_PARAMETERS = [
    # (method, where, key, value, needles in the one Error: line)
    (
        "fisher",
        "shared",
        "fisher_normalise",
        "l2",
        ["`fisher_normalise`", "did you mean `fisher_normalize`"],
    ),
    ("fisher", "shared", "fisher_flor", 0.1, ["`fisher_flor`", "did you mean `fisher_floor`"]),
    ("fisher", 1, "wieght", 2.0, ["`wieght`", "did you mean `weight`", "parameters of model"]),
    ("fisher", "shared", "density", 0.5, ["`density`", "fisher takes"]),
    ("fisher_ties", "shared", "densty", 0.5, ["`densty`", "did you mean `density`"]),
    ("fisher", "shared", "fisher_floor", "abc", ["`fisher_floor`", "'abc'"]),
    ("fisher", 0, "weight", "heavy", ["`weight`", "'heavy'"]),
    ("fisher", 0, "fisher", 5, ["`fisher:` must be a path", "5"]),
    ("fisher", 0, "weight", -1.0, ["negative weight", "allow_negative_weights"]),
    ("fisher_ties", 0, "weight", -0.5, ["negative weight", "allow_negative_weights"]),
]


@pytest.mark.parametrize(
    "method,where,key,value,needles",
    BAD_PARAMETERS,
    ids=[f"{m}-{k}-{v}" for m, _w, k, v, _n in BAD_PARAMETERS],
)
def test_bad_recipe_parameter_is_refused(world, tmp_path, method, where, key, value, needles):
    base = world.base if method != "fisher" else None
    recipe = _edit(world.recipe(method, base=base), where, key, value)
    result, shards = run_stock_cli(recipe, tmp_path)
    assert_clean_failure(result, shards, *needles)


def test_all_zero_weights_are_refused_for_fisher(world, tmp_path):
    result, shards = run_stock_cli(world.recipe("fisher", weights=[0.0, 0.0]), tmp_path)
    assert_clean_failure(result, shards, "sum to 0", "positive")


def test_minus_one_plus_one_is_refused_even_with_the_opt_in(world, tmp_path):
    recipe = world.recipe("fisher", weights=[-1.0, 1.0], shared={"allow_negative_weights": True})
    result, shards = run_stock_cli(recipe, tmp_path)
    assert_clean_failure(result, shards, "sum to 0")


def test_negative_weights_with_the_opt_in_merge_as_task_negation(world, tmp_path):
    """fisher_task_arithmetic with identical Fishers and weight -1 is mergekit's task negation."""
    same = [world.fishers[0]] * 2
    kwargs = dict(weights=[-1.0, 0.5], base=world.base, fishers=same)
    ours = run_recipe(
        world.recipe("fisher_task_arithmetic", shared={"allow_negative_weights": True}, **kwargs),
        str(tmp_path / "ours"),
    )
    theirs = run_recipe(
        world.recipe("task_arithmetic", **{**kwargs, "fishers": False}), str(tmp_path / "theirs")
    )
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _doctored_copy(source: str, target: str, **changes) -> str:
    shutil.copytree(source, target)
    config_path = os.path.join(target, "fisher_config.json")
    with open(config_path, encoding="utf-8") as fp:
        config = json.load(fp)
    config.update(changes)
    with open(config_path, "w", encoding="utf-8") as fp:
        json.dump(config, fp)
    return target


def _recorded(path: str) -> dict:
    with open(os.path.join(path, "fisher_config.json"), encoding="utf-8") as fp:
        return json.load(fp)


@pytest.mark.parametrize("factor", [1e6, -1.0])
def test_stats_that_disagree_with_the_values_are_an_error(world, tmp_path, factor):
    recorded = _recorded(world.fishers[1])
    assert recorded["sum"] > 0  # the writer records them: the check has something to compare
    doctored = _doctored_copy(
        world.fishers[1], str(tmp_path / "doctored"), sum=recorded["sum"] * factor
    )
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], doctored]), tmp_path
    )
    assert_clean_failure(
        result, shards, "global statistics", "doctored", str(recorded["sum"] * factor)
    )


def test_impossible_stats_are_an_error_without_a_scan(world, tmp_path):
    recorded = _recorded(world.fishers[1])
    doctored = _doctored_copy(world.fishers[1], str(tmp_path / "doctored"), sum=-recorded["sum"])
    recipe = world.recipe(
        "fisher", fishers=[world.fishers[0], doctored], shared={"fisher_validate": "headers"}
    )
    result, shards = run_stock_cli(recipe, tmp_path)
    assert_clean_failure(result, shards, "impossible global statistics", "doctored")


def test_adapter_space_fisher_in_a_dense_merge_is_an_error(world, tmp_path):
    adapter = str(tmp_path / "adapter_space")
    values = {k: v.clone() for k, v in world.fisher_values[world.models[1]].items()}
    write_fisher(values, adapter, FisherConfig(model=world.models[1], space="adapter"))
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], adapter]), tmp_path
    )
    assert_clean_failure(result, shards, "adapter space", "adapter_space", "--space dense")


def _run_yaml(recipe, tmp_path, *extra):
    """Like run_stock_cli, but with mergekit-yaml's own options (model card on by default)."""
    from click.testing import CliRunner
    from merge_world import write_recipe
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    path = write_recipe(recipe, str(tmp_path / "recipe.yml"))
    out = tmp_path / "out"
    result = CliRunner().invoke(mergekit_yaml, [path, str(out), "--quiet", *extra])
    return result, sorted(str(p) for p in out.glob("*.safetensors")) if out.exists() else []


def test_missing_model_path_fails_before_loading(world, tmp_path):
    recipe = world.recipe("fisher")
    recipe["models"][1]["model"] = str(tmp_path / "no_such_model")
    result, shards = _run_yaml(recipe, tmp_path)
    assert_clean_failure(result, shards, "no_such_model", "does not exist")


def test_delta_method_without_base_model(world, tmp_path):
    result, shards = _run_yaml(world.recipe("fisher_dare_ties"), tmp_path)
    assert_clean_failure(result, shards, "fisher_dare_ties", "base_model")


def test_lora_reference_without_merge_cache(world, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    recipe = world.recipe("fisher")
    recipe["models"][0]["model"] = f"{world.models[0]}+{adapter}"
    result, shards = _run_yaml(recipe, tmp_path)
    assert_clean_failure(result, shards, "--lora-merge-cache", "base+adapter")


def test_relative_model_path_with_a_model_card(world, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(world.models[0]))
    recipe = world.recipe("fisher", models=[os.path.basename(m) for m in world.models])
    result, shards = _run_yaml(recipe, tmp_path)
    assert_clean_failure(
        result,
        shards,
        "relative model path",
        "--no-write-model-card",
        f"write it as '{os.path.dirname(os.path.abspath(world.models[0]))}{os.sep}model",
    )
    # without a card, the relative paths merge as mergekit resolves them
    result, shards = _run_yaml(recipe, tmp_path, "--no-write-model-card")
    assert result.exit_code == 0, result.output
    assert shards
