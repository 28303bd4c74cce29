"""Recipes parse and name known methods/parameters; the start-up hook and the CLIs work as
installed."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml
from merge_world import World, write_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "mergekit_fisher", "recipes", "*.yml")))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_there_are_recipes_for_every_documented_case():
    names = {os.path.basename(p) for p in RECIPES}
    assert {
        "fisher_two_finetunes.yml",
        "fisher_ties.yml",
        "fisher_dare_ties.yml",
        "fisher_lora_adapters.yml",
        "fisher_robust_finetuning.yml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_recipe_loads(path):
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration

    from mergekit_fisher.merge.parameters import check_shared

    with open(path, encoding="utf-8") as fp:
        config = MergeConfiguration.model_validate(yaml.safe_load(fp))
    method = merge_methods.get(config.merge_method)
    known = {p.name for p in method.spec.parameters}
    shared = {p.name: p.default for p in method.spec.shared_parameters}
    shared.update(config.parameters or {})
    assert set(config.parameters or {}) <= known
    check_shared(shared, where=path)
    for model in config.models:
        params = model.parameters or {}
        assert set(params) <= known, (path, set(params) - known)
        is_base = config.base_model is not None and model.model == config.base_model
        if not is_base:
            assert params.get("fisher"), f"{path}: {model.model} has no fisher"
    if "lora" in path:
        assert all(m.model.lora is not None for m in config.models)


def _python(code: str, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**ENV, **env},
        timeout=300,
    )


def test_hook_imports_nothing_heavy_at_startup():
    result = _python(
        "import sys; print(sorted(m for m in ('torch', 'mergekit', 'click') if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_hook_registers_methods_when_mergekit_is_imported():
    result = _python(
        "from mergekit import merge_methods; import mergekit.plan as plan; "
        "print(merge_methods.get('fisher').spec.pretty_name, plan.ExecuteMergeMethodTask.__name__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Fisher-Weighted Averaging fisher_aware_merge_task"


def test_hook_can_be_turned_off():
    result = _python(
        "from mergekit import merge_methods; merge_methods.get('fisher')",
        MERGEKIT_FISHER_NO_HOOK="1",
    )
    assert result.returncode != 0
    assert "Unimplemented merge method fisher" in result.stderr


def _merge_spying_on_the_planner(recipe: dict, out: str, monkeypatch):
    """Run mergekit's own `run_merge` with two spies: on the task constructor its planner calls for
    each output tensor (`mergekit.plan.ExecuteMergeMethodTask`, our hook once registered) and on
    `MergePlanner._plan` (which `explain` calls to plan without executing). Returns (calls,
    planned): [(constructor kwargs, task built)] and the planner's `_tensors` after `_plan()`."""
    from mergekit import plan
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_fisher.merge.registry import ensure_registered

    ensure_registered()
    calls, planned = [], []
    constructor, plan_method = plan.ExecuteMergeMethodTask, plan.MergePlanner._plan

    def spy_constructor(**kwargs):
        task = constructor(**kwargs)
        calls.append((kwargs, task))
        return task

    def spy_plan(self, *args, **kwargs):
        result = plan_method(self, *args, **kwargs)
        planned.extend(self._tensors)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(plan, "ExecuteMergeMethodTask", spy_constructor)
        patch.setattr(plan.MergePlanner, "_plan", spy_plan)
        run_merge(
            MergeConfiguration.model_validate(recipe),
            out,
            MergeOptions(quiet=True, write_model_card=False),
        )
    return calls, planned


def test_planner_builds_each_merge_task_through_the_hook_with_what_it_needs(
    world, tmp_path, monkeypatch
):
    """What the planner hook relies on in mergekit, observed in a real merge: the planner builds one
    merge task per output tensor through `mergekit.plan.ExecuteMergeMethodTask` (which the hook
    replaces), by keyword, with the method, each input's tensor (`gather_tensors.weight_info`), the
    model order, the base, the shared and per-input parameters and the output weight; Fisher methods
    get a task with one more graph dependency than mergekit's own, other methods mergekit's own
    task; and `_plan()` leaves (WeightInfo, task) pairs in `_tensors` -- the very tasks built -- for
    `explain`."""
    import tiny
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    names = set(tiny.state_dict_from_dir(world.base))
    weights = dict(zip(world.models, [0.3, 0.7]))
    recipe = world.recipe(
        "fisher_ties",
        weights=list(weights.values()),
        base=world.base,
        shared={"density": 0.5, "fisher_normalize": "l2"},
    )
    calls, planned = _merge_spying_on_the_planner(recipe, str(tmp_path / "fisher"), monkeypatch)
    assert glob.glob(str(tmp_path / "fisher" / "*.safetensors"))  # the merge ran to the end
    assert sorted(kwargs["output_weight"].name for kwargs, _task in calls) == sorted(names)
    everyone = {world.base, *world.models}
    for kwargs, task in calls:
        name = kwargs["output_weight"].name
        assert kwargs["method_name"] == "fisher_ties"
        assert str(kwargs["base_model"].model.path) == world.base
        assert {str(m.model.path) for m in kwargs["model_order"]} == everyone
        gathered = {
            str(m.model.path): info.name for m, info in kwargs["gather_tensors"].weight_info.items()
        }
        assert gathered == {path: name for path in everyone}
        assert kwargs["parameters"]["fisher_normalize"] == "l2"
        per_input = {str(m.model.path): dict(p) for m, p in kwargs["input_parameters"].items()}
        for model, fisher in zip(world.models, world.fishers):
            assert (
                per_input[model]["weight"] == weights[model]
                and per_input[model]["fisher"] == fisher
            )
        assert isinstance(task, ExecuteMergeMethodTask) and type(task) is not ExecuteMergeMethodTask
    assert sorted((info.name, id(task)) for info, task in planned) == sorted(
        (kwargs["output_weight"].name, id(task)) for kwargs, task in calls
    )

    plain, _ = _merge_spying_on_the_planner(
        world.recipe(
            "ties",
            weights=list(weights.values()),
            base=world.base,
            fishers=False,
            shared={"density": 0.5},
        ),
        str(tmp_path / "ties"),
        monkeypatch,
    )
    assert len(plain) == len(names) and all(
        type(task) is ExecuteMergeMethodTask for _kwargs, task in plain
    )
    mergekit_dependencies = set(plain[0][1].arguments())
    assert all(set(task.arguments()) > mergekit_dependencies for _kwargs, task in calls)


