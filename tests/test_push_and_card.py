"""Sharing a Fisher: its model card, and `push` (huggingface_hub's network calls are the one
boundary replaced here; everything before them -- checks, file set, card -- runs for real)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from merge_world import World, run_recipe

from mergekit_fisher.fisher_file import FisherConfig, write_fisher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("push_world")), n_models=2)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _snippet(card: str) -> dict:
    return yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])


def test_card_front_matter_and_its_recipe_merges_as_written(world, tmp_path):
    from mergekit_fisher.fisher_file import open_fisher
    from mergekit_fisher.fisher_file.card import render_card

    config = FisherConfig(
        model="meta-llama/Llama-3.2-1B",
        dataset="org/math-data",
        fisher_type="empirical",
        num_examples=512,
        num_tokens=90_000,
        seed=3,
    )
    card = render_card(config, "my-org/llama-math-fisher")
    meta = _front_matter(card)
    assert meta["library_name"] == "mergekit-fisher"
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and meta["datasets"] == ["org/math-data"]
    assert {"fisher-information", "mergekit"} <= set(meta["tags"])
    assert "| examples | 512 |" in card and "| Fisher type | empirical |" in card
    assert "arxiv.org/abs/2111.09832" in card and "@inproceedings{matena2022merging" in card
    # the card of a real Fisher: its snippet, with only the placeholder model filled in, merges
    local = open_fisher(world.fishers[0])
    recipe = _snippet(render_card(local.config, world.fishers[0]))
    assert recipe["models"][0] == {
        "model": world.models[0],
        "parameters": {"weight": 1.0, "fisher": world.fishers[0]},
    }
    recipe["models"][1] = {
        "model": world.models[1],
        "parameters": {"weight": 1.0, "fisher": world.fishers[1]},
    }
    recipe["dtype"] = "float32"
    merged = run_recipe(recipe, str(tmp_path / "out"))
    expected = run_recipe(world.recipe("fisher"), str(tmp_path / "expected"))
    assert all(torch.equal(merged[k], v) for k, v in expected.items())


class FakeHub:
    """Records what would be sent to the Hub."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch):
        import huggingface_hub

        hub = self

        def record(name):
            def method(_api, *args, **kwargs):
                hub.calls.append((name, args, kwargs))

                class Info:
                    commit_url = "https://huggingface.co/fake/commit/1"

                return Info()

            return method

        for name in ("create_repo", "create_branch", "create_commit"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, record(name))
        return self


def test_push_sends_every_file_and_a_card(world, tmp_path, monkeypatch):
    from mergekit_fisher.cli import main

    hub = FakeHub().install(monkeypatch)
    before = sorted(os.listdir(world.fishers[0]))
    result = CliRunner().invoke(
        main,
        [
            "push",
            world.fishers[0],
            "my-org/fishers",
            "--revision",
            "v1",
            "--path-in-repo",
            "math",
            "--private",
        ],
    )
    assert result.exit_code == 0, result.output
    names = [name for name, _a, _k in hub.calls]
    assert names == ["create_repo", "create_branch", "create_commit"]
    _n, repo_args, repo_kwargs = hub.calls[0]
    assert repo_args == ("my-org/fishers",) and repo_kwargs["private"] is True
    _n, commit_args, commit_kwargs = hub.calls[2]
    assert commit_args == ("my-org/fishers",) and commit_kwargs["revision"] == "v1"
    uploaded = {op.path_in_repo: op for op in commit_kwargs["operations"]}
    assert set(uploaded) == {f"math/{name}" for name in before} | {"math/README.md"}
    card = uploaded["math/README.md"].path_or_fileobj
    card = card.getvalue() if hasattr(card, "getvalue") else card
    card = card.decode() if isinstance(card, bytes) else open(card).read()
    assert _snippet(card)["models"][0]["parameters"]["fisher"] == "my-org/fishers/math@v1"
    assert sorted(os.listdir(world.fishers[0])) == before  # the user's directory is untouched


def test_push_refuses_a_fisher_that_fails_inspect_check(world, tmp_path, monkeypatch):
    from mergekit_fisher.cli import main

    hub = FakeHub().install(monkeypatch)
    values = {k: v.clone() for k, v in world.fisher_values[world.models[0]].items()}
    next(iter(values.values()))[0] = float("nan")
    bad = str(tmp_path / "bad")
    write_fisher(
        values,
        bad,
        FisherConfig(model=world.models[0]),
    )
    result = CliRunner().invoke(main, ["push", bad, "my-org/fishers"])
    assert result.exit_code == 2 and result.output.count("Error:") == 1
    assert "inspect" in result.output and "nothing was uploaded" in result.output
    assert hub.calls == []


def test_compute_push_to_hub_uploads_the_new_fisher(tmp_path, tokenizer_dir, monkeypatch):
    import tiny

    from mergekit_fisher.cli import main

    hub = FakeHub().install(monkeypatch)
    model = str(tmp_path / "lm")
    tiny.make_llama(model, seed=2, tokenizer_dir=tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), [{"text": t} for t in tiny.CORPUS[:3]])
    out = str(tmp_path / "fisher")
    result = CliRunner().invoke(
        main,
        [
            "compute",
            model,
            out,
            "--data",
            data,
            "--fisher-type",
            "empirical",
            "--no-progress",
            "--push-to-hub",
            "my-org/lm-fisher",
        ],
    )
    assert result.exit_code == 0, result.output
    _n, args, kwargs = hub.calls[-1]
    assert args == ("my-org/lm-fisher",)
    uploaded = {op.path_in_repo for op in kwargs["operations"]}
    assert uploaded == set(os.listdir(out)) | {"README.md"}
    assert "fisher_config.json" in uploaded


def test_every_written_fisher_directory_carries_its_card(world):
    from mergekit_fisher.fisher_file import open_fisher

    card = open(os.path.join(world.fishers[0], "README.md"), encoding="utf-8").read()
    meta = _front_matter(card)
    assert meta["library_name"] == "mergekit-fisher"
    assert f"# Fisher information of {world.models[0]}" in card
    assert _snippet(card)["models"][0]["parameters"]["fisher"] == world.fishers[0]
    assert open_fisher(world.fishers[0]).names()  # the card does not disturb the reader


def test_push_keeps_a_card_the_user_edited(world, tmp_path, monkeypatch):
    import shutil

    from mergekit_fisher.cli import main

    hub = FakeHub().install(monkeypatch)
    mine = str(tmp_path / "mine")
    shutil.copytree(world.fishers[1], mine)
    with open(os.path.join(mine, "README.md"), "w", encoding="utf-8") as fp:
        fp.write("# my own words\n")
    result = CliRunner().invoke(main, ["push", mine, "my-org/fishers"])
    assert result.exit_code == 0, result.output
    (card,) = [op for op in hub.calls[-1][2]["operations"] if op.path_in_repo == "README.md"]
    assert open(card.path_or_fileobj).read() == "# my own words\n"
