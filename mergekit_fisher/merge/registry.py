"""Registration: the one visible place where mergekit-fisher plugs into mergekit.

Three hooks, all idempotent, all run by the `.pth` start-up hook right after mergekit imports the
module they need (so the stock `mergekit-yaml` knows the methods), and by `register()` for our
own entry points and for Python users:

* `register_methods()` adds `fisher`, `regmean` and `fisher_<X>` for each member X of mergekit's
  generalized task arithmetic family to mergekit's method registry. It runs once
  `mergekit.merge_methods` has finished importing, and imports only `methods` and `regmean` (whose
  own imports are the already-loaded `mergekit.merge_methods` and `mergekit.sparsify`), so it is
  safe in the middle of any import.
* `patch_planner()` makes `mergekit.plan` build `FisherMergeTask`s for those methods (the only
  place that knows each *input's* tensor name) and resolve their parameters strictly. It runs once
  `mergekit.plan` has finished importing and imports `tasks`, whose mergekit dependencies
  `mergekit.plan` has loaded by then.
* `patch_merge_entry()` checks Fisher recipes before `run_merge` loads any model
  (`preflight.check_recipe`) and adds a Fisher section to the merged model's card
  (`card.with_fisher_section`), once `mergekit.merge` has finished importing.

mergekit 0.1.5 has no plugin API for extra per-input graph dependencies of a merge method; a
`MergeMethod` hook such as `extra_arguments(weight_infos, parameters) -> Dict[str, Task]`, called by
the planner beside `GatherTensors`, would make `patch_planner` unnecessary.
"""

from __future__ import annotations

import importlib
from typing import List

from mergekit.merge_methods import registry as mergekit_registry
from mergekit.merge_methods.base import MergeMethod

from mergekit_fisher.merge.methods import FisherMerge, FisherTaskArithmeticMerge
from mergekit_fisher.merge.regmean import RegMeanMerge

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


def fisher_methods() -> List[MergeMethod]:
    methods: List[MergeMethod] = [FisherMerge(), RegMeanMerge()]
    for name in TASK_ARITHMETIC_NAMESAKES:
        methods.append(FisherTaskArithmeticMerge.of(mergekit_registry.get(name)))
    return methods


def register_methods() -> None:
    known = {method.spec.name for method in mergekit_registry.registered_methods()}
    for method in fisher_methods():
        if method.spec.name not in known:
            mergekit_registry.register(method)


def patch_planner(module_name: str = "mergekit.plan") -> None:
    """Route one of mergekit's planners through our task factory and strict parameter resolver.

    `tasks.fisher_aware_merge_task` replaces the `ExecuteMergeMethodTask` constructor (Fisher
    methods get their Fisher-loading graph argument; other methods are built unchanged), and
    `recipe.checked_resolve_parameters` replaces `resolve_parameters` (unknown or mistyped
    parameters of Fisher methods are errors; other methods resolve unchanged).
    """
    # Deferred: `tasks` imports mergekit's graph and tokenizer modules, which only a module that
    # plans merges has loaded; registering methods must not pull them in mid-import.
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.parameter_resolver import resolve_parameters

    from mergekit_fisher.merge.recipe import checked_resolve_parameters
    from mergekit_fisher.merge.tasks import fisher_aware_merge_task

    module = importlib.import_module(module_name)
    replacements = {
        "ExecuteMergeMethodTask": (ExecuteMergeMethodTask, fisher_aware_merge_task),
        "resolve_parameters": (resolve_parameters, checked_resolve_parameters),
    }
    for name, (original, ours) in replacements.items():
        current = getattr(module, name, None)
        if current is ours:
            continue
        if current is not original:
            raise RuntimeError(
                f"{module_name} no longer uses mergekit's {name}; "
                "this mergekit-fisher supports mergekit>=0.1.5,<0.2"
            )
        setattr(module, name, ours)


def patch_merge_entry() -> None:
    """Two wrappers in `mergekit.merge`, both for Fisher methods only.

    `preflight.check_recipe` in front of `run_merge`'s first step, `get_architecture_info`: recipe
    mistakes (missing model path, no base for a delta method, LoRA without a merge cache) fail
    before mergekit loads any model, in one `Error:` line. `card.with_fisher_section` around
    `generate_card`: the merged model's card cites the Fisher paper and lists the Fisher files.
    """
    from mergekit_fisher.merge.card import with_fisher_section
    from mergekit_fisher.merge.preflight import checked_architecture_info, removing_failed_output

    module = importlib.import_module("mergekit.merge")
    current = module.get_architecture_info
    if not getattr(current, "checks_fisher_recipes", False):
        module.get_architecture_info = checked_architecture_info(current)
    if not getattr(module.generate_card, "adds_fisher_section", False):
        module.generate_card = with_fisher_section(module.generate_card)
    if not getattr(module.run_merge, "removes_failed_output", False):
        module.run_merge = removing_failed_output(module.run_merge)


def register() -> None:
    """Make the Fisher methods known to mergekit in this process (idempotent).

    Call it before mergekit's `run_merge` where the `.pth` start-up hook is off
    (`MERGEKIT_FISHER_NO_HOOK=1`, `python -S`, embedded interpreters).
    """
    register_methods()
    patch_planner("mergekit.plan")
    patch_merge_entry()


ensure_registered = register  # the name our entry points and older scripts use


def patch_raw_pytorch() -> None:
    """mergekit-pytorch builds its own tasks: routed too, so Fisher methods fail there clearly."""
    patch_planner("mergekit.scripts.merge_raw_pytorch")
