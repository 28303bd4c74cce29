"""`compute` at scale, on tiny models: finalization memory, --save-dtype, lazy data (--num-examples
parses only the rows it uses; --text-field/--split/--subset), --shard + combine, and the
--device-map plan that leaves room for the accumulators."""

from __future__ import annotations

import json
import os
import weakref

import pytest
import tiny
import torch
from click.testing import CliRunner
from estimator_helpers import compute
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mergekit_fisher.cli import main
from mergekit_fisher.fisher_file import open_fisher


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("scale")
    model = str(root / "m")
    tiny.make_llama(model, seed=3, tokenizer_dir=tokenizer_dir, vocab_size=300)
    rows = [{"text": t} for t in tiny.CORPUS]
    return {"root": root, "model": model, "data": tiny.write_jsonl(str(root / "d.jsonl"), rows)}


# ---------------------------------------------------------------- finalization memory
class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages over time: the ones registered up front plus every tensor an
    operation returns while the mode is on (one count per storage). Temporaries internal to one
    kernel are not seen (bench/bench_memory.py measures the process)."""

    def __init__(self, tensors=()):
        super().__init__()
        self.alive = {}
        for tensor in tensors:
            self._track(tensor)
        self.start = self.peak = self.live()

    def _track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and (key not in self.alive or self.alive[key][0]() is None):
            self.alive[key] = (weakref.ref(tensor), storage.nbytes())

    def live(self) -> int:
        return sum(size for ref, size in self.alive.values() if ref() is not None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self._track(tensor)
        self.peak = max(self.peak, self.live())
        return out


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_finalization_holds_the_accumulators_plus_one_tensor(world, tmp_path, save_dtype):
    from mergekit_fisher.estimator import runner

    # a vocabulary of 4096 x hidden 32: the embedding and head dominate the Fisher's memory
    model = str(tmp_path / "wide")
    tiny.make_llama(model, seed=4, tokenizer_dir=world["model"], vocab_size=4096)
    seen = {}
    write = runner._write

    def measured(opts, peers, engine, *args):
        sums = engine.accumulator.sums
        seen["accumulators"] = sum(t.numel() * t.element_size() for t in sums.values())
        seen["largest"] = max(t.numel() * t.element_size() for t in sums.values())
        with LiveTensorBytes(sums.values()) as tracker:
            result = write(opts, peers, engine, *args)
        seen["start"], seen["peak"] = tracker.start, tracker.peak
        return result

    runner._write = measured
    try:
        fisher = compute(
            model,
            str(tmp_path / "out"),
            world["data"],
            accumulator_dtype="float64",
            save_dtype=save_dtype,
        )
    finally:
        runner._write = write
    assert seen["start"] == seen["accumulators"]
    assert seen["peak"] <= seen["accumulators"] + seen["largest"], seen
    # the tracker sees copies: the old finalization (a reduced clone, a mean, a final clone of
    # every tensor) would have passed 3x the accumulators
    with LiveTensorBytes() as tracker:
        copies = [t.clone() for t in fisher.values()]
    assert tracker.peak >= sum(t.numel() * t.element_size() for t in copies)


def test_save_dtype_bfloat16_round_trips_through_inspect_and_merge(world, tmp_path):
    full = compute(world["model"], str(tmp_path / "f32"), world["data"])
    out = str(tmp_path / "bf16")
    half = compute(world["model"], out, world["data"], save_dtype="bfloat16")
    stored = open_fisher(out)
    assert stored.config.dtype == "bfloat16"
    assert {stored.header(n).dtype for n in stored.names()} == {"BF16"}
    for name, value in full.items():  # the reader returns float32 (bfloat16 values, upcast)
        torch.testing.assert_close(half[name], value.to(torch.bfloat16).float(), rtol=0, atol=0)
    # the recorded statistics are those of the stored (bfloat16) values
    total = sum(float(t.double().sum()) for t in half.values())
    assert stored.config.sum == pytest.approx(total, rel=1e-9)
    report = CliRunner().invoke(main, ["inspect", out, "--check", "--json"])
    assert report.exit_code == 0, report.output
    # merge: fisher of the model with itself and a perturbed copy, against the formula
    from merge_world import run_recipe

    other = str(tmp_path / "other")
    base = tiny.make_llama(seed=3, tokenizer_dir=world["model"], vocab_size=300)
    tiny.perturbed_copy(base, other, seed=9, scale=0.05, tokenizer_dir=world["model"])
    other_fisher = str(tmp_path / "other_fisher")
    compute(other, other_fisher, world["data"], save_dtype="bfloat16")
    recipe = {
        "merge_method": "fisher",
        "dtype": "float32",
        "models": [
            {"model": world["model"], "parameters": {"weight": 1.0, "fisher": out}},
            {"model": other, "parameters": {"weight": 1.0, "fisher": other_fisher}},
        ],
    }
    merged = run_recipe(recipe, str(tmp_path / "merged"))
    states = [tiny.state_dict_from_dir(world["model"]), tiny.state_dict_from_dir(other)]
    other_values = open_fisher(other_fisher)
    values = [half, {n: other_values.get_tensor(n) for n in other_values.names()}]

    def normalized(fisher, name):  # default: the file's mean Fisher is 1, floor 1e-6 of it
        mean = torch.cat([v.double().flatten() for v in fisher.values()]).mean()
        return fisher[name].double() / mean + 1e-6

    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
        f0, f1 = normalized(values[0], name), normalized(values[1], name)
        expected = (f0 * states[0][name].double() + f1 * states[1][name].double()) / (f0 + f1)
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- data read lazily
def _big_jsonl(path, good_rows, total):
    """`good_rows` valid rows first, then lines that are not JSON: parsing any of them fails."""
    with open(path, "w", encoding="utf-8") as fp:
        for index in range(total):
            if index < len(good_rows):
                fp.write(json.dumps(good_rows[index]) + "\n")
            else:
                fp.write(f"{{not json, line {index + 1}\n")
    return path


def test_num_examples_parses_only_the_rows_it_uses(world, tmp_path):
    rows = [{"text": t} for t in tiny.CORPUS]
    data = _big_jsonl(str(tmp_path / "big.jsonl"), rows, 100_000)
    out = str(tmp_path / "out")
    fisher = compute(world["model"], out, data, num_examples=len(rows), shuffle=False)
    reference = compute(world["model"], str(tmp_path / "ref"), world["data"], shuffle=False)
    for name in reference:
        torch.testing.assert_close(fisher[name], reference[name], rtol=1e-6, atol=0)
    config = open_fisher(out).config
    assert config.num_rows == 100_000 and config.num_examples == len(rows)
    # a selected bad line is still an error, naming it
    result = CliRunner().invoke(
        main,
        ["compute", world["model"], str(tmp_path / "bad"), "--data", data, "--no-progress",
         "--no-shuffle", "--num-examples", str(len(rows) + 1)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert f"line {len(rows) + 1} is not valid JSON" in result.output


def test_shuffled_selection_is_a_seeded_permutation_and_reads_nothing_else(world, tmp_path):
    """The documented selection: the first N of torch.randperm(rows, seed); other lines unread."""
    total, wanted, seed = 5_000, 6, 11
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:wanted].tolist()
    texts = {position: tiny.CORPUS[i % len(tiny.CORPUS)] for i, position in enumerate(chosen)}
    path = str(tmp_path / "poisoned.jsonl")
    with open(path, "w", encoding="utf-8") as fp:
        for line in range(total):
            fp.write(json.dumps({"text": texts[line]}) + "\n" if line in texts else "{bad\n")
    got = compute(
        world["model"],
        str(tmp_path / "out"),
        path,
        num_examples=wanted,
        shuffle=True,
        seed=seed,
        fisher_type="empirical",
    )
    in_order = tiny.write_jsonl(
        str(tmp_path / "chosen.jsonl"), [{"text": texts[p]} for p in chosen]
    )
    # the same rows in selection order, unshuffled: the same Fisher (empirical: order-free)
    expected = compute(
        world["model"], str(tmp_path / "ref"), in_order, shuffle=False, fisher_type="empirical"
    )
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=0)


def test_text_field_split_and_subset_of_datasets_sources(world, tmp_path):
    import datasets

    rows = {"content": list(tiny.CORPUS), "id": list(range(len(tiny.CORPUS)))}
    saved = str(tmp_path / "saved")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({k: v[:2] for k, v in rows.items()}),
            "validation": datasets.Dataset.from_dict(rows),
        }
    ).save_to_disk(saved)
    out = str(tmp_path / "out")
    got = compute(world["model"], out, saved, split="validation", text_field="content")
    expected = compute(world["model"], str(tmp_path / "ref"), world["data"])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=0)
    config = open_fisher(out).config
    assert (config.dataset_split, config.text_field, config.num_examples) == (
        "validation",
        "content",
        len(tiny.CORPUS),
    )
    # provenance that travels: the card and inspect say which split and column
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "| data split | validation |" in card and "| text field | content |" in card
    shown = CliRunner().invoke(main, ["inspect", out])
    assert shown.exit_code == 0 and "validation" in shown.output, shown.output
    # a local dataset repository with two configs (subsets), read as load_dataset reads the hub
    repo = tmp_path / "repo"
    for subset, texts in (("small", tiny.CORPUS[:3]), ("all", tiny.CORPUS)):
        (repo / subset).mkdir(parents=True)
        tiny.write_jsonl(str(repo / subset / "train.jsonl"), [{"text": t} for t in texts])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: small\n  data_files: small/*.jsonl\n"
        "- config_name: all\n  data_files: all/*.jsonl\n---\n"
    )
    sub = str(tmp_path / "sub")
    compute(world["model"], sub, str(repo), subset="all", split="train")
    assert open_fisher(sub).config.num_examples == len(tiny.CORPUS)
    assert open_fisher(sub).config.dataset_subset == "all"
    for args, needle in (
        (["--split", "test"], "no split 'test'"),
        (["--text-field", "body"], "no field 'body'"),
    ):
        result = CliRunner().invoke(
            main,
            ["compute", world["model"], str(tmp_path / "x"), "--data", saved, "--no-progress",
             "--split", "validation", *args],
        )  # fmt: skip
        assert result.exit_code == 2 and needle in result.output, result.output
        assert not os.path.exists(tmp_path / "x")


# ---------------------------------------------------------------- shards
def test_shards_combined_equal_one_run(world, tmp_path):
    common = dict(fisher_type="sampled", samples=2, seed=7, shuffle=True, batch_size=2)
    whole = compute(world["model"], str(tmp_path / "whole"), world["data"], **common)
    parts = []
    for index in (1, 2, 3):
        part = str(tmp_path / f"part{index}")
        compute(world["model"], part, world["data"], shard=f"{index}/3", **common)
        assert open_fisher(part).config.shard == f"{index}/3"
        parts.append(part)
    assert sum(open_fisher(p).config.num_examples for p in parts) == len(tiny.CORPUS)
    out = str(tmp_path / "combined")
    result = CliRunner().invoke(main, ["combine", *parts, out])
    assert result.exit_code == 0, result.output
    combined = open_fisher(out)
    for name in whole:
        torch.testing.assert_close(combined.get_tensor(name), whole[name], rtol=1e-5, atol=0)
    bad = CliRunner().invoke(
        main, ["compute", world["model"], str(tmp_path / "y"), "--data", world["data"],
               "--shard", "4/3"]
    )  # fmt: skip
    assert bad.exit_code == 2 and "invalid --shard '4/3'" in bad.output


# ---------------------------------------------------------------- --device-map auto
def test_device_map_leaves_room_for_the_accumulators(tmp_path):
    from mergekit_fisher.estimator.device_plan import meta_model, plan_device_map

    tiny.llama_config(64, 32, 8, False).save_pretrained(str(tmp_path))  # 8 layers: fine-grained
    skeleton = meta_model(str(tmp_path), task="causal-lm", dtype=torch.bfloat16,
                          trust_remote_code=False)  # fmt: skip
    sizes = {n: p.numel() * 2 for n, p in skeleton.named_parameters()}  # bfloat16 weights
    total = sum(sizes.values())
    # 4 GPUs; weights alone would fit on one, weights + float32 accumulators (3x) need three+
    capacity = {device: int(total * 1.25) for device in range(4)}
    device_map = plan_device_map(
        skeleton, capacity, weight_dtype=torch.bfloat16, accumulator_dtype=torch.float32
    )

    def device_of(name):
        parts = name.split(".")
        for cut in range(len(parts), -1, -1):
            if ".".join(parts[:cut]) in device_map:
                return device_map[".".join(parts[:cut])]
        raise AssertionError(name)

    used = {}
    for name, size in sizes.items():
        used[device_of(name)] = used.get(device_of(name), 0) + size
    assert set(used) <= set(capacity) and len(used) == 3, used
    for device, weights in used.items():  # weights + accumulators (2 x weights in float32)
        assert weights * 3 <= capacity[device], (device, weights, capacity[device])
    # too small for weights + accumulators: one clear error instead of a CPU offload
    from mergekit_fisher.errors import FisherInputError

    with pytest.raises(FisherInputError, match="accumulators need about"):
        plan_device_map(
            skeleton,
            {0: total * 0.6, 1: total * 0.6},
            weight_dtype=torch.bfloat16,
            accumulator_dtype=torch.float32,
        )


def test_max_memory_is_parsed_and_checked():
    from mergekit_fisher.errors import FisherInputError
    from mergekit_fisher.estimator.device_plan import parse_max_memory

    assert parse_max_memory("0=70GiB, cuda:1=500MB,cpu=1GB") == {
        0: 70 * 2**30,
        1: 500 * 10**6,
        "cpu": 10**9,
    }
    with pytest.raises(FisherInputError, match="invalid --max-memory entry 'gpu0=1GB'"):
        parse_max_memory("gpu0=1GB")


def test_streaming_a_datasets_source(world, tmp_path):
    """--streaming reads a `datasets` source as a stream: the same rows give the same Fisher; two
    shards of the stream combine into one run; a stream needs --num-examples."""
    repo = tmp_path / "repo"
    repo.mkdir()
    tiny.write_jsonl(str(repo / "train.jsonl"), [{"text": t} for t in tiny.CORPUS])
    n = len(tiny.CORPUS)
    common = dict(fisher_type="empirical", num_examples=n)
    expected = compute(
        world["model"], str(tmp_path / "ref"), world["data"], fisher_type="empirical"
    )
    streamed = str(tmp_path / "streamed")
    got = compute(world["model"], streamed, str(repo), streaming=True, shuffle=True, **common)
    for name in expected:  # every row, in a shuffled order: the same mean
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=0)
    config = open_fisher(streamed).config
    assert config.dataset_streamed and config.num_examples == n
    assert getattr(config, "num_rows", None) is None  # a stream's length is not known
    parts = []
    for index in (1, 2):
        part = str(tmp_path / f"s{index}")
        compute(world["model"], part, str(repo), streaming=True, shard=f"{index}/2", **common)
        parts.append(part)
    result = CliRunner().invoke(main, ["combine", *parts, str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    both = open_fisher(str(tmp_path / "both"))
    for name in expected:
        # float32 files re-weighted by their example counts: rounding on values ~1e-6 of the mean
        torch.testing.assert_close(both.get_tensor(name), expected[name], rtol=1e-5, atol=1e-9)
    # more examples asked than the stream has: the run uses what there is
    longer = compute(
        world["model"], str(tmp_path / "longer"), str(repo), streaming=True,
        fisher_type="empirical", num_examples=n + 5,
    )  # fmt: skip
    for name in expected:
        torch.testing.assert_close(longer[name], expected[name], rtol=1e-6, atol=0)
    bad = CliRunner().invoke(
        main, ["compute", world["model"], str(tmp_path / "z"), "--data", str(repo), "--streaming"]
    )
    assert bad.exit_code == 2 and "--streaming needs --num-examples" in bad.output


# ---------------------------------------------------------------- batches of similar length
def test_group_by_length_keeps_every_row_and_cuts_the_padding():
    from mergekit_fisher.estimator.sources import GROUP_WINDOW, group_by_length

    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(10, 1000, (1000,), generator=generator).tolist()
    positions = torch.randperm(1000, generator=generator)
    indices = torch.arange(1000)
    batch = 4
    grouped, grouped_indices = group_by_length(positions, indices, sizes, batch)
    # the same (row, selection index) pairs, each once
    assert sorted(zip(grouped.tolist(), grouped_indices.tolist())) == sorted(
        zip(positions.tolist(), indices.tolist())
    )
    window = batch * GROUP_WINDOW  # rows never leave their window; longest first inside it
    for start in range(0, 1000, window):
        inside = grouped[start : start + window].tolist()
        assert set(inside) == set(positions[start : start + window].tolist())
        assert [sizes[p] for p in inside] == sorted((sizes[p] for p in inside), reverse=True)

    def padding(order):
        rows = [sizes[p] for p in order.tolist()]
        return sum(
            max(rows[i : i + batch]) * len(rows[i : i + batch]) - sum(rows[i : i + batch])
            for i in range(0, len(rows), batch)
        )

    assert padding(grouped) < 0.1 * padding(positions)


def test_grouped_batches_give_the_same_fisher(world, tmp_path):
    rows = [{"text": " ".join(tiny.CORPUS[: 1 + i % 4])} for i in range(12)]  # 1-4 sentences
    data = tiny.write_jsonl(str(tmp_path / "varied.jsonl"), rows)
    common = dict(fisher_type="sampled", samples=2, seed=3, shuffle=True, batch_size=3)
    grouped = compute(world["model"], str(tmp_path / "g"), data, **common)
    plain = compute(world["model"], str(tmp_path / "p"), data, group_by_length=False, **common)
    for name in plain:  # the same examples and sampled labels, other batches: float rounding
        torch.testing.assert_close(grouped[name], plain[name], rtol=1e-5, atol=1e-12)
    assert open_fisher(str(tmp_path / "g")).config.num_examples == len(rows)
