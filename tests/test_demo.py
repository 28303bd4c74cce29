"""The demo and `mergekit-fisher eval`.

The pipeline test runs the whole demo once at `--tiny` size (the real `mergekit-fisher compute` and
`mergekit-yaml` entry points, in process as `--tiny` runs them) and checks each stage's outputs
against independent references.
"""

from __future__ import annotations

import json
import math
import os

import click
import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner

from mergekit_fisher.cli import main
from mergekit_fisher.demo.corpus import chunk_texts, load_domain
from mergekit_fisher.demo.evaluate import evaluate_models, format_table
from mergekit_fisher.demo.recipes import FISHER_TWIN, MERGE_METHODS, recipe_for

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "def merge(models): return sum(models) / len(models)",
    "a",  # BOS + one token: a single prediction
    "fisher information weighs each parameter by how much the data cares " * 3,  # truncated
]


def brute_force_loss(model_dir: str, texts, max_length: int, bos: bool = True) -> float:
    """Token-weighted NLL, one unpadded sequence and one position at a time. `bos`: the demo's
    encoding (BOS + text); else the tokenizer's own (`compute`'s, for `text` rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for text in texts:
        if bos:
            ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
        ids = ids[:max_length]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        for position in range(len(ids) - 1):
            log_probs = logits[position] - torch.logsumexp(logits[position], dim=0)
            total -= log_probs[ids[position + 1]].item()
            count += 1
    return total / count


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("eval_models")
    paths = []
    for seed in (1, 2):
        path = str(root / f"model{seed}")
        tiny.make_llama(path, seed=seed, hidden=32, layers=2, tokenizer_dir=tokenizer_dir)
        paths.append(path)
    return paths


def test_evaluate_matches_brute_force(two_models):
    # batch 3: padded batches of mixed lengths must give the per-sequence answer
    results = evaluate_models(
        {"a": two_models[0], "b": two_models[1]},
        {"mixed": TEXTS, "first": TEXTS[:1]},
        max_length=24,
        batch_size=3,
        progress=False,
    )
    for label, path in zip("ab", two_models):
        for name, texts in (("mixed", TEXTS), ("first", TEXTS[:1])):
            expected = brute_force_loss(path, texts, 24)
            assert results[label][name]["loss"] == pytest.approx(expected, rel=1e-5)
            assert results[label][name]["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # two different random models: the labels were not mixed up
    assert abs(results["a"]["mixed"]["loss"] - results["b"]["mixed"]["loss"]) > 1e-3


def test_eval_command_jsonl_and_txt(two_models, tmp_path):
    jsonl = tiny.write_jsonl(str(tmp_path / "held.jsonl"), [{"text": t} for t in TEXTS])
    txt = tmp_path / "book.txt"
    txt.write_text(" ".join(TEXTS * 3), encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "eval",
            *two_models,
            "--data",
            jsonl,
            "--data",
            str(txt),
            "--max-length",
            "16",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert list(payload) == two_models
    # JSONL: compute's tokens (the tokenizer's own special tokens; this one adds none)
    assert payload[two_models[0]]["held"]["loss"] == pytest.approx(
        brute_force_loss(two_models[0], TEXTS, 16, bos=False), rel=1e-5
    )
    means = payload[two_models[0]]["mean"]
    cells = [payload[two_models[0]][name]["loss"] for name in ("held", "book")]
    assert means["loss"] == pytest.approx(sum(cells) / 2)
    assert means["perplexity"] == pytest.approx(math.exp(means["loss"]))
    # .txt: one text cut into 16-token windows, each scored without BOS
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(two_models[1])(txt.read_text(), add_special_tokens=False)[
        "input_ids"
    ]
    windows = [ids[i : i + 16] for i in range(0, len(ids), 16) if len(ids[i : i + 16]) >= 2]
    assert payload[two_models[1]]["book"]["tokens"] == sum(len(w) - 1 for w in windows)

    table = runner.invoke(main, ["eval", two_models[0], "--data", jsonl, "--device", "cpu"])
    assert table.exit_code == 0, table.output
    lines = [line for line in table.stdout.splitlines() if line.strip()]
    assert lines[0].split() == ["model", "held", "mean"]
    assert lines[1].startswith(two_models[0])


def test_eval_command_bad_inputs(two_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no text"}\n', encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", two_models[0], "--data", str(bad)])
    assert result.exit_code == 2
    assert (
        f"{bad}:2" in result.output and "no usable fields" in result.output
    ) and "Traceback" not in result.output
    missing = runner.invoke(main, ["eval", str(tmp_path / "nope"), "--data", str(bad)])
    assert missing.exit_code == 2 and str(tmp_path / "nope") in missing.output


def test_chunks_and_split_are_deterministic():
    text = "aaaa\n\nbb\ncccccc\nd\n"
    # 5 chars reached after "aaaa\n"; the blank line never starts a chunk; "d" is a short tail
    assert chunk_texts([text], 5) == ["aaaa", "bb\ncccccc", "d"]
    assert chunk_texts([text], 8) == ["aaaa\n\nbb", "cccccc\nd"]
    one = load_domain("asyncio", num_train=20, num_heldout=10, chunk_chars=300, seed=3)
    again = load_domain("asyncio", num_train=20, num_heldout=10, chunk_chars=300, seed=3)
    other = load_domain("asyncio", num_train=20, num_heldout=10, chunk_chars=300, seed=4)
    assert one == again
    assert one.train != other.train
    assert not set(one.train) & set(one.heldout)
    assert all(len(chunk) >= 300 // 4 for chunk in one.train + one.heldout)


def test_recipes_pair_plain_and_fisher_methods():
    specialists = {"docs": "/m/docs", "asyncio": "/m/asyncio"}
    fishers = {"docs": "/f/docs", "asyncio": "/f/asyncio"}
    linear = recipe_for(
        "linear", base="/m/base", specialists=specialists, fishers=fishers, density=0.5
    )
    assert linear == {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": "/m/docs", "parameters": {"weight": 1.0}},
            {"model": "/m/asyncio", "parameters": {"weight": 1.0}},
        ],
    }
    fisher_ties = recipe_for(
        "fisher_ties",
        base="/m/base",
        specialists=specialists,
        fishers=fishers,
        density=0.5,
        fisher_floor=1e-4,
    )
    assert fisher_ties["base_model"] == "/m/base"
    assert fisher_ties["models"][1] == {
        "model": "/m/docs",
        "parameters": {"weight": 1.0, "density": 0.5, "fisher": "/f/docs"},
    }
    assert fisher_ties["parameters"] == {"fisher_normalize": "mean", "fisher_floor": 1e-4}
    for method, twin in FISHER_TWIN.items():
        plain = recipe_for(
            twin, base="/m/base", specialists=specialists, fishers=fishers, density=0.5
        )
        ours = recipe_for(
            method, base="/m/base", specialists=specialists, fishers=fishers, density=0.5
        )
        # the twins differ only by the Fisher weighting
        assert [
            {k: v for k, v in m.get("parameters", {}).items() if k != "fisher"}
            for m in ours["models"]
        ] == [m.get("parameters", {}) for m in plain["models"]]


def test_demo_refuses_bad_input_before_any_work(tmp_path):
    runner = CliRunner()
    (tmp_path / "models").mkdir()
    result = runner.invoke(main, ["demo", str(tmp_path), "--tiny"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert sorted(os.listdir(tmp_path)) == ["models"]
    fresh = tmp_path / "fresh"
    result = runner.invoke(main, ["demo", str(fresh), "--tiny", "--domains", "docs,nonsense"])
    assert result.exit_code == 2 and "nonsense" in result.output
    assert not fresh.exists()


def test_demo_options_lists_and_ranges(tmp_path):
    """--domains is a multiple=True option that also takes the comma form; ranges are click's."""
    from mergekit_fisher.choices import Domain
    from mergekit_fisher.demo.cli import demo_command

    ctx = demo_command.make_context(
        "demo", ["w", "--domains", "docs", "--domains", "asyncio,email"]
    )
    assert (
        ctx.params["domains"]
        == (Domain.DOCS, Domain.ASYNCIO, Domain.EMAIL)
        == ("docs", "asyncio", "email")
    )
    assert demo_command.make_context("demo", ["w"]).params["domains"] == ("docs", "asyncio")
    runner = CliRunner()
    for args, needle in [
        (
            ["--domains", "docs", "--domains", "nonsense"],
            "'nonsense' is not one of 'docs', 'asyncio', 'email'",
        ),
        (["--density", "0"], "--density"),
        (["--train-examples", "0"], "--train-examples"),
        (["--fisher-type", "exact"], "--fisher-type"),
        (["--jobs", "0"], "--jobs"),
    ]:
        result = runner.invoke(main, ["demo", str(tmp_path / "w"), "--tiny", *args])
        assert result.exit_code == 2, (args, result.output)
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("Error: Invalid value for") and needle in last, last
    assert not (tmp_path / "w").exists()


