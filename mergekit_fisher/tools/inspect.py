"""`mergekit-fisher inspect FISHER [--model MODEL] [--by tensor|layer|module] [--json]`.

Reports what a Fisher file holds: format and provenance (``fisher_config.json`` or the header
config), per-tensor or grouped statistics, and -- with ``--model`` -- coverage against the model's
checkpoint (missing, extra, shape mismatches). Values are read one tensor at a time without the
reader's value checks: inspect *reports* NaN/Inf and negative values instead of refusing the file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Tuple

import click

from mergekit_fisher.choices import Grouping, Space
from mergekit_fisher.cli import EnumChoice, verbosity_options
from mergekit_fisher.fisher_file import FisherFile, open_fisher
from mergekit_fisher.fisher_file.gram import is_gram
from mergekit_fisher.tools.checkpoint import checkpoint_shapes, tied_aliases
from mergekit_fisher.tools.grouping import group_label, group_sort_key
from mergekit_fisher.tools.report import format_table, human_count, human_float, percent
from mergekit_fisher.tools.stats import Summary, summarize

# provenance keys shown in the text report, in this order (any extra config keys follow)
PROVENANCE_KEYS = (
    "model",
    "adapter",
    "space",
    "fisher_type",
    "task",
    "num_examples",
    "num_tokens",
    "dataset",
    "dataset_subset",
    "dataset_split",
    "dataset_revision",
    "text_field",
    "shard",
    "dataset_hash",
    "samples_per_example",
    "seed",
    "dtype",
    "accumulator_dtype",
    "tool_version",
    "created",
)
STATS_KEYS = ("sum", "sum_sq", "num_elements", "format", "format_version")


def layout_of(fisher: FisherFile) -> Dict[str, object]:
    shards = sorted(set(fisher.tensor_paths.values()))
    if not os.path.isdir(fisher.path):
        kind = "file"
    else:
        kind = "sharded directory" if len(shards) > 1 else "directory"
    return {"kind": kind, "files": len(shards)}


def coverage(
    fisher_shapes: Dict[str, Tuple[int, ...]],
    model_shapes: Dict[str, Tuple[int, ...]],
    aliases: Optional[Dict[str, str]] = None,
) -> dict:
    """Which model tensors the Fisher file covers: missing, extra, and shape mismatches.

    `aliases`: names the checkpoint does not store but mergekit reads from a stored tensor (a tied
    lm_head). A Fisher entry under such a name is not "extra": it is listed apart as tied. It does
    not cover the stored tensor, whose own output the merge looks up under the stored name only
    (merge/sources.py).
    """
    aliases = aliases or {}
    tied = {
        name: aliases[name]
        for name in fisher_shapes
        if name not in model_shapes and name in aliases
    }
    missing = [name for name in model_shapes if name not in fisher_shapes]
    extra = [name for name in fisher_shapes if name not in model_shapes and name not in tied]
    mismatches = [
        {"name": name, "fisher_shape": list(shape), "model_shape": list(model_shapes[name])}
        for name, shape in fisher_shapes.items()
        if name in model_shapes and tuple(model_shapes[name]) != tuple(shape)
    ]
    covered = len(model_shapes) - len(missing) - len(mismatches)
    return {
        "model_tensors": len(model_shapes),
        "covered": covered,
        "missing": sorted(missing),
        "extra": sorted(extra),
        "tied": dict(sorted(tied.items())),
        "shape_mismatches": sorted(mismatches, key=lambda m: m["name"]),
    }


def summarize_file(fisher: FisherFile, by: str) -> Tuple[List[dict], Summary]:
    """Rows (one per tensor, or per group) and the total, reading one tensor at a time."""
    groups: Dict[str, Summary] = {}
    rows: List[dict] = []
    total = Summary()
    for name in fisher.names():
        summary = summarize(fisher.get_tensor(name, check=False))
        total = total + summary
        if by == Grouping.TENSOR:
            header = fisher.header(name)
            rows.append(
                {
                    "name": name,
                    "shape": list(header.shape),
                    "dtype": header.dtype,
                    "summary": summary,
                }
            )
        else:
            label = group_label(name, by)
            groups[label] = groups.get(label, Summary()) + summary
    if by != Grouping.TENSOR:
        rows = [
            {"name": label, "summary": groups[label]}
            for label in sorted(groups, key=group_sort_key)
        ]
    return rows, total


def _clean(value):
    """JSON has no NaN/Inf: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _stats_match(fisher: FisherFile, total: Summary) -> Optional[bool]:
    """Does the sum recorded in the config match the values? None when the config has none."""
    stats = fisher.config.global_stats() if fisher.config is not None else None
    if stats is None or total.nonfinite:
        return None
    if stats.num_elements != total.numel:
        return False
    return math.isclose(stats.sum, total.sum, rel_tol=1e-6, abs_tol=1e-30)


