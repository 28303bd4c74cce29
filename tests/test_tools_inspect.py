"""`mergekit-fisher inspect`: statistics against hand-computed and brute-force values, coverage,
JSON."""

import json
import math
import os

import pytest
import tiny
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_fisher.cli import main
from mergekit_fisher.fisher_file import FisherConfig, write_fisher
from mergekit_fisher.tools.checkpoint import checkpoint_shapes

NAN, INF = float("nan"), float("inf")

# layer / module label of each tensor, written out by hand (independent of tools.grouping)
TENSORS = {
    "model.embed_tokens.weight": ([[0.5, 0.5], [0.0, 1.0]], "embed_tokens", "embed_tokens"),
    "model.layers.0.self_attn.q_proj.weight": (
        [[1.0, 0.0], [3.0, 0.0]],
        "layer 0",
        "self_attn.q_proj",
    ),
    "model.layers.0.mlp.up_proj.weight": ([[5.0, 1.0, 0.0]], "layer 0", "mlp.up_proj"),
    "model.layers.1.self_attn.q_proj.weight": (
        [[2.0, 0.0], [0.0, 0.0]],
        "layer 1",
        "self_attn.q_proj",
    ),
}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture
def hand_file(tmp_path):
    path = tmp_path / "hand"
    write_fisher(
        {n: torch.tensor(v[0]) for n, v in TENSORS.items()},
        path,
        FisherConfig(
            model="/models/base",
            num_examples=12,
            fisher_type="empirical",
            dataset_hash="abc123",
            task="code",
        ),
    )
    return path