def test_demo_without_matplotlib_says_how_to_get_the_chart(tmp_path, monkeypatch):
    import sys

    # what an environment without it looks like
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "w"), "--tiny"])
    assert result.exit_code == 2
    assert "mergekit-fisher[plot]" in result.output and "--no-plot" in result.output
    assert not (tmp_path / "w").exists()


# --- the whole pipeline, once -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from mergekit_fisher.demo.pipeline import run_demo, tiny_settings

    workdir = str(tmp_path_factory.mktemp("demo"))
    lines = []
    report = run_demo(workdir, tiny_settings(seed=7), echo=lines.append)
    return workdir, report, lines


def test_demo_models_and_losses(demo_run):
    workdir, report, lines = demo_run
    results = report["results"]
    domains = ["docs", "asyncio"]
    expected_rows = ["base", "docs specialist", "asyncio specialist", *MERGE_METHODS]
    assert list(results) == expected_rows
    for row in results.values():
        assert list(row) == domains
        for cell in row.values():
            assert math.isfinite(cell["loss"]) and cell["loss"] > 0 and cell["tokens"] > 0
    for domain in domains:
        assert results[f"{domain} specialist"][domain]["loss"] < results["base"][domain]["loss"]
    # stage 4's numbers are the held-out files' own losses
    heldout = [
        json.loads(line)["text"]
        for line in open(os.path.join(workdir, "data", "docs.heldout.jsonl"))
    ]
    assert results["fisher"]["docs"]["loss"] == pytest.approx(
        brute_force_loss(report["merges"]["fisher"], heldout, report["settings"]["max_length"]),
        rel=1e-5,
    )
    assert any(line.startswith("[5/5]") for line in lines)


