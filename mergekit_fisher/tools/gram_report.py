"""What `inspect` reports for a Gram file (`statistic: gram`, see `fisher_file/gram.py`).

Per layer: the input width, the rows summed (`gram_counts`), the trace of the mean Gram (the mean
squared norm of the layer's input), its share of the file's total trace, its conditioning (largest /
smallest eigenvalue of the mean Gram, float64 `eigvalsh`: the numbers RegMean's solve depends on)
and its numerical rank (eigenvalues above width × the stored dtype's epsilon × the largest); whether
each Gram is a valid XᵀX (square, symmetric, finite, diagonal >= 0). With `--model`: which of the
model's linear weights have a Gram whose width is their input width. Off-diagonal entries may be
negative: for a Gram file that is no problem.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file import FisherFile
from mergekit_fisher.fisher_file.gram import check_gram_values, input_axis, shared_names
from mergekit_fisher.fisher_file.reader import ALLOWED_DTYPES
from mergekit_fisher.tools.report import format_table, human_count, human_float, percent


def rank_tolerance(values: torch.Tensor, stored: torch.dtype) -> float:
    """Eigenvalues below this fraction of the largest are zero: width × the stored dtype's
    machine epsilon (numpy's `matrix_rank` rule), so float32 / bf16 rounding is not rank."""
    return values.shape[-1] * torch.finfo(stored).eps


def gram_row(gram_file: FisherFile, name: str) -> dict:
    values = gram_file.get_tensor(name, check=False)
    problem = None
    try:
        check_gram_values(values, file=gram_file.path, tensor=name)
    except FisherInputError as error:
        problem = error.problem
    counts = getattr(gram_file.config, "gram_counts", None) or {}
    count = counts.get(name)
    shared_by = sorted(k for k, v in shared_names(gram_file).items() if v == name)
    row = {
        "name": name,
        "shared_by": shared_by,  # layers reading the same input: the same Gram
        "width": int(values.shape[-1]),
        "rows": count,
        "problem": problem,
    }
    if problem is None and count is None:
        row["problem"] = "no row count in gram_counts"
    if row["problem"] is not None:
        return {**row, "trace": None, "condition": None, "rank": None}
    stored = ALLOWED_DTYPES[gram_file.header(name).dtype]
    tolerance = rank_tolerance(values, stored)
    mean = values.to(torch.float64) / max(1, int(count))
    eigenvalues = torch.linalg.eigvalsh(mean)
    largest = float(eigenvalues[-1]) if eigenvalues.numel() else 0.0
    smallest = float(eigenvalues[0]) if eigenvalues.numel() else 0.0
    rank = int((eigenvalues > tolerance * largest).sum()) if largest > 0 else 0
    condition = largest / smallest if smallest > tolerance * largest > 0 else math.inf
    return {**row, "trace": float(mean.diagonal().sum()), "condition": condition, "rank": rank}


def model_coverage(gram_file: FisherFile, model_shapes: Dict[str, tuple]) -> dict:
    """The model's 2-D weights with / without a Gram, and Grams whose width does not fit."""
    linear = {name: shape for name, shape in model_shapes.items() if len(shape) == 2}
    covered, mismatches, extra = [], [], []
    holder = {name: name for name in gram_file.names()}
    holder.update(shared_names(gram_file))  # a shared layer's Gram is another name's tensor
    for name, stored in holder.items():
        shape = linear.get(name)
        if shape is None:
            extra.append(name)
            continue
        width = shape[input_axis(gram_file, name)]
        gram_shape = tuple(gram_file.header(stored).shape) if stored in gram_file else None
        if gram_shape != (width, width):
            mismatches.append({"name": name, "gram_shape": list(gram_shape or ()), "weight": shape})
        else:
            covered.append(name)
    without = sorted(name for name in linear if name not in holder)
    return {
        "covered": len(covered),
        "without_gram": without,  # averaged by regmean: embeddings, tied heads, non-linear 2-D
        "extra": extra,
        "shape_mismatches": mismatches,
    }


def gram_report(gram_file: FisherFile, model_shapes: Optional[Dict[str, tuple]]) -> dict:
    rows = [gram_row(gram_file, name) for name in gram_file.names()]
    total = sum(row["trace"] or 0.0 for row in rows)
    for row in rows:
        row["share"] = row["trace"] / total if total and row["trace"] is not None else None
    report = {"rows": rows, "total_trace": total, "coverage": None}
    if model_shapes is not None:
        report["coverage"] = model_coverage(gram_file, model_shapes)
    return report


def format_gram_rows(report: dict) -> str:
    headers = ["layer weight", "width", "rows", "trace", "share", "condition", "rank", "problem"]
    cells = []
    for row in report["rows"]:
        shared = f" (+{len(row['shared_by'])} shared)" if row["shared_by"] else ""
        cells.append(
            [
                row["name"] + shared,
                str(row["width"]),
                human_count(row["rows"]) if row["rows"] is not None else "-",
                human_float(row["trace"]) if row["trace"] is not None else "-",
                percent(row["share"]) if row["share"] is not None else "-",
                human_float(row["condition"]) if row["condition"] is not None else "-",
                str(row["rank"]) if row["rank"] is not None else "-",
                row["problem"] or "",
            ]
        )
    return format_table(headers, cells, align="lrrrrrrl")


def format_gram_coverage(coverage: dict, model: str) -> List[str]:
    lines = [
        f"coverage of {model}: {coverage['covered']} linear weights have a Gram; "
        f"{len(coverage['without_gram'])} 2-D tensors have none (regmean averages them), "
        f"extra {len(coverage['extra'])}, shape mismatches {len(coverage['shape_mismatches'])}"
    ]
    lines += [f"  no Gram:  {name}" for name in coverage["without_gram"]]
    lines += [f"  extra:    {name}" for name in coverage["extra"]]
    lines += [
        f"  shape:    {m['name']}: Gram {tuple(m['gram_shape'])} vs weight {tuple(m['weight'])}"
        for m in coverage["shape_mismatches"]
    ]
    return lines


def gram_problems(report: dict) -> bool:
    coverage = report.get("coverage") or {}
    return bool(
        any(row["problem"] for row in report["rows"])
        or coverage.get("extra")
        or coverage.get("shape_mismatches")
    )
