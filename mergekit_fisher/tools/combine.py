"""`mergekit-fisher combine FISHER... OUT`: one Fisher file from several computed on data shards.

A diagonal Fisher is a mean over examples, F_i = (1/n_i) sum_{e in shard i} f_e, so the Fisher of
all the data is the example-weighted mean F = sum_i n_i F_i / sum_i n_i -- exactly what one run
over the concatenated data gives. n_i comes from each file's ``num_examples`` (or ``--weights``).
Inputs are read one tensor at a time and accumulated in float64; the output is float32.
"""

from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence

import click
import torch

from mergekit_fisher.cli import CommaList, FiniteFloatRange, flatten, verbosity_options
from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file import (
    FisherConfig,
    FisherFile,
    FisherWriter,
    check_output_free,
    open_fisher,
    parse_shard_size,
)
from mergekit_fisher.fisher_file.gram import check_is_fisher
from mergekit_fisher.fisher_file.provenance import (
    IDENTITY_KEYS,
    compare_identity,
    describe,
    identity_of,
)
from mergekit_fisher.fisher_file.writer import estimated_size, output_lock

log = logging.getLogger(__name__)
# a weight: positive and finite (click refuses anything else before any file is opened)
WEIGHT = FiniteFloatRange(min=0.0, min_open=True)


def _check_weights(weights: Sequence[float], count: int) -> Optional[List[float]]:
    """The --weights given (already numbers > 0, finite), one per input; None when none were
    given."""
    if not weights:
        return None
    if len(weights) != count:
        raise FisherInputError(
            f"--weights gives {len(weights)} weight(s) for {count} Fisher file(s)",
            fix="give one weight per input file",
        )
    return list(weights)


def _example_weights(files: Sequence[FisherFile]) -> List[float]:
    weights = []
    for fisher in files:
        n = fisher.config.num_examples if fisher.config is not None else None
        if not n or n <= 0:
            raise FisherInputError(
                "the file does not record how many examples it was computed on (num_examples)",
                file=fisher.path,
                fix="pass --weights N1,N2,... with each file's number of examples, in input order",
            )
        weights.append(float(n))
    return weights


def _check_compatible(files: Sequence[FisherFile]) -> None:
    first = files[0]
    names = first.names()
    for fisher in files[1:]:
        ours, theirs = set(names), set(fisher.names())
        for name in sorted(ours - theirs)[:1]:
            raise FisherInputError(
                f"tensor present in {first.path} but missing here",
                file=fisher.path,
                tensor=name,
                fix=(
                    "combine only Fisher files of the same model computed the same way (same "
                    "tensors)"
                ),
            )
        for name in sorted(theirs - ours)[:1]:
            raise FisherInputError(
                f"tensor present here but missing in {first.path}",
                file=fisher.path,
                tensor=name,
                fix=(
                    "combine only Fisher files of the same model computed the same way (same "
                    "tensors)"
                ),
            )
        for name in names:
            a, b = first.header(name).shape, fisher.header(name).shape
            if tuple(a) != tuple(b):
                raise FisherInputError(
                    f"shape {tuple(b)} here but {tuple(a)} in {first.path}",
                    file=fisher.path,
                    tensor=name,
                    fix="combine only Fisher files of the same model",
                )
    for key in ("fisher_type", "space"):
        values = {
            getattr(f.config, key) for f in files if f.config is not None and getattr(f.config, key)
        }
        if len(values) > 1:
            raise FisherInputError(
                f"the inputs disagree on {key} ({', '.join(sorted(map(str, values)))})",
                file=", ".join(f.path for f in files),
                fix=f"combine only Fisher files computed with the same {key}",
            )


def _check_same_model(files: Sequence[FisherFile], allow_different_models: bool) -> None:
    """Fishers of different models (or adapters) average into the Fisher of neither: refused, unless
    asked."""
    recorded = [(f, identity_of(f.config) if f.config is not None else {}) for f in files]
    unknown = [f.path for f, identity in recorded if not identity.get("model")]
    if unknown and len(unknown) < len(
        files
    ):  # (none records a model: nothing to compare, as before)
        log.warning(
            "cannot check that these Fisher files belong to the same model as the others (they "
            "record "
            "no model): %s",
            ", ".join(unknown),
        )
    known = [(f, identity) for f, identity in recorded if identity.get("model")]
    for fisher, identity in known[1:]:
        first, first_identity = known[0]
        differs = compare_identity(first_identity, identity)
        if differs is None:
            continue
        if allow_different_models:
            log.warning(
                "combining Fisher files of different models (--allow-different-models): %s is for "
                "%s, "
                "%s is for %s",
                first.path,
                describe(first_identity),
                fisher.path,
                describe(identity),
            )
            return
        raise FisherInputError(
            f"the Fisher files are for different models: {first.path} is for "
            f"{describe(first_identity)}, "
            f"this one for {describe(identity)} (the {differs} "
            f"differ{'s' if ' and ' not in differs else ''})",
            file=fisher.path,
            fix=(
                "combine only Fisher files of one model, or pass --allow-different-models if you "
                "mean it"
            ),
        )