def test_kernel_without_a_fisher_tensor_fails_loudly():
    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_fisher.errors import FisherInputError
    from mergekit_fisher.merge.registry import register

    register()
    group = TensorGroup.from_tensors([torch.ones(2), torch.zeros(2)], name="x")
    # a path reaching the kernel: a recipe merge that bypassed the planner hook
    with pytest.raises(FisherInputError, match="got no Fisher tensor for input 0 of x"):
        merge_methods.get("fisher")((group,), parameters={"fisher": "/some/path"})
    # some inputs with a Fisher, one without
    with pytest.raises(FisherInputError, match="got no Fisher tensor for input 1 of x"):
        merge_methods.get("fisher")((group,), parameters={"fisher": {0: torch.ones(2), 1: None}})


def test_direct_call_without_any_fisher_is_the_namesake_method(caplog):
    """mergekit's state-dict API runs every registered method with its generic parameters only."""
    import torch
    from mergekit.merge_methods import merge_state_dicts

    from mergekit_fisher.merge.registry import register

    register()
    generator = torch.Generator().manual_seed(0)
    models = [{"w": torch.randn(4, 6, generator=generator)} for _ in range(3)]
    for ours, theirs, base in (("fisher", "linear", None), ("fisher_ties", "ties", 0)):
        kwargs = {
            "base": base,
            "parameters": {"weight": [0.2, 0.3, 0.5][: 3 if base is None else 2]},
        }
        if base is not None:
            kwargs["parameters"]["density"] = 0.7
        with caplog.at_level("WARNING"):
            got = merge_state_dicts(models, ours, **kwargs)["w"]
        expected = merge_state_dicts(models, theirs, **kwargs)["w"]
        torch.testing.assert_close(got, expected)
    assert "uniform Fisher" in caplog.text


def test_fisher_tensors_reach_the_kernel_as_its_fisher_parameter():
    """The kernel's only Fisher input is its declared per-input `fisher` parameter."""
    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_fisher.merge.registry import register

    register()
    a, b = torch.tensor([0.0, 10.0]), torch.tensor([4.0, 20.0])
    group = TensorGroup.from_tensors([a, b], name="x")
    parameters = {
        "fisher": [torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])],
        "weight": [1.0, 2.0],
    }
    (merged,) = merge_methods.get("fisher")((group,), parameters=parameters)
    # (1·3·0 + 2·1·4) / (3 + 2) = 1.6 ; (1·10 + 2·20) / 3
    torch.testing.assert_close(merged, torch.tensor([1.6, 50.0 / 3.0]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("cli")), n_models=2)


def test_stock_mergekit_yaml_subprocess_and_model_card(world, tmp_path):
    recipe = write_recipe(
        world.recipe("fisher_ties", base=world.base, shared={"density": 0.5}),
        str(tmp_path / "r.yml"),
    )
    out = str(tmp_path / "out")
    result = subprocess.run(
        [os.path.join(BIN, "mergekit-yaml"), recipe, out, "--quiet"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with open(os.path.join(out, "README.md"), encoding="utf-8") as fp:
        card = fp.read()
    assert "Fisher-weighted TIES" in card and "arxiv.org/abs/2306.01708" in card
    assert glob.glob(os.path.join(out, "*.safetensors"))


def test_mergekit_fisher_merge_works_without_the_pth_hook(world, tmp_path):
    import tiny
    from test_merge_methods import brute_force_fisher

    recipe = write_recipe(world.recipe("fisher"), str(tmp_path / "r.yml"))
    out = str(tmp_path / "out")
    env = {"MERGEKIT_FISHER_NO_HOOK": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergekit_fisher",
            "merge",
            recipe,
            out,
            "--quiet",
            "--no-write-model-card",
        ],
        capture_output=True,
        text=True,
        env={**ENV, **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    merged = tiny.state_dict_from_dir(out)
    expected = brute_force_fisher(world, world.models, [1.0, 1.0], "mean", 1e-6)
    for name in expected:
        assert float((merged[name].double() - expected[name]).abs().max()) < 1e-5, name


def test_mergekit_pytorch_refuses_fisher_methods_with_a_clear_message(world, tmp_path):
    from click.testing import CliRunner
    from mergekit.scripts.merge_raw_pytorch import main as mergekit_pytorch

    recipe = {
        "merge_method": "fisher",
        "models": [
            {"model": os.path.join(m, "model.safetensors"), "parameters": {"fisher": f}}
            for m, f in zip(world.models, world.fishers)
        ],
    }
    path = write_recipe(recipe, str(tmp_path / "r.yml"))
    result = CliRunner().invoke(mergekit_pytorch, [path, str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and "mergekit-yaml" in result.output
    assert not glob.glob(str(tmp_path / "out" / "*.safetensors"))
