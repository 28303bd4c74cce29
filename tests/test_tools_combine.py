"""`mergekit-fisher combine`: the example-weighted mean of shard Fishers equals the all-data
Fisher."""

import os

import pytest
import tiny
import torch
from click.testing import CliRunner

from mergekit_fisher.cli import main
from mergekit_fisher.fisher_file import FisherConfig, open_fisher, write_fisher


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def brute_force_fisher(model, examples):
    """Empirical diagonal Fisher, one example at a time: mean over examples of grad(loss)^2,
    float64."""
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model.named_parameters()}
    for ids in examples:
        model.zero_grad()
        model(input_ids=ids[None], labels=ids[None]).loss.backward()
        for name, p in model.named_parameters():
            total[name] += p.grad.detach().to(torch.float64).square()
    return {name: t / len(examples) for name, t in total.items()}


@pytest.fixture(scope="module")
def halves_and_all(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    model = tiny.make_llama(None, hidden=16, layers=1, vocab_size=64)
    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, 64, (6,), generator=generator) for _ in range(7)]
    first, second = examples[:3], examples[3:]  # unequal halves: the weighting matters
    paths = []
    for i, part in enumerate((first, second)):
        path = root / f"half{i}"
        write_fisher(
            brute_force_fisher(model, part),
            path,
            FisherConfig(
                model="/m",
                fisher_type="empirical",
                num_examples=len(part),
                num_tokens=6 * len(part),
                dataset=f"shard{i}.jsonl",
                dataset_hash=f"hash{i}",
            ),
        )
        paths.append(path)
    return root, paths, brute_force_fisher(model, examples)


def test_combined_halves_equal_all_data_fisher(halves_and_all):
    root, paths, everything = halves_and_all
    out = root / "combined.safetensors"
    result = run("combine", *paths, out)
    assert result.exit_code == 0, result.output
    combined = open_fisher(str(out))
    assert sorted(combined.names()) == sorted(everything)
    for name, reference in everything.items():
        torch.testing.assert_close(
            combined.get_tensor(name).double(), reference, rtol=1e-6, atol=1e-12
        )
    # the halves alone differ from the whole: the test could fail
    half = open_fisher(str(paths[0]))
    assert any(
        not torch.allclose(half.get_tensor(n).double(), everything[n], rtol=1e-3)
        for n in everything
    )
    config = combined.config
    assert (config.num_examples, config.num_tokens, config.fisher_type) == (7, 42, "empirical")
    assert config.model == "/m" and config.dataset == "shard0.jsonl + shard1.jsonl"
    assert config.model_extra["dataset_hashes"] == ["hash0", "hash1"]
    assert [s["weight"] for s in config.model_extra["combined_from"]] == [3.0, 4.0]


def test_explicit_weights_when_num_examples_missing(tmp_path):
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0])
    write_fisher({"w": a}, tmp_path / "a.safetensors")
    write_fisher({"w": b}, tmp_path / "b.safetensors")
    out = tmp_path / "out"
    result = run("combine", tmp_path / "a.safetensors", tmp_path / "b.safetensors", out)
    assert result.exit_code == 2 and not out.exists()
    assert (
        "num_examples" in result.output
        and "a.safetensors" in result.output
        and "--weights" in result.output
    )
    result = run(
        "combine", tmp_path / "a.safetensors", tmp_path / "b.safetensors", out, "--weights", "1,3"
    )
    assert result.exit_code == 0, result.output
    # (1 * [1, 4] + 3 * [3, 0]) / 4 = [2.5, 1.0]
    assert open_fisher(str(out)).get_tensor("w").tolist() == [2.5, 1.0]
    result = run(
        "combine",
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
        tmp_path / "o2",
        "--weights",
        "1",
    )
    assert result.exit_code == 2 and "1 weight(s) for 2" in result.output


