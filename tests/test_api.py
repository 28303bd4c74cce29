"""The documented Python API: `compute_fisher`, `open_fisher`, `register` from the package root."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import tiny
import torch
from estimator_helpers import assert_fisher_close, lm_reference_examples
from merge_world import World, write_recipe
from transformers import AutoTokenizer, LlamaForCausalLM

import mergekit_fisher as mf

ROWS = [{"text": tiny.CORPUS[0]}, {"text": tiny.CORPUS[2]}, {"text": "short"}]


def test_compute_fisher_then_open_fisher_equals_brute_force(tmp_path, tokenizer_dir):
    model_dir = str(tmp_path / "lm")
    tiny.make_llama(model_dir, seed=5, tokenizer_dir=tokenizer_dir)
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), ROWS)
    config = mf.compute_fisher(
        model_dir,
        str(tmp_path / "f"),
        data,
        fisher_type="empirical",
        batch_size=2,
        dtype="float64",
        accumulator_dtype="float64",
        progress=False,
        shuffle=False,
    )
    assert config.num_examples == len(ROWS)
    fisher = mf.open_fisher(str(tmp_path / "f"))
    got = {name: fisher.get_tensor(name) for name in fisher.names()}
    reference = tiny.brute_force_fisher(
        LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float64),
        lm_reference_examples(AutoTokenizer.from_pretrained(tokenizer_dir), ROWS),
    )
    assert_fisher_close(got, reference)


def test_register_makes_run_merge_work_with_the_hook_off(tmp_path):
    world = World(str(tmp_path / "world"), n_models=2)
    recipe = write_recipe(world.recipe("fisher"), str(tmp_path / "r.yml"))
    script = textwrap.dedent(f"""
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.merge_methods import registered_methods
        from mergekit.options import MergeOptions
        import mergekit_fisher
        assert "fisher" not in {{m.spec.name for m in registered_methods()}}  # the hook is off
        mergekit_fisher.register()
        with open({recipe!r}) as fp:
            config = MergeConfiguration.model_validate(yaml.safe_load(fp))
        run_merge(
            config, {str(tmp_path / "out")!r}, MergeOptions(quiet=True, write_model_card=False)
        )
    """)
    env = {**os.environ, "MERGEKIT_FISHER_NO_HOOK": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    merged = tiny.state_dict_from_dir(str(tmp_path / "out"))
    name = "model.layers.0.mlp.up_proj.weight"
    f0, f1 = (world.fisher_values[m][name].double() for m in world.models)
    m0 = torch.cat(
        [v.double().flatten() for v in world.fisher_values[world.models[0]].values()]
    ).mean()
    m1 = torch.cat(
        [v.double().flatten() for v in world.fisher_values[world.models[1]].values()]
    ).mean()
    w0, w1 = f0 / m0 + 1e-6, f1 / m1 + 1e-6  # mean normalization, default floor
    t0, t1 = (world.states[m][name].double() for m in world.models)
    torch.testing.assert_close(
        merged[name].double(), (w0 * t0 + w1 * t1) / (w0 + w1), rtol=2e-5, atol=1e-6
    )
