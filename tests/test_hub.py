"""Fisher files from the Hugging Face Hub: references resolved through a real huggingface_hub cache
layout built here (models--org--name/snapshots/<sha>/..., refs/main), offline; and the merged
card."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from merge_world import World, run_recipe, write_recipe
from test_merge_errors import assert_clean_failure, run_stock_cli

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("hub_world")), n_models=2)


def cache_repo(
    cache: str,
    repo_id: str,
    files_from: str,
    *,
    sub: str = "",
    sha: str = SHA,
    branch: str = "main",
    repo_type: str = "models",
) -> str:
    """Lay a Fisher directory into the cache as huggingface_hub itself does (minus the blobs)."""
    folder = os.path.join(cache, f"{repo_type}--{repo_id.replace('/', '--')}")
    target = os.path.join(folder, "snapshots", sha, sub)
    shutil.copytree(files_from, target)
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", branch), "w") as fp:
        fp.write(sha)
    return target


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = str(tmp_path / "hf_cache")
    os.makedirs(cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    assert constants.HF_HUB_OFFLINE  # conftest: no test may reach the Hub
    return cache


def test_hub_references_merge_like_local_paths(world, tmp_path, hub_cache):
    cache_repo(hub_cache, "org/fisher-a", world.fishers[0])
    cache_repo(hub_cache, "org/fishers", world.fishers[1], sub="model1")
    local = run_recipe(world.recipe("fisher"), str(tmp_path / "local"))
    for refs in (
        ["org/fisher-a", "org/fishers/model1"],
        [f"org/fisher-a@{SHA}", f"org/fishers/model1@{SHA}"],
        ["org/fisher-a@main", "org/fishers/model1@main"],
    ):
        merged = run_recipe(
            world.recipe("fisher", fishers=refs), str(tmp_path / refs[0].replace("/", "_"))
        )
        for name, value in local.items():
            assert torch.equal(merged[name], value), (refs, name)


def test_dataset_repository_reference(world, tmp_path, hub_cache):
    cache_repo(hub_cache, "org/fisher-data", world.fishers[1], repo_type="datasets")
    merged = run_recipe(
        world.recipe("fisher", fishers=[world.fishers[0], "datasets/org/fisher-data"]),
        str(tmp_path / "out"),
    )
    local = run_recipe(world.recipe("fisher"), str(tmp_path / "local"))
    assert all(torch.equal(merged[k], v) for k, v in local.items())


@pytest.mark.parametrize(
    "ref,needle",
    [
        ("org/not-cached", "org/not-cached"),
        (f"org/fisher-a@{OTHER_SHA}", OTHER_SHA),
        ("org/fisher-a/no-such-sub", "no-such-sub"),
    ],
)
def test_unresolvable_reference_is_one_error(world, tmp_path, hub_cache, ref, needle):
    cache_repo(hub_cache, "org/fisher-a", world.fishers[0])
    result, shards = run_stock_cli(
        world.recipe("fisher", fishers=[world.fishers[0], ref]), tmp_path
    )
    assert_clean_failure(result, shards, needle)
    if "no-such-sub" not in ref:
        assert "neither a local path" in result.output and "Hugging Face Hub" in result.output


def test_a_local_directory_named_like_an_id_wins(world, tmp_path, hub_cache, monkeypatch):
    # the cache holds model1's Fisher under org/fisher-a, the local ./org/fisher-a holds model0's:
    # a merge that reads the cache would differ from one that reads the local directory
    cache_repo(hub_cache, "org/fisher-a", world.fishers[1])
    shutil.copytree(world.fishers[0], tmp_path / "org" / "fisher-a")
    monkeypatch.chdir(tmp_path)
    merged = run_recipe(
        world.recipe("fisher", fishers=["org/fisher-a", world.fishers[1]]), str(tmp_path / "out")
    )
    local = run_recipe(world.recipe("fisher"), str(tmp_path / "local"))
    assert all(torch.equal(merged[k], v) for k, v in local.items())


def test_hf_hub_cache_environment_is_honoured_by_the_stock_cli(world, tmp_path):
    cache = str(tmp_path / "env_cache")
    cache_repo(cache, "org/fisher-a", world.fishers[0])
    recipe = write_recipe(
        world.recipe("fisher", fishers=["org/fisher-a", world.fishers[1]]), str(tmp_path / "r.yml")
    )
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    env.pop("MERGEKIT_FISHER_NO_HOOK", None)
    binary = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    result = subprocess.run(
        [binary, recipe, str(tmp_path / "out"), "--quiet", "--no-write-model-card"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    local = run_recipe(world.recipe("fisher"), str(tmp_path / "local"))
    import tiny

    merged = tiny.state_dict_from_dir(str(tmp_path / "out"))
    assert all(torch.equal(merged[k], v) for k, v in local.items())


def test_merged_card_names_both_papers_and_the_fisher_files(world, tmp_path, hub_cache):
    cache_repo(hub_cache, "org/fisher-a", world.fishers[0])
    recipe = world.recipe(
        "fisher_ties",
        base=world.base,
        fishers=["org/fisher-a", world.fishers[1]],
        shared={"density": 0.5},
    )
    run_recipe(recipe, str(tmp_path / "out"), write_model_card=True)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "arxiv.org/abs/2111.09832" in card and "Matena" in card  # the Fisher paper
    assert "arxiv.org/abs/2306.01708" in card  # TIES, the base method
    assert "org/fisher-a" in card and SHA[:12] in card  # Hub Fisher with its commit
    assert world.fishers[1] in card  # local Fisher by path
    assert "`fisher_normalize: mean`" in card and "`fisher_floor: 1e-06`" in card
    assert card.count("| " + world.models[0]) == 1 and card.count("| " + world.models[1]) == 1