def build_report(path: str, model: Optional[str], by: str) -> dict:
    fisher = open_fisher(path)
    rows, total = summarize_file(fisher, by)
    config = fisher.config.model_dump(exclude_none=True) if fisher.config is not None else None
    report = {
        "path": fisher.path,
        "layout": layout_of(fisher),
        "format": config.get("format") if config else None,
        "format_version": config.get("format_version") if config else None,
        "config": config,
        "num_tensors": total.tensors,
        "num_elements": total.numel,
        "totals": total.to_dict(),
        "config_stats_match": _stats_match(fisher, total),
        "by": Grouping(by).value,
        "rows": [],
        "coverage": None,
    }
    for row in rows:
        summary: Summary = row.pop("summary")
        share = summary.sum / total.sum if total.sum else None
        report["rows"].append({**row, **summary.to_dict(), "share": share})
    if is_gram(fisher):  # a Gram file (regmean): its own per-layer report and coverage
        from mergekit_fisher.tools.gram_report import gram_report

        report["statistic"] = "gram"
        report["gram"] = gram_report(fisher, checkpoint_shapes(model) if model else None)
        report["gram"]["model"] = model
        return _clean(report)
    if model is not None:
        fisher_shapes = {name: fisher.header(name).shape for name in fisher.names()}
        model_shapes = checkpoint_shapes(model)
        aliases = tied_aliases(model, model_shapes)
        report["coverage"] = {"model": model, **coverage(fisher_shapes, model_shapes, aliases)}
        cov = report["coverage"]
        if (
            fisher.config is not None
            and fisher.config.space == Space.ADAPTER
            and (cov["missing"] or cov["extra"])
        ):
            cov["note"] = (
                "adapter-space Fisher (lora_A/lora_B names): pass the adapter directory as "
                "--model, "
                "not the base checkpoint"
            )
    return _clean(report)


def _provenance_lines(report: dict) -> List[str]:
    config = report["config"]
    layout = report["layout"]
    where = (
        f"{layout['kind']}, {layout['files']} safetensors file{'s' if layout['files'] != 1 else ''}"
    )
    what = "Gram file:   " if report.get("statistic") == "gram" else "Fisher file: "
    lines = [f"{what} {report['path']} ({where})"]
    if config is None:
        lines.append(
            "format:       no fisher_config found: provenance unknown (not written by "
            "mergekit-fisher?)"
        )
    else:
        lines.append(f"format:       {config.get('format')} v{config.get('format_version')}")
        shown = [k for k in PROVENANCE_KEYS if k in config]
        shown += sorted(k for k in config if k not in PROVENANCE_KEYS and k not in STATS_KEYS)
        for key in shown:
            value = config[key]
            if not isinstance(value, str):
                value = json.dumps(value)
                if len(value) > 100 and isinstance(
                    config[key], (dict, list)
                ):  # e.g. convert's rename map
                    value = f"{len(config[key])} entries (see --json)"
            lines.append(f"{key + ':':<13} {value}")
    totals = report["totals"]
    lines.append(
        f"tensors:      {report['num_tensors']}    elements: {human_count(report['num_elements'])}"
        f"    sum: {human_float(totals['sum'])}    mean: {human_float(totals['mean'])}"
        f"    max: {human_float(totals['max'])}"
    )
    lines.append(
        f"zeros:        {percent(totals['zero_fraction'], 2)}    non-finite: {totals['nonfinite']}"
        f"    negative: {totals['negative']}"
    )
    match = report["config_stats_match"]
    if match is not None:
        lines.append(
            "config sum:   "
            + ("matches the values" if match else "DIFFERS from the values (file modified?)")
        )
    return lines


