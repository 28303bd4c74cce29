"""Recipes parse and name known methods/parameters; the start-up hook and the CLIs work as installed."""

from __future__ import annotations

import glob
import inspect
import os
import subprocess
import sys

import pytest
import yaml

from merge_world import World, write_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yml")))
BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_there_are_recipes_for_every_documented_case():
    names = {os.path.basename(p) for p in RECIPES}
    assert {
        "fisher_two_finetunes.yml", "fisher_ties.yml", "fisher_dare_ties.yml",
        "fisher_lora_adapters.yml", "fisher_robust_finetuning.yml",
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
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, **env}, timeout=300)


def test_hook_imports_nothing_heavy_at_startup():
    result = _python("import sys; print(sorted(m for m in ('torch', 'mergekit', 'click') if m in sys.modules))")
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
    result = _python("from mergekit import merge_methods; merge_methods.get('fisher')", MERGEKIT_FISHER_NO_HOOK="1")
    assert result.returncode != 0
    assert "Unimplemented merge method fisher" in result.stderr


def test_planner_internals_we_rely_on_are_still_there():
    """Fails loudly if a mergekit release changes what the planner hook depends on."""
    from mergekit import plan
    from mergekit.io.tasks import GatherTensors
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.tokenizer import PermutedVocabulary
    from mergekit.tokenizer.truncate import TruncatedVocabulary

    from mergekit_fisher.merge.registry import ensure_registered

    ensure_registered()
    source = inspect.getsource(plan.MergePlanner.plan_tensor)
    assert "ExecuteMergeMethodTask(" in source
    for keyword in ("method_name=", "gather_tensors=", "model_order=", "parameters=", "input_parameters=",
                    "base_model=", "output_weight="):
        assert keyword in source, keyword
    assert {"gather_tensors", "model_order", "base_model", "output_weight", "parameters", "input_parameters"} <= set(
        ExecuteMergeMethodTask.model_fields
    )
    assert "weight_info" in GatherTensors.model_fields
    assert {"gather_tensors", "tokenizer_task", "tokens", "pad_to_multiple_of", "vocabulary_axis"} <= set(
        PermutedVocabulary.model_fields
    )
    assert "gather_tensors" in TruncatedVocabulary.model_fields
    assert plan.ExecuteMergeMethodTask.__name__ == "fisher_aware_merge_task"
    # explain plans without executing: MergePlanner._plan() fills _tensors with (WeightInfo, task)
    assert "self._tensors.append((weight, tensor_task))" in inspect.getsource(plan.MergePlanner)
    assert callable(plan.MergePlanner._plan)


def test_kernel_without_a_fisher_tensor_fails_loudly():
    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_fisher.errors import FisherInputError
    from mergekit_fisher.merge.registry import register

    register()
    group = TensorGroup.from_tensors([torch.ones(2), torch.zeros(2)], name="x")
    with pytest.raises(FisherInputError, match="got no Fisher tensor for input 0 of x"):
        merge_methods.get("fisher")((group,))
    with pytest.raises(FisherInputError, match="got no Fisher tensor"):
        merge_methods.get("fisher")((group,), parameters={"fisher": "/some/path"})


def test_fisher_tensors_reach_the_kernel_as_its_fisher_parameter():
    """The kernel's only Fisher input is its declared per-input `fisher` parameter."""
    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    from mergekit_fisher.merge.registry import register

    register()
    a, b = torch.tensor([0.0, 10.0]), torch.tensor([4.0, 20.0])
    group = TensorGroup.from_tensors([a, b], name="x")
    parameters = {"fisher": [torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])], "weight": [1.0, 2.0]}
    (merged,) = merge_methods.get("fisher")((group,), parameters=parameters)
    # (1·3·0 + 2·1·4) / (3 + 2) = 1.6 ; (1·10 + 2·20) / 3
    torch.testing.assert_close(merged, torch.tensor([1.6, 50.0 / 3.0]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("cli")), n_models=2)


def test_stock_mergekit_yaml_subprocess_and_model_card(world, tmp_path):
    recipe = write_recipe(world.recipe("fisher_ties", base=world.base, shared={"density": 0.5}), str(tmp_path / "r.yml"))
    out = str(tmp_path / "out")
    result = subprocess.run(
        [os.path.join(BIN, "mergekit-yaml"), recipe, out, "--quiet"], capture_output=True, text=True, env=ENV,
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
        [sys.executable, "-m", "mergekit_fisher", "merge", recipe, out, "--quiet", "--no-write-model-card"],
        capture_output=True, text=True, env={**ENV, **env}, timeout=300,
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
