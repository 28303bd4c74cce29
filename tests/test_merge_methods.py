"""The Fisher merge methods against independent references: a float64 brute force of the formula,
and mergekit's own methods (linear, ties, dare_ties, ...) where the two must coincide."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from merge_world import World, run_recipe

from mergekit_fisher.merge.registry import TASK_ARITHMETIC_NAMESAKES


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("world")))


def normalized_reference(values: dict, mode: str) -> dict:
    """Independent float64 normalization of one model's whole Fisher file."""
    flat = torch.cat([v.double().flatten() for v in values.values()])
    out = {}
    for name, value in values.items():
        value = value.double()
        if mode == "mean":
            out[name] = value / flat.mean()
        elif mode == "l2":
            out[name] = value / flat.square().sum().sqrt()
        elif mode == "tensor":
            out[name] = value / value.mean()
        else:
            out[name] = value
    return out


def floored_reference(values: dict, mode: str, floor: float) -> dict:
    """normalize(F) + floor, the floor relative to the model's mean Fisher in normalized units
    (the tensor's own mean under `tensor` normalization, where it is 1 after normalizing)."""
    normalized = normalized_reference(values, mode)
    flat = torch.cat([v.double().flatten() for v in values.values()])
    level = {
        "mean": 1.0,
        "l2": flat.mean() / flat.square().sum().sqrt(),
        "tensor": 1.0,
        "none": flat.mean(),
    }
    return {name: value + floor * level[mode] for name, value in normalized.items()}


def brute_force_fisher(world: World, models, weights, mode: str, floor: float) -> dict:
    floored = {m: floored_reference(world.fisher_values[m], mode, floor) for m in models}
    result = {}
    for name in world.states[models[0]]:
        numerator = 0
        denominator = 0
        for model, weight in zip(models, weights):
            coefficient = weight * floored[model][name]
            numerator = numerator + coefficient * world.states[model][name].double()
            denominator = denominator + coefficient
        result[name] = numerator / denominator
    return result


def assert_state_close(actual: dict, expected: dict, rtol=2e-5, atol=1e-6):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(
            actual[name].double(), expected[name].double(), rtol=rtol, atol=atol, msg=name
        )


@pytest.mark.parametrize("mode", ["mean", "l2", "tensor", "none"])
def test_fisher_matches_brute_force_formula(world, tmp_path, mode):
    weights = [0.5, 1.0, 2.0]
    floor = 1e-3  # relative to each model's mean Fisher: the same meaning under every normalization
    recipe = world.recipe(
        "fisher", weights=weights, shared={"fisher_normalize": mode, "fisher_floor": floor}
    )
    merged = run_recipe(recipe, str(tmp_path / "out"))
    expected = brute_force_fisher(world, world.models, weights, mode, floor)
    assert_state_close(merged, expected)
    # and the merge is not just the plain average: Fisher weighting moved the result
    plain = {
        k: sum(w * world.states[m][k] for m, w in zip(world.models, weights)) / sum(weights)
        for k in expected
    }
    moved = max(float((merged[k] - plain[k]).abs().max()) for k in expected)
    assert moved > 1e-3


def test_default_is_mean_normalization_with_floor(world, tmp_path):
    merged = run_recipe(world.recipe("fisher"), str(tmp_path / "out"))
    expected = brute_force_fisher(world, world.models, [1.0, 1.0, 1.0], "mean", 1e-6)
    assert_state_close(merged, expected)


def test_identical_fishers_equal_mergekit_linear(world, tmp_path):
    same = [world.fishers[0]] * 3
    weights = [0.2, 0.3, 0.5]
    fisher = run_recipe(
        world.recipe("fisher", weights=weights, fishers=same), str(tmp_path / "fisher")
    )
    linear = run_recipe(
        world.recipe("linear", weights=weights, fishers=False), str(tmp_path / "linear")
    )
    assert_state_close(fisher, linear, rtol=1e-5, atol=1e-7)