def test_demo_fisher_files_are_real(demo_run):
    from mergekit_fisher.fisher_file import open_fisher

    _workdir, report, _lines = demo_run
    for domain, path in report["fishers"].items():
        fisher = open_fisher(path)
        weights = tiny.state_dict_from_dir(report["models"][domain])
        assert set(fisher.names()) == set(weights)
        total = sum(float(fisher.get_tensor(name).sum()) for name in fisher.names())
        assert total > 0 and math.isfinite(total)


def test_demo_recipes_and_merges(demo_run):
    from mergekit.config import MergeConfiguration

    workdir, report, _lines = demo_run
    assert sorted(os.listdir(os.path.join(workdir, "recipes"))) == sorted(
        f"{m}.yml" for m in MERGE_METHODS
    )
    for method in MERGE_METHODS:
        with open(os.path.join(workdir, "recipes", f"{method}.yml"), encoding="utf-8") as fp:
            recipe = yaml.safe_load(fp)
        config = MergeConfiguration.model_validate(recipe)
        assert config.merge_method == method
        assert all(os.path.isabs(str(model.model.model.path)) for model in config.models)
    # the linear merge is exactly the mean of the two specialists: the merge stage wrote real
    # weights
    docs = tiny.state_dict_from_dir(report["models"]["docs"])
    code = tiny.state_dict_from_dir(report["models"]["asyncio"])
    merged = tiny.state_dict_from_dir(report["merges"]["linear"])
    assert set(merged) == set(docs)
    for name in docs:
        torch.testing.assert_close(
            merged[name], (docs[name] + code[name]) / 2, rtol=1e-5, atol=1e-6
        )
    fisher = tiny.state_dict_from_dir(report["merges"]["fisher"])
    assert any(not torch.allclose(fisher[name], merged[name]) for name in docs)