def _table(report: dict) -> str:
    by_tensor = report["by"] == Grouping.TENSOR
    headers = ["tensor" if by_tensor else report["by"]]
    headers += ["shape", "dtype"] if by_tensor else ["tensors"]
    headers += ["elements", "sum", "share", "mean", "max", "zeros", "non-finite", "negative"]
    rows = []
    for row in report["rows"]:
        cells = [row["name"]]
        cells += (
            ["x".join(map(str, row["shape"])) or "()", row["dtype"]]
            if by_tensor
            else [str(row["tensors"])]
        )
        cells += [
            human_count(row["numel"]),
            human_float(row["sum"]),
            percent(row["share"]),
            human_float(row["mean"]),
            human_float(row["max"]),
            percent(row["zero_fraction"]),
            str(row["nonfinite"]),
            str(row["negative"]),
        ]
        rows.append(cells)
    align = "lll" if by_tensor else "lr"
    return format_table(headers, rows, align=align + "r" * 8)


def _coverage_lines(cov: dict) -> List[str]:
    lines = [
        f"coverage of {cov['model']}: {cov['covered']} of {cov['model_tensors']} model tensors "
        "covered; "
        f"missing {len(cov['missing'])}, extra {len(cov['extra'])}, shape mismatches "
        f"{len(cov['shape_mismatches'])}"
    ]
    if cov.get("note"):
        lines.append(f"  note: {cov['note']}")
    lines += [f"  missing:  {name}" for name in cov["missing"]]
    lines += [f"  extra:    {name}" for name in cov["extra"]]
    lines += [
        f"  tied:     {name} (the checkpoint stores it as {stored})"
        for name, stored in cov.get("tied", {}).items()
    ]
    lines += [
        f"  shape:    {m['name']}: Fisher {tuple(m['fisher_shape'])} vs model "
        f"{tuple(m['model_shape'])}"
        for m in cov["shape_mismatches"]
    ]
    return lines


def format_report(report: dict) -> str:
    if report.get("statistic") == "gram":
        from mergekit_fisher.tools.gram_report import format_gram_coverage, format_gram_rows

        gram = report["gram"]
        parts = ["\n".join(_provenance_lines(report)), format_gram_rows(gram)]
        if gram["coverage"] is not None:
            parts.append("\n".join(format_gram_coverage(gram["coverage"], gram["model"])))
        return "\n\n".join(parts)
    parts = ["\n".join(_provenance_lines(report)), _table(report)]
    if report["coverage"] is not None:
        parts.append("\n".join(_coverage_lines(report["coverage"])))
    return "\n\n".join(parts)


def has_problems(report: dict) -> bool:
    if report.get("statistic") == "gram":
        from mergekit_fisher.tools.gram_report import gram_problems

        # off-diagonal Gram entries may be negative: the Gram checks decide
        return bool(
            report["totals"]["nonfinite"]
            or report["config_stats_match"] is False
            or gram_problems(report["gram"])
        )
    totals = report["totals"]
    cov = report["coverage"] or {}
    return bool(
        totals["nonfinite"]
        or totals["negative"]
        or report["config_stats_match"] is False
        or cov.get("missing")
        or cov.get("extra")
        or cov.get("shape_mismatches")
    )


@click.command("inspect")
@verbosity_options
@click.argument("fisher", type=click.Path(exists=False))
@click.option(
    "--model",
    type=click.Path(),
    default=None,
    help="Checkpoint (directory or .safetensors; a PEFT adapter directory for adapter-space "
    "Fisher files) to check coverage against.",
)
@click.option(
    "--by",
    type=EnumChoice(Grouping),
    default=Grouping.TENSOR.value,
    show_default=True,
    help="One row per tensor, per layer, or per module type (summed across layers).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the report as JSON (NaN/Inf become null)."
)
@click.option(
    "--check",
    is_flag=True,
    help=(
        "Exit with status 1 when values are non-finite/negative, the config sum disagrees, or "
        "coverage is incomplete."
    ),
)
def inspect_command(
    fisher: str, model: Optional[str], by: Grouping, as_json: bool, check: bool
) -> None:
    """Summarise the Fisher (or Gram) file FISHER (and its coverage of --model)."""
    report = build_report(fisher, model, by)
    if as_json:
        click.echo(json.dumps(report, indent=2, allow_nan=False))
    else:
        click.echo(format_report(report))
    if check and has_problems(report):
        raise SystemExit(1)