def test_hand_computed_numbers_per_tensor(hand_file):
    result = run("inspect", hand_file, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {row["name"]: row for row in report["rows"]}
    q0 = rows["model.layers.0.self_attn.q_proj.weight"]
    # [[1, 0], [3, 0]]: sum 4, mean 1, max 3, half zeros
    assert (q0["sum"], q0["mean"], q0["max"], q0["zero_fraction"], q0["nonfinite"]) == (
        4.0,
        1.0,
        3.0,
        0.5,
        0,
    )
    assert q0["shape"] == [2, 2] and q0["dtype"] == "F32"
    up = rows["model.layers.0.mlp.up_proj.weight"]
    assert (up["sum"], up["mean"], up["max"], up["zero_fraction"]) == (
        6.0,
        2.0,
        5.0,
        pytest.approx(1 / 3),
    )
    # total mass 2 + 4 + 6 + 2 = 14
    assert (
        report["totals"]["sum"] == 14.0
        and report["num_tensors"] == 4
        and report["num_elements"] == 15
    )
    assert up["share"] == pytest.approx(6 / 14)
    assert report["format"] == "mergekit-fisher" and report["format_version"] == 1
    assert report["config"]["num_examples"] == 12 and report["config"]["dataset_hash"] == "abc123"
    assert report["config_stats_match"] is True


def test_hand_computed_grouped_sums(hand_file):
    by_layer = {
        r["name"]: r
        for r in json.loads(run("inspect", hand_file, "--by", "layer", "--json").output)["rows"]
    }
    assert list(by_layer) == ["embed_tokens", "layer 0", "layer 1"]
    assert by_layer["layer 0"]["sum"] == 10.0 and by_layer["layer 0"]["tensors"] == 2
    assert by_layer["layer 0"]["mean"] == pytest.approx(10 / 7) and by_layer["layer 0"][
        "zero_fraction"
    ] == pytest.approx(3 / 7)
    by_module = {
        r["name"]: r
        for r in json.loads(run("inspect", hand_file, "--by", "module", "--json").output)["rows"]
    }
    assert (
        by_module["self_attn.q_proj"]["sum"] == 6.0 and by_module["self_attn.q_proj"]["max"] == 3.0
    )
    assert by_module["self_attn.q_proj"]["zero_fraction"] == pytest.approx(5 / 8)


def test_text_report_shows_provenance_and_rows(hand_file):
    result = run("inspect", hand_file, "--by", "layer")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert "format:       mergekit-fisher v1" in lines
    assert "num_examples: 12" in lines and "task:         code" in lines
    layer0 = next(line for line in lines if line.startswith("layer 0"))
    assert layer0.split() == [
        "layer",
        "0",
        "2",
        "7",
        "10",
        "71.4%",
        "1.429",
        "5",
        "42.9%",
        "0",
        "0",
    ]
    assert "config sum:   matches the values" in lines


def _brute_force(values, label_of):
    """Reference statistics with plain Python loops over lists (NaN/Inf counted, not summed)."""
    groups = {}
    for name, flat in values.items():
        g = groups.setdefault(
            label_of[name],
            {"sum": 0.0, "finite": 0, "n": 0, "zeros": 0, "bad": 0, "neg": 0, "max": -math.inf},
        )
        for x in flat:
            g["n"] += 1
            g["zeros"] += x == 0
            if math.isfinite(x):
                g["sum"] += x
                g["finite"] += 1
                g["max"] = max(g["max"], x)
                g["neg"] += x < 0
            else:
                g["bad"] += 1
                g["neg"] += x == -math.inf
    return groups


@pytest.mark.parametrize("by", ["tensor", "layer", "module"])
def test_random_file_with_bad_values_matches_brute_force(tmp_path, by):
    generator = torch.Generator().manual_seed(0)
    values = {}
    for name in TENSORS:
        t = torch.rand(3, 5, generator=generator, dtype=torch.float64).to(torch.float32)
        t[t < 0.2] = 0.0
        values[name] = t
    values["model.layers.1.self_attn.q_proj.weight"][0, :3] = torch.tensor([NAN, INF, -2.5])
    values["model.layers.0.mlp.up_proj.weight"][1, 1] = -INF
    path = tmp_path / "bad.safetensors"
    save_file(
        values, str(path)
    )  # no config, and values the reader would refuse: inspect reports them
    report = json.loads(run("inspect", path, "--by", by, "--json").output)
    column = {"tensor": None, "layer": 1, "module": 2}[by]
    label_of = {n: (n if column is None else TENSORS[n][column]) for n in TENSORS}
    expected = _brute_force({n: v.reshape(-1).tolist() for n, v in values.items()}, label_of)
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == set(expected)
    for label, ref in expected.items():
        row = rows[label]
        assert row["sum"] == pytest.approx(ref["sum"], rel=1e-12)
        assert row["mean"] == pytest.approx(ref["sum"] / ref["finite"], rel=1e-12)
        assert row["max"] == pytest.approx(ref["max"])
        assert row["zero_fraction"] == pytest.approx(ref["zeros"] / ref["n"])
        assert (row["nonfinite"], row["negative"], row["numel"]) == (
            ref["bad"],
            ref["neg"],
            ref["n"],
        )
    assert report["totals"]["nonfinite"] == 3 and report["totals"]["negative"] == 2
    assert report["config"] is None and report["config_stats_match"] is None
    assert run("inspect", path, "--check").exit_code == 1  # problems -> non-zero for scripts


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny.make_llama(str(path), hidden=16, layers=1, vocab_size=64)
    return path


def test_checkpoint_shapes_single_and_sharded(tiny_model, tmp_path):
    expected = {n: tuple(t.shape) for n, t in tiny.state_dict_from_dir(str(tiny_model)).items()}
    assert checkpoint_shapes(str(tiny_model)) == expected
    model = tiny.make_llama(None, hidden=16, layers=1, vocab_size=64)
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="4KB")
    assert os.path.exists(sharded / "model.safetensors.index.json")
    assert checkpoint_shapes(str(sharded)) == expected
    assert checkpoint_shapes(str(tiny_model / "model.safetensors")) == expected