def test_demo_report_files(demo_run):
    import matplotlib.image

    workdir, report, _lines = demo_run
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as fp:
        assert json.load(fp)["results"] == report["results"]
    markdown = open(os.path.join(workdir, "results.md"), encoding="utf-8").read()
    assert format_table(report["results"], markdown=True) in markdown
    for row in ["base", "docs specialist", "asyncio specialist", *MERGE_METHODS]:
        assert f"| {row} |" in markdown
    assert len(report["fisher_vs_plain"]) == len(FISHER_TWIN)
    with open(os.path.join(workdir, "chart.png"), "rb") as fp:
        assert fp.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(os.path.join(workdir, "chart.png"))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # bars, not a blank canvas


def test_stage_one_is_reproducible_from_its_seed(tmp_path):
    from mergekit_fisher.demo.pipeline import StageLog, build_models, tiny_settings

    settings = tiny_settings(pretrain_steps=5, finetune_steps=5)
    quiet = StageLog(echo=lambda line: None)
    first = build_models(str(tmp_path / "one"), settings, quiet)
    second = build_models(str(tmp_path / "two"), settings, quiet)
    other = build_models(
        str(tmp_path / "other"), tiny_settings(pretrain_steps=5, finetune_steps=5, seed=1), quiet
    )
    assert first["losses"] == second["losses"]
    for name in ("base", "docs", "asyncio"):
        one = tiny.state_dict_from_dir(first["paths"][name])
        two = tiny.state_dict_from_dir(second["paths"][name])
        assert all(torch.equal(one[key], two[key]) for key in one)
    base, base_other = (tiny.state_dict_from_dir(run["paths"]["base"]) for run in (first, other))
    assert any(not torch.equal(base[key], base_other[key]) for key in base)
    # the specialists moved away from the base, each its own way
    docs, code = (tiny.state_dict_from_dir(first["paths"][name]) for name in ("docs", "asyncio"))
    assert any(not torch.equal(docs[key], base[key]) for key in base)
    assert any(not torch.equal(docs[key], code[key]) for key in base)


def test_overwrite_clears_only_demo_outputs(tmp_path):
    from mergekit_fisher.demo.pipeline import OUTPUTS, clear_outputs

    for name in OUTPUTS:
        if "." in name:
            (tmp_path / name).write_text("old", encoding="utf-8")
        else:
            (tmp_path / name / "inner").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "mine").mkdir()
    clear_outputs(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["mine", "notes.txt"]


@pytest.mark.slow
def test_default_demo_tells_the_papers_story(tmp_path):
    """The default run (minutes): specialists diverge, and Fisher averaging beats the plain
    average."""
    from mergekit_fisher.demo.pipeline import DemoSettings, run_demo

    report = run_demo(str(tmp_path / "demo"), DemoSettings(), echo=lambda line: None)
    results = report["results"]
    for own, other in (("docs", "asyncio"), ("asyncio", "docs")):
        specialist = results[f"{own} specialist"]
        assert specialist[own]["loss"] < results["base"][own]["loss"]
        assert specialist[other]["loss"] > results["base"][other]["loss"]
    mean = {
        label: sum(cell["loss"] for cell in row.values()) / len(row)
        for label, row in results.items()
    }
    assert mean["fisher"] < mean["linear"]
    assert mean["fisher_ties"] < mean["ties"]


def test_tiny_demo_runs_its_commands_in_one_process(tmp_path):
    """`demo --tiny` runs compute and mergekit-yaml through their entry points in this process
    (no start-up per command), and its stage lines survive the commands' own -q."""
    result = CliRunner().invoke(main, ["demo", str(tmp_path / "w"), "--tiny", "--no-plot"])
    assert result.exit_code == 0, result.output
    assert "(in process)" in result.stderr and "[5/5]" in result.stderr
    assert "beat" in result.stdout  # the verdict lines


def test_an_in_process_command_that_fails_names_itself(tmp_path):
    from mergekit_fisher.demo.pipeline import run_in_process

    with pytest.raises(click.ClickException, match="compute x failed"):
        run_in_process(
            "compute x",
            ["python", "-m", "mergekit_fisher", "compute", str(tmp_path / "no"), str(tmp_path)],
        )
