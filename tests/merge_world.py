"""A tiny merging world for the merge-method tests: a base, three fine-tunes, and their Fisher
files.

Fisher values span many orders of magnitude (exp(3·N(0,1))) so that a wrong normalization, a wrong
input name or a wrong formula shows up as a large error, not a rounding difference.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import tiny
import torch
import yaml

from mergekit_fisher.fisher_file import FisherConfig, write_fisher


def wide_fisher(
    state: Dict[str, torch.Tensor], seed: int, spread: float = 3.0
) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.exp(
            torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * spread
        ).float()
        for name, tensor in state.items()
    }


class World:
    def __init__(self, root: str, *, n_models: int = 3, tie: bool = False, hidden: int = 32):
        self.root = root
        self.tokenizer = os.path.join(root, "tokenizer")
        tiny.make_tokenizer(self.tokenizer)
        self.base = os.path.join(root, "base")
        base_model = tiny.make_llama(
            self.base, seed=0, hidden=hidden, tie=tie, tokenizer_dir=self.tokenizer
        )
        self.models, self.fishers = [], []
        self.states, self.fisher_values = {}, {}
        self.states[self.base] = tiny.state_dict_from_dir(self.base)
        for index in range(n_models):
            path = os.path.join(root, f"model{index}")
            tiny.perturbed_copy(
                base_model, path, seed=100 + index, scale=0.05, tokenizer_dir=self.tokenizer
            )
            self.models.append(path)
            self.states[path] = tiny.state_dict_from_dir(path)
            fisher_path = os.path.join(root, f"fisher{index}")
            self.fisher_values[path] = wide_fisher(self.states[path], seed=200 + index)
            write_fisher(
                self.fisher_values[path], fisher_path, FisherConfig(model=path, num_examples=8)
            )
            self.fishers.append(fisher_path)
        # the base's own Fisher, for `fisher` recipes that list the base as an input
        self.base_fisher = os.path.join(root, "fisher_base")
        self.fisher_values[self.base] = wide_fisher(self.states[self.base], seed=299)
        write_fisher(self.fisher_values[self.base], self.base_fisher, FisherConfig(model=self.base))

    def recipe(
        self,
        method: str,
        *,
        weights=None,
        fishers=None,
        base: Optional[str] = None,
        shared=None,
        per_model=None,
        models=None,
        **top,
    ) -> dict:
        models = models or self.models
        weights = weights or [1.0] * len(models)
        fishers = fishers or self.fishers
        entries = []
        for index, (model, weight) in enumerate(zip(models, weights)):
            params = {"weight": weight}
            if fishers is not False and fishers[index] is not None:
                params["fisher"] = fishers[index]
            params.update((per_model or {}))
            entries.append({"model": model, "parameters": params})
        recipe = {"merge_method": method, "dtype": "float32", "models": entries}
        if base:
            recipe["base_model"] = base
        if shared:
            recipe["parameters"] = dict(shared)
        recipe.update(top)
        return recipe


def write_recipe(recipe: dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(recipe, fp, sort_keys=False)
    return path


def run_recipe(recipe: dict, out_dir: str, **options) -> Dict[str, torch.Tensor]:
    """Merge in-process through mergekit's own entry point (planner, executor, writer)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_fisher.merge.registry import ensure_registered

    ensure_registered()
    config = MergeConfiguration.model_validate(recipe)
    options.setdefault("quiet", True)
    options.setdefault("write_model_card", False)
    run_merge(config, out_dir, MergeOptions(**options))
    return tiny.state_dict_from_dir(out_dir)