@pytest.mark.parametrize(
    "second, message",
    [
        ({"w": torch.ones(2), "v": torch.ones(3)}, "tensor v"),
        ({"u": torch.ones(2)}, "missing here [Fisher file"),  # w is missing from b
        ({"w": torch.ones(3)}, "shape (3,) here but (2,)"),
        ({"w": torch.tensor([1.0, -1.0])}, "1 negative Fisher value(s)"),
        ({"w": torch.tensor([float("nan"), 1.0])}, "1 non-finite (NaN/Inf) Fisher value(s)"),
        (
            {"w": torch.tensor([float("inf"), -float("inf")])},
            "2 non-finite (NaN/Inf) Fisher value(s)",
        ),
    ],
)
def test_incompatible_inputs_are_refused_and_nothing_is_written(tmp_path, second, message):
    write_fisher({"w": torch.ones(2)}, tmp_path / "a.safetensors", FisherConfig(num_examples=2))
    write_fisher(second, tmp_path / "b.safetensors", FisherConfig(num_examples=2))
    before = sorted(os.listdir(tmp_path))
    result = run(
        "combine", tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out"
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary leftovers


def test_fisher_type_must_agree_and_arity(tmp_path):
    write_fisher(
        {"w": torch.ones(2)},
        tmp_path / "a.safetensors",
        FisherConfig(num_examples=2, fisher_type="empirical"),
    )
    write_fisher(
        {"w": torch.ones(2)},
        tmp_path / "b.safetensors",
        FisherConfig(num_examples=2, fisher_type="sampled"),
    )
    result = run(
        "combine", tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "out"
    )
    assert result.exit_code == 2 and "disagree on fisher_type (empirical, sampled)" in result.output
    result = run("combine", tmp_path / "a.safetensors", tmp_path / "out")
    assert result.exit_code == 2 and "at least two Fisher files" in result.output
    result = run(
        "combine",
        tmp_path / "a.safetensors",
        tmp_path / "a.safetensors",
        tmp_path / "b.safetensors",
    )
    assert result.exit_code == 2 and "already exists" in result.output


@pytest.mark.slow
def test_combine_of_real_compute_runs_equals_one_run(tmp_path, tokenizer_dir):
    """`compute` on two data shards, then `combine`, against `compute` on all the data."""
    model_dir = tmp_path / "model"
    tiny.make_llama(str(model_dir), hidden=16, layers=1, tokenizer_dir=tokenizer_dir)
    rows = [{"text": text} for text in tiny.CORPUS]
    shards = {"all": rows, "a": rows[:3], "b": rows[3:]}
    for key, part in shards.items():
        data = tiny.write_jsonl(str(tmp_path / f"{key}.jsonl"), part)
        # batch size 1 and float64 accumulators: every run computes each example's gradient
        # identically
        result = run(
            "compute",
            model_dir,
            tmp_path / f"fisher_{key}",
            "--data",
            data,
            "--fisher-type",
            "empirical",
            "--no-shuffle",
            "--batch-size",
            "1",
            "--accumulator-dtype",
            "float64",
            "--no-progress",
        )
        assert result.exit_code == 0, result.output
    result = run("combine", tmp_path / "fisher_a", tmp_path / "fisher_b", tmp_path / "combined")
    assert result.exit_code == 0, result.output
    whole, combined = (
        open_fisher(str(tmp_path / "fisher_all")),
        open_fisher(str(tmp_path / "combined")),
    )
    assert combined.config.num_examples == whole.config.num_examples == len(rows)
    assert combined.config.num_tokens == whole.config.num_tokens
    hashes = [open_fisher(str(tmp_path / f"fisher_{k}")).config.dataset_hash for k in ("a", "b")]
    assert combined.config.model_extra["dataset_hashes"] == hashes and hashes[0] != hashes[1]
    assert sorted(combined.names()) == sorted(whole.names())
    for name in whole.names():
        torch.testing.assert_close(
            combined.get_tensor(name), whole.get_tensor(name), rtol=1e-6, atol=1e-12
        )


def test_bad_shard_size_fails_before_any_work(tmp_path):
    from click.testing import CliRunner

    from mergekit_fisher.cli import main as cli
    from mergekit_fisher.fisher_file import parse_shard_size

    assert (
        parse_shard_size("5GB") == 5 * 10**9
        and parse_shard_size("2GiB") == 2 * 2**30
        and parse_shard_size(7) == 7
    )
    result = CliRunner().invoke(
        cli, ["combine", "a", "b", str(tmp_path / "out"), "--max-shard-size", "banana"]
    )
    assert result.exit_code == 2 and "invalid shard size 'banana'" in result.output
    assert not (tmp_path / "out").exists()


def test_weights_repeated_or_comma_separated_and_refused_by_click(tmp_path):
    """`--weights` is a multiple=True option: given twice it means what the comma form means; a
    weight that is not a positive finite number is refused by click (exit 2, one `Error:` line)
    before any file is read."""
    write_fisher({"w": torch.tensor([1.0, 4.0])}, tmp_path / "a.safetensors")
    write_fisher({"w": torch.tensor([3.0, 0.0])}, tmp_path / "b.safetensors")
    inputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    repeated = run("combine", *inputs, tmp_path / "repeated", "--weights", "1", "--weights", "3")
    assert repeated.exit_code == 0, repeated.output
    comma = run("combine", *inputs, tmp_path / "comma", "--weights", "1,3")
    assert comma.exit_code == 0, comma.output
    for out in ("repeated", "comma"):
        assert open_fisher(str(tmp_path / out)).get_tensor("w").tolist() == [2.5, 1.0]
    assert [
        s["weight"]
        for s in open_fisher(str(tmp_path / "repeated")).config.model_extra["combined_from"]
    ] == [1, 3]
    result = run("combine", *inputs, tmp_path / "three", "--weights", "1", "--weights", "2,3")
    assert result.exit_code == 2 and "3 weight(s) for 2" in result.output
    for bad in ("0", "-1", "inf", "nan", "x", "1,,2"):
        result = run("combine", *inputs, tmp_path / "bad", "--weights", bad)
        assert result.exit_code == 2, (bad, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and "--weights" in errors[0] and "Traceback" not in result.output, (
            result.output
        )
        assert not (tmp_path / "bad").exists()


def test_quiet_and_verbose_logging(tmp_path):
    """The status line is a log message on stderr (stdout stays empty); -q hides it, -v adds debug
    lines and the traceback of an error; both work before and after the command name."""
    write_fisher({"w": torch.ones(2)}, tmp_path / "a.safetensors", FisherConfig(num_examples=1))
    write_fisher({"w": torch.ones(2)}, tmp_path / "b.safetensors", FisherConfig(num_examples=3))
    inputs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]

    default = run("combine", *inputs, tmp_path / "default")
    assert default.exit_code == 0, default.output
    assert default.stdout == "" and "combined 2 Fisher files (weights 1, 3;" in default.stderr
    assert "debug:" not in default.stderr

    for args in (
        ["combine", *inputs, tmp_path / "q1", "-q"],
        ["-q", "combine", *inputs, tmp_path / "q2"],
    ):
        quiet = run(*args)
        assert quiet.exit_code == 0 and quiet.output == "", quiet.output

    for args in (
        ["combine", *inputs, tmp_path / "v1", "--verbose"],
        ["-v", "combine", *inputs, tmp_path / "v2"],
    ):
        verbose = run(*args)
        assert verbose.exit_code == 0, verbose.output
        assert f"debug: {tmp_path / 'b.safetensors'}: weight 3 of 4" in verbose.stderr
        assert "combined 2 Fisher files" in verbose.stderr

    failing = run("combine", *inputs, tmp_path / "default", "-v")  # the output exists already
    assert failing.exit_code == 2
    lines = failing.output.strip().splitlines()
    assert "Traceback" in failing.output and lines[-1].startswith("Error: output already exists"), (
        failing.output
    )
    assert "Traceback" not in run("combine", *inputs, tmp_path / "default").output

    both = run("combine", *inputs, tmp_path / "both", "-v", "-q")
    assert both.exit_code == 2 and "exclude each other" in both.output
