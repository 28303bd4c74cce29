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
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import click
import torch

from mergekit_fisher.cli import verbosity_options
from mergekit_fisher.tools.grouping import layer_and_module
from mergekit_fisher.tools.report import format_table, percent

log = logging.getLogger(__name__)


@dataclass
class GroupMass:
    """Fisher mass per model and floor statistics of one (module type, layer) group."""

    mass: Dict[str, float] = field(default_factory=dict)
    elements: int = 0
    floor_decides: int = 0

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


def plan_recipe(
    recipe_path: str, lora_merge_cache: Optional[str] = None, trust_remote_code: bool = False
):
    """Plan (and so validate) a recipe exactly as `mergekit-yaml` would, without executing it."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config, get_architecture_info
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from pydantic import ValidationError

    from mergekit_fisher.errors import FisherInputError
    from mergekit_fisher.merge.registry import ensure_registered

    ensure_registered()

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
        config = MergeConfiguration.model_validate(document)
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
    options = MergeOptions(
        lora_merge_cache=lora_merge_cache, trust_remote_code=trust_remote_code, quiet=True
    )
    arch_info = get_architecture_info(config, options)
    LoaderCache().setup(options=options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)
    for model in config.referenced_models():
        LoaderCache().get(model)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    # `_plan()` builds every tensor task (running our validation) without the writer/return
    # wrappers.
    planner._plan()
    return config, list(planner._tensors)


def collect_masses(planned) -> tuple:
    """{(module, layer): GroupMass}, model labels in recipe order, and the method name."""
    from mergekit_fisher.merge.gram_tasks import GramMergeTask
    from mergekit_fisher.merge.tasks import FisherMergeTask, PermuteFisherVocabulary

    groups: Dict[tuple, GroupMass] = defaultdict(GroupMass)
    labels: List[str] = []
    method = None
    tokenizers: Dict[object, object] = {}  # one tokenizer merge per recipe, built once
    for weight_info, task in planned:
        if isinstance(task, GramMergeTask):
            method = task.method_name
            _add_gram_masses(groups, labels, weight_info.name, task)
            continue
        if not isinstance(task, FisherMergeTask):
            continue
        method = task.method_name
        source = task.fisher_tensors
        permutation = None
        if isinstance(source, PermuteFisherVocabulary):
            permutation, source = source, source.fisher_task
        fishers = source.execute()
        if not fishers:
            continue
        if permutation is not None:
            # the merge's own vocabulary permutation: every model's rows line up with the output's
            if permutation.tokenizer_task not in tokenizers:
                tokenizers[permutation.tokenizer_task] = permutation.tokenizer_task.execute()
            fishers = permutation.execute(
                tokenizer_info=tokenizers[permutation.tokenizer_task], fishers=fishers
            )
        floor_levels = source.floor_levels()
        full_shape = next((tuple(f.shape) for f in fishers.values() if f.ndim), None)
        layer, module = layer_and_module(weight_info.name)
        group = groups[(module, layer)]
        numel = None
        below_floor = None
        for model, fisher in fishers.items():
            label = model  # masses are keyed by model; display labels are made unique at the end
            if model not in labels:
                labels.append(model)
            weight = float(task.input_parameters[model].get("weight", 1.0))
            shape = full_shape or source.inputs[model].expected_shape
            count = (
                fisher.numel() if fisher.ndim else (int(torch.tensor(shape).prod()) if shape else 1)
            )
            numel = count if numel is None else numel
            total = float(fisher.double().sum()) if fisher.ndim else float(fisher) * count
            group.mass[label] = group.mass.get(label, 0.0) + weight * total
            # the loaded Fisher carries its floor: F + floor <= 2·floor where F is at or under it,
            # so there the floor (or the 0/0 fallback) decides
            below = fisher <= 2 * floor_levels[model]
            below_floor = below if below_floor is None else (below_floor & below)
        group.elements += numel
        group.floor_decides += (
            int(below_floor.sum()) if below_floor.ndim else (numel if bool(below_floor) else 0)
        )
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
    group = groups[(module, layer)]
    for model, gram in grams.items():
        if model not in labels:
            labels.append(model)
        weight = float(task.input_parameters[model].get("weight", 1.0))
        trace = float(gram.double().diagonal().sum())
        group.mass[model] = group.mass.get(model, 0.0) + weight * trace
    group.elements += next(gram.shape[0] for gram in grams.values()) ** 2


def build_explanation(recipe_path: str, lora_merge_cache: Optional[str] = None) -> dict:
    config, planned = plan_recipe(recipe_path, lora_merge_cache)
    groups, labels, method = collect_masses(planned)
    rows = []
    for (module, layer), group in sorted(
        groups.items(), key=lambda kv: (kv[0][1] is not None, kv[0][1] or 0, kv[0][0])
    ):
        rows.append(
            {
                "layer": layer,
                "module": module,
                "shares": dict(zip(labels, group.shares(labels))),
                "floor_fraction": group.floor_decides / group.elements if group.elements else 0.0,
                "elements": group.elements,
            }
        )
    totals = GroupMass()
    for group in groups.values():
        for label, mass in group.mass.items():
            totals.mass[label] = totals.mass.get(label, 0.0) + mass
        totals.elements += group.elements
        totals.floor_decides += group.floor_decides
    return {
        "recipe": os.path.abspath(recipe_path),
        "merge_method": config.merge_method if method is None else method,
        "models": labels,
        "overall": {
            "shares": dict(zip(labels, totals.shares(labels))),
            "floor_fraction": totals.floor_decides / totals.elements if totals.elements else 0.0,
            "elements": totals.elements,
        },
        "groups": rows,
    }


def format_explanation(report: dict) -> str:
    labels = report["models"]
    lines = [f"recipe: {report['recipe']}", f"method: {report['merge_method']}", ""]
    if not labels:
        lines.append("no Fisher-weighted tensors in this recipe (not a Fisher merge method?)")
        return "\n".join(lines)
    headers = ["layer", "module", *[f"share {label}" for label in labels], "floor decides"]
    rows = [
        [
            "-" if row["layer"] is None else row["layer"],
            row["module"],
            *[percent(row["shares"][label]) for label in labels],
            percent(row["floor_fraction"]),
        ]
        for row in report["groups"]
    ]
    overall = report["overall"]
    rows.append(
        [
            "all",
            "all",
            *[percent(overall["shares"][label]) for label in labels],
            percent(overall["floor_fraction"]),
        ]
    )
    lines.append(format_table(headers, rows))
    lines.append("")
    lines.append(
        "share: each model's part of the Fisher mass Σ weight·(normalized Fisher + floor) -- the "
        "effective"
    )
    lines.append(
        "weight the merge gives it there. floor decides: elements where every model's normalized "
        "Fisher"
    )
    lines.append(
        "is at or below fisher_floor, so the merge is close to the plain weighted average."
    )
    return "\n".join(lines)


def shares_for_plot(report: dict) -> Dict[str, Dict[int, List[float]]]:
    shares: Dict[str, Dict[int, List[float]]] = defaultdict(dict)
    for row in report["groups"]:
        if row["layer"] is not None:
            shares[row["module"]][row["layer"]] = [
                row["shares"][label] for label in report["models"]
            ]
    return dict(shares)


@click.command("explain")
@verbosity_options
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a heatmap (layers x models, one panel per module type) to this PNG.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--lora-merge-cache",
    type=click.Path(file_okay=False),
    default=None,
    help="As mergekit-yaml's: where base+adapter models are merged.",
)
def explain_command(
    recipe: str, plot_path: Optional[str], as_json: bool, lora_merge_cache: Optional[str]
) -> None:
    """Validate RECIPE like the merge would and show each model's Fisher share per layer and
    module."""
    report = build_explanation(recipe, lora_merge_cache)
    if plot_path:
        from mergekit_fisher.tools.plotting import plot_share_heatmap

        plot_share_heatmap(shares_for_plot(report), report["models"], plot_path)
        report["plot"] = os.path.abspath(plot_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_explanation(report))
    if plot_path:
        log.info("heatmap: %s", report["plot"])
