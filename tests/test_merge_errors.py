"""Bad input: one clear message naming the model, file, tensor and fix; non-zero exit; no model
shards.

Runs the stock `mergekit-yaml` click command in-process (the `.pth` hook registered our methods)."""

from __future__ import annotations

import glob
import os

import pytest
import tiny
import torch
from click.testing import CliRunner
from merge_world import World, run_recipe, write_recipe

from mergekit_fisher.fisher_file import FisherConfig, write_fisher

TARGET = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("errors")), n_models=2)


def run_stock_cli(recipe: dict, tmp_path):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_fisher.merge.registry import ensure_registered

    ensure_registered()
    path = write_recipe(recipe, str(tmp_path / "recipe.yml"))
    out = str(tmp_path / "out")
    result = CliRunner().invoke(mergekit_yaml, [path, out, "--quiet", "--no-write-model-card"])
    shards = glob.glob(os.path.join(out, "*.safetensors"))
    return result, shards


def assert_clean_failure(result, shards, *needles):
    assert result.exit_code != 0, result.output
    assert not shards, f"partial output written: {shards}"
    # a clean exit, not a crash
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    message = result.output
    assert message.count("Error:") == 1, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "Fix:" in message


def fisher_with(world, tmp_path, label, edit):
    values = {k: v.clone() for k, v in world.fisher_values[world.models[1]].items()}
    edit(values)
    path = str(tmp_path / label)
    write_fisher(values, path, FisherConfig(model=world.models[1]))
    return path


def test_missing_fisher_file(world, tmp_path):
    missing = str(tmp_path / "nowhere")
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], missing]), tmp_path
    )
    assert_clean_failure(result, shards, missing, world.models[1], "does not exist")


def test_model_without_fisher_parameter(world, tmp_path):
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], None]), tmp_path
    )
    assert_clean_failure(result, shards, world.models[1], "no Fisher file", "fisher:")


def test_pickle_file_is_refused_and_never_unpickled(world, tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = str(tmp_path / "fisher.bin")
    import pickle

    with open(path, "wb") as fp:
        pickle.dump({"x": Boom()}, fp)
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], path]), tmp_path
    )
    assert_clean_failure(result, shards, path, "pickle", "mergekit-fisher convert")
    assert not marker.exists()


def test_corrupt_safetensors(world, tmp_path):
    path = str(tmp_path / "broken.safetensors")
    with open(path, "wb") as fp:
        fp.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], path]), tmp_path
    )
    assert_clean_failure(result, shards, path, "not a valid safetensors")


def test_shape_mismatch(world, tmp_path, tokenizer_dir):
    other = str(tmp_path / "wide")
    tiny.make_llama(other, seed=3, hidden=64)
    state = tiny.state_dict_from_dir(other)
    path = str(tmp_path / "wide_fisher")
    write_fisher({k: torch.ones_like(v) for k, v in state.items()}, path, FisherConfig(model=other))
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], path]), tmp_path
    )
    assert_clean_failure(result, shards, path, "does not match the model tensor", world.models[1])


@pytest.mark.parametrize(
    "label,value,needle",
    [
        ("nan", float("nan"), "non-finite"),
        ("inf", float("inf"), "non-finite"),
        ("neg", -1.0, "negative"),
    ],
)
def test_bad_values(world, tmp_path, label, value, needle):
    def edit(values):
        values[TARGET][3, 5] = value

    path = fisher_with(world, tmp_path, label, edit)
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], path]), tmp_path
    )
    assert_clean_failure(result, shards, path, TARGET, needle, world.models[1])


def test_bad_values_are_caught_at_load_time_with_header_validation(world, tmp_path):
    path = fisher_with(
        world, tmp_path, "nan_late", lambda v: v[TARGET].__setitem__((0, 0), float("nan"))
    )
    recipe = world.recipe(
        "fisher", fishers=[world.fishers[0], path], shared={"fisher_validate": "headers"}
    )
    result, _shards = run_stock_cli(recipe, tmp_path)
    assert result.exit_code != 0
    assert "non-finite" in result.output and TARGET in result.output and path in result.output


def test_missing_tensor_is_an_error_by_default(world, tmp_path):
    path = fisher_with(world, tmp_path, "holey", lambda v: v.pop(TARGET))
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], path]), tmp_path
    )
    assert_clean_failure(result, shards, path, TARGET, "missing_fisher: uniform", world.models[1])


def test_missing_tensor_uniform_uses_the_files_mean_level(world, tmp_path):
    path = fisher_with(world, tmp_path, "holey", lambda v: v.pop(TARGET))
    recipe = world.recipe(
        "fisher", fishers=[world.fishers[0], path], shared={"missing_fisher": "uniform"}
    )
    merged = run_recipe(recipe, str(tmp_path / "out"))
    m0, m1 = world.models
    values0 = world.fisher_values[m0]
    mean0 = torch.cat([v.double().flatten() for v in values0.values()]).mean()
    f0 = values0[TARGET].double() / mean0 + 1e-6
    f1 = 1.0 + 1e-6  # uniform at the file's mean level -> 1 after mean normalization
    expected = (f0 * world.states[m0][TARGET].double() + f1 * world.states[m1][TARGET].double()) / (
        f0 + f1
    )
    torch.testing.assert_close(merged[TARGET].double(), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize(
    "parameter,value", [("fisher_normalize", "median"), ("missing_fisher", "skip")]
)
def test_unknown_shared_values(world, tmp_path, parameter, value):
    result, shards = run_stock_cli(world.recipe("fisher", shared={parameter: value}), tmp_path)
    assert_clean_failure(result, shards, parameter, repr(value))


def test_provenance_mismatch_is_a_warning_not_an_error(world, tmp_path, caplog):
    swapped = [world.fishers[1], world.fishers[0]]  # each file says it belongs to the other model
    with caplog.at_level("WARNING"):
        run_recipe(world.recipe("fisher", fishers=swapped), str(tmp_path / "out"))
    assert any("was computed for model" in record.getMessage() for record in caplog.records)


def test_missing_lm_head_is_not_replaced_by_the_embedding_fisher(world, tmp_path):
    """mergekit lists the embedding as a tied name of lm_head even for untied models: the Fisher
    lookup must not fall back to it, or an untied head silently gets the embedding's Fisher (same
    shape)."""
    path = fisher_with(world, tmp_path, "no_head", lambda v: v.pop("lm_head.weight"))
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], path]), tmp_path
    )
    assert_clean_failure(result, shards, path, "lm_head.weight", "missing_fisher: uniform")
    recipe = world.recipe(
        "fisher", fishers=[world.fishers[0], path], shared={"missing_fisher": "uniform"}
    )
    merged = run_recipe(recipe, str(tmp_path / "out"))
    m0, m1 = world.models
    values0 = world.fisher_values[m0]
    mean0 = torch.cat([v.double().flatten() for v in values0.values()]).mean()
    f0 = values0["lm_head.weight"].double() / mean0 + 1e-6
    f1 = 1.0 + 1e-6  # uniform, not the embedding's Fisher
    expected = (
        f0 * world.states[m0]["lm_head.weight"].double()
        + f1 * world.states[m1]["lm_head.weight"].double()
    )
    torch.testing.assert_close(
        merged["lm_head.weight"].double(), expected / (f0 + f1), rtol=2e-5, atol=1e-6
    )
