"""`mergekit-fisher explain RECIPE.yml`: a dry run that shows who owns which layer.

It plans the merge with mergekit's own planner -- so it validates the recipe and every Fisher file
through exactly the code path (and messages) the merge uses -- then, instead of merging, loads each
planned output tensor's Fishers (normalized as the recipe says) and reports, per layer and module
type, each model's share of the Fisher mass Σ wᵢF̃ᵢ (normalized, floored): the effective weight the
merge gives it there. It also reports the fraction of elements where the floor decides (every
model's normalized Fisher below the floor, so the merge there is close to the plain weighted
average).

Vocabulary rows are counted as stored in each model (before a tokenizer merge would permute them):
a permutation moves rows but hardly changes the masses.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import click
import torch
import transformers
from mergekit.graph import Task

from mergekit_fisher.cli import verbosity_options
from mergekit_fisher.merge.tasks import FisherMergeTask
from mergekit_fisher.tools.grouping import layer_and_module
from mergekit_fisher.tools.report import format_table, percent

log = logging.getLogger(__name__)


@dataclass
class GroupMass:
    """Fisher mass per model and floor statistics of one (module type, layer) group."""

    mass: Dict[str, float] = field(default_factory=dict)
    elements: int = 0
    floor_decides: int = 0
    none_kept: Optional[int] = None  # TIES/DARE family: elements where no model's delta is kept

    def shares(self, models: List[str]) -> List[float]:
        total = sum(self.mass.get(m, 0.0) for m in models)
        return [self.mass.get(m, 0.0) / total if total > 0 else float("nan") for m in models]


def _label_parts(model) -> list:
    parts = [os.path.normpath(str(model.model.path)).split(os.sep)]
    if model.lora is not None:
        parts.append(os.path.normpath(str(model.lora.path)).split(os.sep))
    return parts


def model_labels(models) -> Dict[object, str]:
    """Short, unique display labels: the last path component, more components only where two
    collide."""
    depth = 1
    while True:
        labels = {
            model: "+".join(
                "/".join(p for p in parts[-depth:] if p) for parts in _label_parts(model)
            )
            for model in models
        }
        longest = max((max(len(parts) for parts in _label_parts(m)) for m in models), default=0)
        if len(set(labels.values())) == len(labels) or depth >= longest:
            return labels
        depth += 1


def load_recipe(recipe_path: str):
    """The recipe as mergekit's `MergeConfiguration`, or one FisherInputError naming the file."""
    import yaml
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    from mergekit_fisher.errors import FisherInputError

    def refuse(problem: str) -> FisherInputError:
        return FisherInputError(
            problem,
            file=recipe_path,
            kind="recipe",
            fix="check the path and the YAML (mergekit's recipe format)",
        )

    try:
        with open(recipe_path, encoding="utf-8") as fp:
            document = yaml.safe_load(fp)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise refuse(f"not valid YAML{where} ({problem})") from None
    except UnicodeDecodeError as error:
        raise refuse(f"not UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:
        raise refuse(f"cannot read the recipe ({error.strerror or error})") from None
    if not isinstance(document, dict):
        kind = {
            type(None): "empty",
            str: "a string",
            list: "a list",
            int: "a number",
            float: "a number",
            bool: "a boolean",
        }.get(type(document), type(document).__name__)
        raise refuse(f"the recipe is {kind}, not a YAML mapping with `merge_method` and `models`")
    try:
        return MergeConfiguration.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "recipe"
        raise refuse(
            f"invalid recipe: {where}: {first.get('msg')} ({error.error_count()} error(s))"
        ) from None
    except (
        ValueError,
        RuntimeError,
    ) as error:  # mergekit's own checks ("Exactly one of 'models', ...")
        text = str(error).strip()
        raise refuse(
            f"invalid recipe: {text.splitlines()[0] if text else error.__class__.__name__}"
        ) from None


@contextmanager
def adapters_read_lazily(config, options):
    """`base+adapter` models served by `lazy_adapter.AdaptedLoader` for the duration (paths
    checked first, with the merge's messages); removed afterwards, so a later merge in the same
    process merges its adapters as mergekit does."""
    from mergekit.io.tasks import LoaderCache

    from mergekit_fisher.merge.preflight import check_paths
    from mergekit_fisher.tools.lazy_adapter import install_adapted_loaders

    adapted = [model for model in config.referenced_models() if model.lora is not None]
    for model in adapted:
        check_paths(model, options)
    cache = LoaderCache()
    cache.setup(options=options)
    before = set(cache.loaders)
    try:
        install_adapted_loaders(adapted)
        yield
    finally:
        for model in adapted:
            if model not in before:
                cache.loaders.pop(model, None)


def plan_recipe(config, options):
    """Plan (and so validate) a recipe exactly as `mergekit-yaml` would, without executing it."""
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config, get_architecture_info
    from mergekit.plan import MergePlanner

    from mergekit_fisher.merge.registry import ensure_registered

    ensure_registered()
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    for model in config.referenced_models():
        LoaderCache().get(model)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    # `_plan()` builds every tensor task (running our validation) without the writer/return
    # wrappers.
    planner._plan()
    return list(planner._tensors)


def sparsifies(method_name: str) -> bool:
    """Whether the method trims or drops deltas (the TIES / DARE / ... family)."""
    from mergekit.merge_methods import registry as mergekit_registry

    from mergekit_fisher.merge.methods import FisherTaskArithmeticMerge

    method = mergekit_registry.get(method_name)
    return isinstance(method, FisherTaskArithmeticMerge) and (
        method.namesake.sparsification_method is not None
        or method.namesake.consensus_method is not None
    )


def is_random(method_name: str) -> bool:
    """Whether the method's sparsification draws random numbers (DARE, DELLA)."""
    from mergekit.merge_methods import registry as mergekit_registry
    from mergekit.sparsify import SparsificationMethod

    method = getattr(mergekit_registry.get(method_name), "namesake", None)
    return method is not None and method.sparsification_method in (
        SparsificationMethod.random,
        SparsificationMethod.della_magprune,
    )


class ShareTask(Task[dict]):
    """One output tensor's Fisher masses, as its merge task would weigh them.

    For the TIES/DARE family it runs the merge task itself -- same inputs, same sparsification,
    same place in mergekit's schedule (the same group label), so the same random draws -- and
    counts each model's Fisher mass only where the merge keeps its delta.
    """

    merge_task: FisherMergeTask
    with_tensors: bool

    def arguments(self) -> Dict[str, Task]:
        arguments = {"fishers": self.merge_task.fisher_tensors}
        if self.with_tensors:
            arguments["tensors"] = self.merge_task.gather_tensors
        return arguments

    def group_label(self) -> Optional[str]:
        return self.merge_task.group_label()

    def priority(self) -> int:
        return self.merge_task.priority()

    def execute(self, fishers: dict, tensors: Optional[dict] = None) -> dict:
        from mergekit_fisher.merge.methods import KEPT_DELTAS_OBSERVER

        kept = None
        if tensors is not None:
            seen: list = []
            token = KEPT_DELTAS_OBSERVER.set(seen.append)
            try:
                self.merge_task.execute(tensors=tensors, fishers=fishers)
            finally:
                KEPT_DELTAS_OBSERVER.reset(token)
            if seen:
                task = self.merge_task
                order = [
                    m
                    for m in task.model_order
                    if m != task.base_model and tensors.get(m) is not None
                ]
                kept = dict(zip(order, seen[0]))
        return tensor_masses(self.merge_task, fishers, kept)


def tensor_masses(task, fishers: dict, kept: Optional[dict]) -> dict:
    """{"mass": {model: Σ w·F̃ (over kept elements)}, "elements", "floor_decides", "none_kept"}."""
    source = task.fisher_tensors
    source = getattr(source, "fisher_task", source)
    floor_levels = source.floor_levels()
    full_shape = next((tuple(f.shape) for f in fishers.values() if f.ndim), None)
    masses: Dict[object, float] = {}
    numel = None
    below_floor = None
    for model, fisher in fishers.items():
        weight = float(task.input_parameters[model].get("weight", 1.0))
        shape = full_shape or source.inputs[model].expected_shape or ()
        count = fisher.numel() if fisher.ndim else int(torch.tensor(shape).prod())
        numel = count if numel is None else numel
        values = fisher.double().expand(shape) if kept is not None else fisher.double()
        if kept is not None:
            values = values * kept[model] if model in kept else values.new_zeros(())
            total = float(values.sum())
        else:
            total = float(values.sum()) if fisher.ndim else float(fisher) * count
        masses[model] = weight * total
        # the loaded Fisher carries its floor: F + floor <= 2·floor where F is at or under it,
        # so there the floor (or the 0/0 fallback) decides
        below = fisher <= 2 * floor_levels[model]
        below_floor = below if below_floor is None else (below_floor & below)
    floor_count = (
        int(below_floor.sum()) if below_floor.ndim else (numel if bool(below_floor) else 0)
    )
    none_kept = None
    if kept is not None:
        any_kept = torch.stack([k.expand(full_shape or k.shape) for k in kept.values()]).any(0)
        none_kept = int((~any_kept).sum())
    return {"mass": masses, "elements": numel or 0, "floor": floor_count, "none_kept": none_kept}


def collect_masses(planned) -> tuple:
    """{(module, layer): GroupMass} in the plan's order, model labels in recipe order, and the
    method name. Runs through mergekit's own executor (its schedule, its RNG order)."""
    from mergekit.graph import Executor

    from mergekit_fisher.merge.gram_tasks import GramMergeTask

    share_tasks = []
    method = None
    gram_tasks = []
    for weight_info, task in planned:
        if isinstance(task, GramMergeTask):
            method = task.method_name
            gram_tasks.append((weight_info, task))
        elif isinstance(task, FisherMergeTask):
            method = task.method_name
            share_tasks.append(
                (weight_info, ShareTask(merge_task=task, with_tensors=sparsifies(method)))
            )
    results = {}
    if share_tasks:
        executor = Executor(targets=[task for _info, task in share_tasks])
        results = dict(executor.run(quiet=True))
    groups: Dict[tuple, GroupMass] = {}
    labels: List[object] = []
    for weight_info, task in share_tasks:
        result = results[task]
        if not result["mass"]:
            continue
        key = layer_and_module(weight_info.name)[::-1]
        group = groups.setdefault(key, GroupMass())
        for model, mass in result["mass"].items():
            if model not in labels:
                labels.append(model)
            group.mass[model] = group.mass.get(model, 0.0) + mass
        group.elements += result["elements"]
        group.floor_decides += result["floor"]
        if result["none_kept"] is not None:
            group.none_kept = (group.none_kept or 0) + result["none_kept"]
    for weight_info, task in gram_tasks:
        _add_gram_masses(groups, labels, weight_info.name, task)
    names = model_labels(labels)
    for group in groups.values():
        group.mass = {names[model]: mass for model, mass in group.mass.items()}
    return groups, [names[model] for model in labels], method


def _add_gram_masses(groups, labels: List, name: str, task) -> None:
    """regmean: each model's share of the layer's trace Σ wᵢ tr(Gᵢ) (mean Grams; α leaves the
    diagonal alone) -- how much of the layer's input energy the solve weighs from each model.
    Tensors without a Gram (averaged) are not counted."""
    grams = task.gram_tensors.execute()
    if not any(gram.numel() for gram in grams.values()):
        return
    layer, module = layer_and_module(name)
    group = groups.setdefault((module, layer), GroupMass())
    for model, gram in grams.items():
        if model not in labels:
            labels.append(model)
        weight = float(task.input_parameters[model].get("weight", 1.0))
        trace = float(gram.double().diagonal().sum())
        group.mass[model] = group.mass.get(model, 0.0) + weight * trace
    group.elements += next(gram.shape[0] for gram in grams.values()) ** 2


def explain_recipe(
    recipe_path: str,
    random_seed: Optional[int] = None,
    trust_remote_code: bool = False,
) -> tuple:
    """Validate and plan the recipe, then collect its masses; never writes anything."""
    from mergekit.options import MergeOptions

    config = load_recipe(recipe_path)
    if random_seed is not None:
        # where and how run_merge seeds, before anything else
        transformers.trainer_utils.set_seed(random_seed)
    options = MergeOptions(trust_remote_code=trust_remote_code, quiet=True)
    with adapters_read_lazily(config, options):
        planned = plan_recipe(config, options)
        groups, labels, method = collect_masses(planned)
    return config, groups, labels, method


def _fraction(count: Optional[int], total: int) -> Optional[float]:
    return None if count is None else (count / total if total else 0.0)


def build_explanation(recipe_path: str, random_seed: Optional[int] = None) -> dict:
    config, groups, labels, method = explain_recipe(recipe_path, random_seed)
    method = config.merge_method if method is None else method
    rows = []
    for (module, layer), group in groups.items():  # the plan's order: embeddings, blocks, head
        rows.append(
            {
                "layer": layer,
                "module": module,
                "shares": dict(zip(labels, group.shares(labels))),
                "floor_fraction": _fraction(group.floor_decides, group.elements),
                "none_kept_fraction": _fraction(group.none_kept, group.elements),
                "elements": group.elements,
            }
        )
    totals = GroupMass()
    for group in groups.values():
        for label, mass in group.mass.items():
            totals.mass[label] = totals.mass.get(label, 0.0) + mass
        totals.elements += group.elements
        totals.floor_decides += group.floor_decides
        if group.none_kept is not None:
            totals.none_kept = (totals.none_kept or 0) + group.none_kept
    kept = bool(groups) and sparsifies(method)
    return {
        "recipe": os.path.abspath(recipe_path),
        "merge_method": method,
        "share_of": "kept_fisher_mass" if kept else "fisher_mass",
        "random": bool(groups) and is_random(method),
        "random_seed": random_seed,
        "models": labels,
        "overall": {
            "shares": dict(zip(labels, totals.shares(labels))),
            "floor_fraction": _fraction(totals.floor_decides, totals.elements),
            "none_kept_fraction": _fraction(totals.none_kept, totals.elements),
            "elements": totals.elements,
        },
        "groups": rows,
    }


SHARE_MEANING = {
    "fisher_mass": (
        "share: each model's part of the Fisher mass Σ weight·(normalized Fisher + floor) -- the\n"
        "effective weight the merge gives it there."
    ),
    "kept_fisher_mass": (
        "share: each model's part of the Fisher mass Σ weight·(normalized Fisher + floor)\n"
        "over the elements where the merge keeps its delta (after the method's trimming or\n"
        "dropping and the sign election) -- what the merge actually uses. base kept: elements\n"
        "where no model's delta survives, so the merge there is the base."
    ),
}


def format_explanation(report: dict) -> str:
    labels = report["models"]
    lines = [f"recipe: {report['recipe']}", f"method: {report['merge_method']}", ""]
    if not labels:
        lines.append("no Fisher-weighted tensors in this recipe (not a Fisher merge method?)")
        return "\n".join(lines)
    kept = report["share_of"] == "kept_fisher_mass"
    headers = ["layer", "module", *[f"share {label}" for label in labels], "floor decides"]
    headers += ["base kept"] if kept else []

    def cells(layer, module, summary):
        row = [layer, module, *[percent(summary["shares"][label]) for label in labels]]
        row.append(percent(summary["floor_fraction"]))
        return row + ([percent(summary["none_kept_fraction"])] if kept else [])

    rows = [
        cells("-" if row["layer"] is None else row["layer"], row["module"], row)
        for row in report["groups"]
    ]
    rows.append(cells("all", "all", report["overall"]))
    lines.append(format_table(headers, rows))
    lines.append("")
    lines.append(SHARE_MEANING[report["share_of"]])
    lines.append(
        "floor decides: elements where every model's normalized Fisher is at or below\n"
        "fisher_floor, so the merge is close to the plain weighted average."
    )
    if report["random"]:
        seed = report["random_seed"]
        lines.append(
            f"{report['merge_method']} drops deltas at random: these shares are for "
            + (
                f"--random-seed {seed}, the same draws as `mergekit-yaml --random-seed {seed}`."
                if seed is not None
                else "one draw; pass the --random-seed you give mergekit-yaml to see its draws."
            )
        )
    return "\n".join(lines)


@click.command("explain")
@verbosity_options
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the share map (every tensor group by layer; where the floor decides) to this PNG.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--random-seed",
    type=int,
    default=None,
    help="As mergekit-yaml's: the seed of DARE/DELLA's random drops, for the same draws.",
)
@click.option(
    "--lora-merge-cache",
    type=click.Path(file_okay=False),
    default=None,
    hidden=True,
    help="Accepted for mergekit-yaml compatibility and unused: adapters are read lazily.",
)
def explain_command(
    recipe: str,
    plot_path: Optional[str],
    as_json: bool,
    random_seed: Optional[int],
    lora_merge_cache: Optional[str],
) -> None:
    """Validate RECIPE like the merge would and show each model's Fisher share per layer and
    module. Writes no model: base+adapter inputs are read lazily (no --lora-merge-cache)."""
    del lora_merge_cache  # nothing is merged, so nothing is cached
    report = build_explanation(recipe, random_seed)
    if plot_path:
        from mergekit_fisher.tools.plotting import plot_share_map
        from mergekit_fisher.tools.share_map import share_map

        plot_share_map(share_map(report), plot_path)
        report["plot"] = os.path.abspath(plot_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_explanation(report))
    if plot_path:
        log.info("share map: %s", report["plot"])