def test_coverage_missing_extra_and_shape_mismatch(tiny_model, tmp_path):
    state = tiny.state_dict_from_dir(str(tiny_model))
    names = sorted(state)
    missing, bad_shape = names[0], names[1]
    fisher = {n: t.float().square() for n, t in state.items() if n != missing}
    fisher[bad_shape] = torch.ones(3, 3)
    fisher["model.layers.7.mlp.gate_proj.weight"] = torch.ones(2)
    path = tmp_path / "partial.safetensors"
    write_fisher(fisher, path)
    report = json.loads(run("inspect", path, "--model", tiny_model, "--json").output)
    cov = report["coverage"]
    assert cov["missing"] == [missing]
    assert cov["extra"] == ["model.layers.7.mlp.gate_proj.weight"]
    assert cov["shape_mismatches"] == [
        {"name": bad_shape, "fisher_shape": [3, 3], "model_shape": list(state[bad_shape].shape)}
    ]
    assert cov["model_tensors"] == len(state) and cov["covered"] == len(state) - 2
    text = run("inspect", path, "--model", tiny_model).output
    assert f"  missing:  {missing}" in text and f"{bad_shape}: Fisher (3, 3) vs model" in text
    assert run("inspect", path, "--model", tiny_model, "--check").exit_code == 1
    full = tmp_path / "full.safetensors"
    write_fisher({n: t.float().square() for n, t in state.items()}, full)
    result = run("inspect", full, "--model", tiny_model, "--check")
    assert result.exit_code == 0, result.output
    assert f"{len(state)} of {len(state)} model tensors covered" in result.output


def test_coverage_of_a_tied_model_knows_the_tied_lm_head(tmp_path):
    """A tied checkpoint stores only the embedding; mergekit reads lm_head.weight from it. A Fisher
    file that also has an lm_head.weight entry (converted from another tool) is complete, its
    lm_head entry is listed as tied, not extra; with ONLY the lm_head entry the embedding is missing
    (the merge looks the embedding's Fisher up under its own name). An untied checkpoint has no tied
    names."""
    tied_dir, untied_dir = tmp_path / "tied", tmp_path / "untied"
    tiny.make_llama(str(tied_dir), hidden=16, layers=1, vocab_size=64, tie=True)
    tiny.make_llama(str(untied_dir), hidden=16, layers=1, vocab_size=64, tie=False)
    state = tiny.state_dict_from_dir(str(tied_dir))
    assert "lm_head.weight" not in state
    embedding = state["model.embed_tokens.weight"].float().square()
    both = tmp_path / "both.safetensors"
    write_fisher(
        {**{n: t.float().square() for n, t in state.items()}, "lm_head.weight": embedding}, both
    )
    cov = json.loads(run("inspect", both, "--model", tied_dir, "--json").output)["coverage"]
    assert cov["extra"] == [] and cov["missing"] == []
    assert cov["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    result = run("inspect", both, "--model", tied_dir, "--check")
    assert result.exit_code == 0, result.output
    assert (
        "tied:     lm_head.weight (the checkpoint stores it as model.embed_tokens.weight)"
        in result.output
    )

    only_head = tmp_path / "only_head.safetensors"
    write_fisher(
        {
            **{n: t.float().square() for n, t in state.items() if "embed" not in n},
            "lm_head.weight": embedding,
        },
        only_head,
    )
    cov = json.loads(run("inspect", only_head, "--model", tied_dir, "--json").output)["coverage"]
    assert cov["missing"] == ["model.embed_tokens.weight"] and cov["extra"] == []
    assert cov["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}

    untied_state = tiny.state_dict_from_dir(str(untied_dir))
    no_head = tmp_path / "no_head.safetensors"
    write_fisher(
        {n: t.float().square() for n, t in untied_state.items() if n != "lm_head.weight"}, no_head
    )
    cov = json.loads(run("inspect", no_head, "--model", untied_dir, "--json").output)["coverage"]
    assert cov["missing"] == ["lm_head.weight"] and cov["tied"] == {}


def test_bad_inputs_give_one_clear_error(tmp_path, hand_file):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.ones(2)}, pickled / "pytorch_model.bin")
    result = run("inspect", hand_file, "--model", pickled)
    assert result.exit_code == 2
    assert "pickle-only" in result.output and "safe_serialization=True" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = run("inspect", tmp_path / "nowhere")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = run("inspect", hand_file, "--model", tmp_path / "no_model")
    assert result.exit_code == 2 and "model path does not exist" in result.output
    result = run(
        "inspect", hand_file, "--model", "someorg/not-cached"
    )  # tests run with HF_HUB_OFFLINE=1
    assert (
        result.exit_code == 2
        and "model not found" in result.output
        and "someorg/not-cached" in result.output
    )
    fisher_bin = tmp_path / "fisher.pt"
    torch.save({"w": torch.ones(2)}, fisher_bin)
    result = run("inspect", fisher_bin)
    assert result.exit_code == 2 and "convert" in result.output