def _merged_config(files: Sequence[FisherFile], weights: Sequence[float]) -> FisherConfig:
    configs = [f.config or FisherConfig() for f in files]

    def same(key):
        values = {getattr(c, key) for c in configs}
        return values.pop() if len(values) == 1 else None

    def total(key):
        values = [getattr(c, key) for c in configs]
        return sum(values) if all(v is not None for v in values) else None

    datasets = [c.dataset for c in configs if c.dataset]
    models = sorted({c.model for c in configs if c.model})
    identity = {key: same(key) for key in IDENTITY_KEYS if key not in ("model", "adapter")}
    return FisherConfig(
        **{key: value for key, value in identity.items() if value is not None},
        model=models[0] if len(models) == 1 else None,
        adapter=same("adapter"),
        space=same("space") or "dense",
        fisher_type=same("fisher_type"),
        task=same("task"),
        num_examples=total("num_examples"),
        num_tokens=total("num_tokens"),
        dataset=" + ".join(dict.fromkeys(datasets)) or None,
        samples_per_example=same("samples_per_example"),
        combined_from=[
            {
                "path": f.path,
                "weight": w,
                "num_examples": c.num_examples,
                "num_tokens": c.num_tokens,
                "model": c.model,
                "model_fingerprint": c.model_fingerprint,
                "adapter": c.adapter,
                "dataset": c.dataset,
                "dataset_hash": c.dataset_hash,
                "seed": c.seed,
            }
            for f, c, w in zip(files, configs, weights)
        ],
        dataset_hashes=[c.dataset_hash for c in configs],
        models=models if len(models) > 1 else None,
    )


def combine_fishers(
    paths: Sequence[str],
    out: str,
    *,
    weights: Optional[Sequence[float]] = None,
    overwrite: bool = False,
    max_shard_size="5GB",
    allow_different_models: bool = False,
) -> FisherConfig:
    """F = sum_i w_i F_i / sum_i w_i, w_i = num_examples of file i unless `weights` are given."""
    if len(paths) < 2:
        raise FisherInputError(
            "combine needs at least two Fisher files", fix="mergekit-fisher combine A B ... OUT"
        )
    out_abs = os.path.abspath(out)
    parse_shard_size(max_shard_size)  # a bad --max-shard-size fails before any work
    check_output_free(
        out_abs, overwrite, inputs=paths
    )  # OUT must not be (or hold) an input: before any read
    files = [open_fisher(p) for p in paths]
    for fisher in files:  # Grams pool by summing sums and counts, not by this weighted mean
        check_is_fisher(fisher)
    _check_compatible(files)
    _check_same_model(files, allow_different_models)
    weights = list(weights) if weights is not None else _example_weights(files)
    norm = sum(weights)
    for fisher, weight in zip(files, weights):
        log.debug("%s: weight %g of %g", fisher.path, weight, norm)
    needed = estimated_size(
        sum(math.prod(files[0].header(name).shape) for name in files[0].names())
    )
    with output_lock(out_abs):
        check_output_free(out_abs, overwrite, inputs=paths, needed_bytes=needed)
        return _write_combined(files, weights, norm, out_abs, max_shard_size, overwrite)


def _write_combined(files, weights, norm, out_abs, max_shard_size, overwrite) -> FisherConfig:
    # Streamed: one output tensor (and one shard) in memory at a time; a bad value aborts the
    # writer, so nothing is published.
    with FisherWriter(
        out_abs, _merged_config(files, weights), max_shard_size=max_shard_size, overwrite=overwrite
    ) as writer:
        for name in files[0].names():
            acc = None
            for fisher, weight in zip(files, weights):
                values = fisher.get_tensor(name)  # refuses NaN/Inf/negative, naming file and tensor
                if acc is None:
                    acc = values.to(torch.float64).mul_(weight / norm)
                else:
                    acc.add_(values, alpha=weight / norm)  # float64 accumulation
            writer.add(name, acc.to(torch.float32))
            del acc
    return writer.written


@click.command("combine")
@verbosity_options
@click.argument("inputs", nargs=-1, required=True, type=click.Path(), metavar="FISHER... OUT")
@click.option(
    "--weights",
    type=CommaList(WEIGHT),
    multiple=True,
    callback=flatten,
    metavar="N[,N...]",
    help="A weight per input, in input order, instead of each file's num_examples (e.g. example "
    "counts): "
    "repeated (--weights 1000 --weights 250) or comma-separated (--weights 1000,250).",
)
@click.option(
    "--max-shard-size", default="5GB", show_default=True, help="Shard size of a directory output."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never an input).")
@click.option(
    "--allow-different-models",
    is_flag=True,
    help="Combine Fisher files recorded for different models or adapters (refused by default).",
)
def combine_command(
    inputs,
    weights: Sequence[float],
    max_shard_size: str,
    overwrite: bool,
    allow_different_models: bool,
) -> None:
    """Combine Fisher files FISHER... of one model, computed on different data shards, into OUT.

    The result is the example-weighted mean: what a single run over all the shards would give.
    """
    if len(inputs) < 3:
        raise FisherInputError(
            f"combine needs at least two Fisher files and an output, got {len(inputs)} path(s)",
            fix="mergekit-fisher combine A B ... OUT",
        )
    *paths, out = inputs
    parsed = _check_weights(weights, len(paths))
    config = combine_fishers(
        paths,
        out,
        weights=parsed,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        allow_different_models=allow_different_models,
    )
    used = parsed or [f.config.num_examples for f in map(open_fisher, paths)]
    log.info(
        "combined %d Fisher files (weights %s; %s elements, num_examples %s) -> %s",
        len(paths),
        ", ".join(f"{w:g}" for w in used),
        config.num_elements,
        config.num_examples,
        os.path.abspath(out),
    )