def test_all_zero_fisher_gives_plain_weighted_average(world, tmp_path):
    from mergekit_fisher.fisher_file import write_fisher

    zeros = []
    for index, model in enumerate(world.models):
        path = str(tmp_path / f"zero{index}")
        write_fisher({k: torch.zeros_like(v) for k, v in world.states[model].items()}, path)
        zeros.append(path)
    weights = [1.0, 2.0, 3.0]
    for floor in (0.0, 1e-6):
        merged = run_recipe(
            world.recipe("fisher", weights=weights, fishers=zeros, shared={"fisher_floor": floor}),
            str(tmp_path / f"out{floor}"),
        )
        linear = run_recipe(
            world.recipe("linear", weights=weights, fishers=False), str(tmp_path / f"lin{floor}")
        )
        assert_state_close(merged, linear, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("namesake", TASK_ARITHMETIC_NAMESAKES)
def test_fisher_x_with_identical_fishers_equals_mergekit_x(world, tmp_path, namesake):
    same = [world.fishers[1]] * 3
    shared = {"density": 0.6}
    per_model = {}
    if "breadcrumbs" in namesake:
        per_model["gamma"] = 0.05
    if "della" in namesake:
        per_model["epsilon"] = 0.1
    kwargs = dict(weights=[0.7, 0.5, 0.3], base=world.base, shared=shared, per_model=per_model)
    ours = run_recipe(
        world.recipe(f"fisher_{namesake}", fishers=same, **kwargs),
        str(tmp_path / "ours"),
        random_seed=7,
    )
    theirs = run_recipe(
        world.recipe(namesake, fishers=False, **kwargs), str(tmp_path / "theirs"), random_seed=7
    )
    assert_state_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # not trivially equal to the base
    assert any(float((ours[k] - world.states[world.base][k]).abs().max()) > 1e-4 for k in ours)


def test_fisher_task_arithmetic_normalized_equals_fisher(world, tmp_path):
    weights = [1.0, 0.5, 2.0]
    shared = {"normalize": True, "density": 1.0, "fisher_floor": 1e-4}
    delta = run_recipe(
        world.recipe("fisher_task_arithmetic", weights=weights, base=world.base, shared=shared),
        str(tmp_path / "ta"),
    )
    plain = run_recipe(
        world.recipe("fisher", weights=weights, shared={"fisher_floor": 1e-4}),
        str(tmp_path / "fisher"),
    )
    assert_state_close(delta, plain, rtol=1e-4, atol=1e-6)


def test_fisher_ties_against_hand_computation(world, tmp_path):
    """density 1 (no pruning), so TIES reduces to sign election + Fisher-weighted mean of agreeing
    deltas."""
    weights = [1.0, 1.0, 1.0]
    floor = 1e-6
    merged = run_recipe(
        world.recipe(
            "fisher_ties",
            weights=weights,
            base=world.base,
            shared={"density": 1.0, "fisher_floor": floor},
        ),
        str(tmp_path / "ties"),
    )
    normalized = {m: normalized_reference(world.fisher_values[m], "mean") for m in world.models}
    base = world.states[world.base]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"):
        fishers = torch.stack([normalized[m][name] + floor for m in world.models])
        rel = fishers / fishers.mean(0)
        deltas = torch.stack(
            [world.states[m][name].double() - base[name].double() for m in world.models]
        )
        weighted = deltas * rel
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = (deltas.sign() == elected).double()
        divisor = (rel * agree).sum(0)
        divisor[divisor == 0] = 1
        expected = base[name].double() + (weighted * agree).sum(0) / divisor
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_base_listed_as_input_of_fisher_needs_and_uses_its_fisher(world, tmp_path):
    models = [world.base, world.models[0]]
    fishers = [world.base_fisher, world.fishers[0]]
    merged = run_recipe(
        world.recipe("fisher", models=models, fishers=fishers, base=world.base), str(tmp_path / "o")
    )
    expected = brute_force_fisher(world, models, [1.0, 1.0], "mean", 1e-6)
    assert_state_close(merged, expected)


def _pickled_copies(world: World, root) -> list:
    """The fine-tunes re-saved as pickled `pytorch_model.bin` checkpoints, no safetensors (fresh
    paths: mergekit caches a loader per model path for the whole process)."""
    copies = []
    for model in world.models:
        target = os.path.join(str(root), os.path.basename(model))
        shutil.copytree(model, target, ignore=shutil.ignore_patterns("*.safetensors"))
        torch.save(world.states[model], os.path.join(target, "pytorch_model.bin"))
        copies.append(target)
    return copies


@pytest.mark.parametrize("lazy", [True, False])
def test_pickled_checkpoints_with_and_without_lazy_unpickle(world, tmp_path, monkeypatch, lazy):
    """`lazy_unpickle` reaches mergekit's loader (its lazy pickle loader serves every model tensor,
    the plain torch.load one none, and the other way round without it), and the Fisher merge of
    pickled checkpoints equals the float64 brute force of the safetensors originals."""
    from mergekit.io import loader

    served = {"LazyPickleLoader": 0, "DumbPytorchLoader": 0}
    for name in served:
        cls = getattr(loader, name)

        def counting(self, key, _original=cls.get_tensor, _name=name):
            served[_name] += 1
            return _original(self, key)

        monkeypatch.setattr(cls, "get_tensor", counting)
    copies = _pickled_copies(world, tmp_path / "bin")
    merged = run_recipe(
        world.recipe("fisher", models=copies), str(tmp_path / "out"), lazy_unpickle=lazy
    )
    used, unused = ("LazyPickleLoader", "DumbPytorchLoader")[:: 1 if lazy else -1]
    assert (
        served[used] >= len(copies) * len(world.states[world.models[0]]) and served[unused] == 0
    ), served
    assert_state_close(
        merged, brute_force_fisher(world, world.models, [1.0, 1.0, 1.0], "mean", 1e-6)
    )


def test_sharded_output_equals_brute_force(world, tmp_path):
    """A small `out_shard_size` splits the merged model over several safetensors shards plus an
    index."""
    out = tmp_path / "out"
    merged = run_recipe(world.recipe("fisher"), str(out), out_shard_size=20_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1, shards
    assert (out / "model.safetensors.index.json").exists()
    assert_state_close(
        merged, brute_force_fisher(world, world.models, [1.0, 1.0, 1.0], "mean", 1e-6)
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="merging on the math device --cuda needs a CUDA GPU"
)
@pytest.mark.parametrize(
    "options",
    [{"cuda": True}, {"cuda": True, "low_cpu_memory": True, "read_to_gpu": True}],
    ids=["cuda", "cuda-low-cpu-memory-read-to-gpu"],
)
def test_cuda_math_device_equals_brute_force(world, tmp_path, options):
    """With --cuda mergekit's executor moves model and Fisher tensors to the GPU: same merge."""
    torch.cuda.reset_peak_memory_stats()
    merged = run_recipe(world.recipe("fisher"), str(tmp_path / "out"), **options)
    assert torch.cuda.max_memory_allocated() > 0  # the merge did run on the GPU
    assert_state_close(
        merged, brute_force_fisher(world, world.models, [1.0, 1.0, 1.0], "mean", 1e-6)
    )