def test_sharded_bf16_directory(tmp_path):
    values = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.full((64, 64), 0.5 * (i + 1))
        for i in range(4)
    }
    path = tmp_path / "sharded"
    write_fisher(
        values, path, FisherConfig(num_examples=3), dtype=torch.bfloat16, max_shard_size="10KB"
    )
    report = json.loads(run("inspect", path, "--json").output)
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert (
        report["layout"] == {"kind": "sharded directory", "files": len(shards)} and len(shards) == 4
    )
    rows = {r["name"]: r for r in report["rows"]}
    for i in range(4):  # 0.5, 1.0, 1.5, 2.0 are exact in bfloat16
        row = rows[f"model.layers.{i}.mlp.up_proj.weight"]
        assert (
            row["dtype"] == "BF16"
            and row["sum"] == 64 * 64 * 0.5 * (i + 1)
            and row["max"] == 0.5 * (i + 1)
        )
    assert report["totals"]["sum"] == 64 * 64 * 5.0 and report["config_stats_match"] is True


def test_adapter_space_coverage_against_the_adapter(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model)),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    adapter = tmp_path / "adapter"
    peft.save_pretrained(str(adapter))
    names = load_file(str(adapter / "adapter_model.safetensors"))
    path = tmp_path / "fa.safetensors"
    write_fisher(
        {n: t.float().square() for n, t in names.items()}, path, FisherConfig(space="adapter")
    )
    cov = json.loads(run("inspect", path, "--model", adapter, "--json").output)["coverage"]
    assert cov["covered"] == cov["model_tensors"] == len(names) == 4 and "note" not in cov
    cov = json.loads(run("inspect", path, "--model", tiny_model, "--json").output)["coverage"]
    assert (
        cov["covered"] == 0
        and sorted(cov["extra"]) == sorted(names)
        and "adapter directory" in cov["note"]
    )


def test_checkpoint_index_refuses_broken_layouts(tiny_model, tmp_path):
    """The one model-index reader (mergekit's ShardedTensorIndex + safe_open): a broken index, a
    missing shard and a pickle-only checkpoint each give one clear error; nothing is unpickled."""
    import shutil

    from mergekit_fisher.errors import FisherInputError
    from mergekit_fisher.estimator.loading import checkpoint_names
    from mergekit_fisher.tools.checkpoint import checkpoint_index

    model = tiny.make_llama(None, hidden=16, layers=1, vocab_size=64)
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="4KB")
    index = checkpoint_index(str(sharded))
    assert set(index.tensor_paths) == set(tiny.state_dict_from_dir(str(tiny_model)))
    assert checkpoint_names(str(sharded)) == set(index.tensor_paths)

    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(FisherInputError, match=r"broken model\.safetensors\.index\.json"):
        checkpoint_shapes(str(broken))

    missing = tmp_path / "missing"
    shutil.copytree(sharded, missing)
    first_shard = sorted(f for f in os.listdir(missing) if f.endswith(".safetensors"))[0]
    os.remove(missing / first_shard)
    with pytest.raises(
        FisherInputError,
        match=(
            f"index entry '{first_shard}' names a shard that is missing "
            "\\(in model.safetensors.index.json\\)"
        ),
    ):
        checkpoint_shapes(str(missing))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(FisherInputError, match="pickle-only"):
        checkpoint_index(str(pickled))
    assert (
        checkpoint_names(str(pickled)) is None
    )  # compute then names tensors after the model's parameters
