"""Registration: the one visible place where mergekit-fisher plugs into mergekit.

Two hooks, both idempotent:

* `register_methods()` adds `fisher` and `fisher_<X>` for each member X of mergekit's generalized
  task arithmetic family to mergekit's method registry;
* `patch_planner()` makes mergekit's planner build `FisherMergeTask`s for those methods (see
  `planning.fisher_aware_merge_task`): the only way to learn each *input's* tensor name.

The `.pth` start-up hook calls them as soon as mergekit imports its registry / planner, so the stock
`mergekit-yaml` knows the methods; `ensure_registered()` does both for our own entry points.
"""

from __future__ import annotations

import importlib
from typing import List

# mergekit's generalized task arithmetic methods that get a Fisher-weighted twin `fisher_<name>`
TASK_ARITHMETIC_NAMESAKES = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)


def fisher_methods() -> List[object]:
    from mergekit_fisher.merge.methods import FisherMerge, FisherTaskArithmeticMerge

    registry = importlib.import_module("mergekit.merge_methods.registry")
    methods = [FisherMerge()]
    for name in TASK_ARITHMETIC_NAMESAKES:
        methods.append(FisherTaskArithmeticMerge.of(registry.get(name)))
    return methods


def register_methods() -> None:
    registry = importlib.import_module("mergekit.merge_methods.registry")
    known = {method.spec.name for method in registry.registered_methods()}
    for method in fisher_methods():
        if method.spec.name not in known:
            registry.register(method)


def _patch_module(module_name: str) -> None:
    module = importlib.import_module(module_name)
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    from mergekit_fisher.merge.planning import fisher_aware_merge_task

    current = getattr(module, "ExecuteMergeMethodTask", None)
    if current is fisher_aware_merge_task:
        return
    if current is not ExecuteMergeMethodTask:
        raise RuntimeError(
            f"{module_name} no longer builds merge tasks with ExecuteMergeMethodTask; "
            "this mergekit-fisher supports mergekit>=0.1.5,<0.2"
        )
    module.ExecuteMergeMethodTask = fisher_aware_merge_task


def patch_planner() -> None:
    """Route mergekit's planner through `fisher_aware_merge_task`."""
    _patch_module("mergekit.plan")


def patch_raw_pytorch() -> None:
    """mergekit-pytorch builds its own tasks: routed too, so Fisher methods fail there with a clear message."""
    _patch_module("mergekit.scripts.merge_raw_pytorch")


def ensure_registered() -> None:
    register_methods()
    patch_planner()
