"""Fisher resolution: which Fisher file and tensor serves each input of each output tensor.

The one module that turns a recipe's `fisher:` values into `FisherInput`s (file + tensor name +
expected shape), validated at plan time. It runs while mergekit plans the merge -- after its loader
cache is warm, before any tensor is merged or written -- once per output tensor. Everything
checkable without merging is checked here, so bad input fails with one clear message and the
output directory gets no model shards:
the file exists and is safetensors (pickles are refused), the tensor is there (under the input's
name, aliases or tied names), its shape matches the model's, and -- with `fisher_validate: full`,
the default -- every value of every Fisher file is finite and >= 0 (one streaming pass per file,
which also yields the global statistics when the file's metadata lacks them).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from mergekit.common import ModelReference
from pydantic import BaseModel
from safetensors import safe_open

from mergekit_fisher.errors import FisherInputError, warn_once
from mergekit_fisher.fisher_file import FisherFile, open_fisher
from mergekit_fisher.fisher_file.gram import check_is_fisher
from mergekit_fisher.hub import resolve_fisher_path
from mergekit_fisher.merge.parameters import (
    FISHER,
    PROVENANCE,
    FisherValidation,
    MissingFisher,
    check_shared,
)
from mergekit_fisher.merge.provenance import check_provenance
from mergekit_fisher.naming import convert_stored, load_candidates, meta_sources

LOG = logging.getLogger(__name__)
_LOCK = threading.Lock()  # values_checked is set once per opened file, from --multi-gpu threads too


class FisherInput(BaseModel, frozen=True):
    """Where one input's Fisher for one output tensor lives (resolved and validated at plan
    time)."""

    path: str
    tensor: Optional[str]  # name inside the Fisher file; None = uniform (missing_fisher: uniform)
    expected_shape: Optional[Tuple[int, ...]] = None
    # set when `tensor` is not stored but built from the file's stored tensors by this model type's
    # checkpoint conversion (fused MoE experts), as mergekit's LoadTensor builds the model's
    model_type: Optional[str] = None


def open_for_model(path: Any, model: ModelReference, method_name: str) -> FisherFile:
    if path is not None and not isinstance(path, str):
        raise FisherInputError(
            f"`fisher:` must be a path to a Fisher file or directory, got {path!r} "
            f"(merge method {method_name})",
            model=str(model),
            fix="write the path as a string under this model's `parameters:`",
        )
    if not path:
        raise FisherInputError(
            f"no Fisher file given for this model (merge method {method_name})",
            model=str(model),
            fix="add `fisher: /path/to/fisher` under this model's `parameters:` "
            "(compute one with `mergekit-fisher compute`)",
        )
    try:
        return open_fisher(resolve_fisher_path(path))
    except FisherInputError as error:
        if error.model is None:
            raise FisherInputError(
                error.problem, fix=error.fix, model=str(model), file=error.file, tensor=error.tensor
            ) from None
        raise


def scan_values(fisher_file: FisherFile, model: ModelReference) -> None:
    """One streaming pass over the whole file: refuses NaN/Inf/negative values before merging.

    Done once per opened file (`open_fisher` opens a rewritten file anew, so it is scanned again).
    """
    with _LOCK:
        if fisher_file.values_checked:
            return
    try:
        stats = fisher_file.compute_stats()
    except FisherInputError as error:
        raise FisherInputError(
            error.problem, fix=error.fix, model=str(model), file=error.file, tensor=error.tensor
        ) from None
    check_recorded_stats(fisher_file, stats, model)
    fisher_file.remember_stats(stats)
    with _LOCK:
        fisher_file.values_checked = True


def check_recorded_stats(fisher_file: FisherFile, scanned, model: ModelReference) -> None:
    """The global statistics in the file's config must be those of its values.

    `mean` and `l2` normalization divide by them: a doctored or stale `sum` would silently move one
    model's share of the merge (x1e6: from 0.5 to 0.000), so a mismatch is an error, not a
    preference.
    """
    recorded = fisher_file.config.global_stats() if fisher_file.config is not None else None
    if recorded is None:
        return
    same = recorded.num_elements == scanned.num_elements and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-300)
        for a, b in ((recorded.sum, scanned.sum), (recorded.sum_sq, scanned.sum_sq))
    )
    if not same:
        raise FisherInputError(
            f"the global statistics in fisher_config.json (sum {recorded.sum!r}, sum_sq "
            f"{recorded.sum_sq!r}, {recorded.num_elements} elements) are not those of the file's "
            f"values (sum {scanned.sum!r}, sum_sq {scanned.sum_sq!r}, "
            f"{scanned.num_elements} elements)",
            model=str(model),
            file=fisher_file.path,
            fix="the config was edited or belongs to other values: recompute the Fisher, or "
            "rewrite it with `mergekit-fisher convert`",
        )


def check_plausible_stats(fisher_file: FisherFile, model: ModelReference) -> None:
    """Without a scan (`fisher_validate: headers`) the recorded statistics are trusted, but they
    must at least be possible for values >= 0: sum >= 0, sum_sq >= 0 and sum² <= n·sum_sq."""
    stats = fisher_file.global_stats()
    n = stats.num_elements
    if stats.sum < 0 or stats.sum_sq < 0 or stats.sum**2 > n * stats.sum_sq * (1 + 1e-6) + 1e-300:
        raise FisherInputError(
            f"impossible global statistics in fisher_config.json (sum {stats.sum!r}, sum_sq "
            f"{stats.sum_sq!r}, {n} elements) for a Fisher, whose values are >= 0",
            model=str(model),
            file=fisher_file.path,
            fix="recompute the Fisher, or merge with `fisher_validate: full` (the default), which "
            "recomputes the statistics from the values",
        )


def check_space(fisher_file: FisherFile, model: ModelReference) -> None:
    """An adapter-space Fisher (of LoRA's A/B) says nothing about the dense weights a merge
    averages."""
    config = fisher_file.config
    if config is not None and getattr(config, "space", "dense") == "adapter":
        raise FisherInputError(
            "this Fisher was computed in adapter space (LoRA A/B, `--space adapter`); a merge of "
            "dense weights needs the Fisher of the dense weights",
            model=str(model),
            file=fisher_file.path,
            fix="recompute it with `mergekit-fisher compute ... --lora ADAPTER --space dense`",
        )


def _model_tensor_shape(model: ModelReference, name: str) -> Optional[Tuple[int, ...]]:
    """The model tensor's shape from its safetensors header (None for pickle checkpoints)."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    if not index.is_safetensors or name not in index.tensor_paths:
        return None
    shard = os.path.join(index.base_path, index.tensor_paths[name])
    return _shard_shapes(shard, os.stat(shard).st_mtime_ns).get(name)


@functools.lru_cache(maxsize=256)
def _shard_shapes(shard: str, _mtime_ns: int) -> Dict[str, Tuple[int, ...]]:
    """Every tensor shape of one model shard: its header is parsed once, not once per output
    tensor."""
    with safe_open(shard, framework="pt", device="cpu") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _present_name(model: ModelReference, candidates: Sequence[str]) -> Optional[str]:
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    return next((name for name in candidates if name in index.tensor_paths), None)


def _model_shapes(model: ModelReference) -> Dict[str, Tuple[int, ...]]:
    """Every stored tensor's shape of a model (safetensors headers; {} for pickle checkpoints)."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    if not index.is_safetensors:
        return {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for shard in sorted(set(index.tensor_paths.values())):
        path = os.path.join(index.base_path, shard)
        shapes.update(_shard_shapes(path, os.stat(path).st_mtime_ns))
    return shapes


def _model_type(model: ModelReference) -> Optional[str]:
    from mergekit.io.tasks import LoaderCache

    return model.config(trust_remote_code=LoaderCache().trust_remote_code).model_type


class _ModelTensor(BaseModel, frozen=True):
    """What mergekit's LoadTensor will load for one input: a stored tensor or a converted one."""

    name: str  # the stored name, or (converted) the in-memory target name
    shape: Optional[Tuple[int, ...]]
    model_type: Optional[str] = None  # set when built by the checkpoint conversion


def _model_tensor(model: ModelReference, info) -> Optional[_ModelTensor]:
    present = _present_name(model, load_candidates(info))
    if present is not None:
        return _ModelTensor(name=present, shape=_model_tensor_shape(model, present))
    # Not stored under any of its names: transformers' conversion may build it from stored tensors
    # (fused MoE experts), exactly as LoadTensor will. Shapes only: no value is read here.
    model_type = _model_type(model)
    built = convert_stored(
        model_type, meta_sources(_model_shapes(model)), [info.name, *(info.aliases or ())]
    )
    if built is None:
        return None  # an optional weight this model lacks: mergekit's policy decides
    target, meta = built
    return _ModelTensor(name=target, shape=tuple(meta.shape), model_type=model_type)


def _locate_fisher(
    fisher_file: FisherFile, tensor: _ModelTensor, info
) -> Tuple[Optional[str], Optional[Tuple[int, ...]]]:
    """(name in the file or conversion target, its shape), or (None, None) when the file lacks
    it."""
    if tensor.model_type is not None:
        shapes = {name: fisher_file.header(name).shape for name in fisher_file.names()}
        try:
            built = convert_stored(tensor.model_type, meta_sources(shapes), [tensor.name])
        except (RuntimeError, ValueError, KeyError, IndexError) as error:
            # e.g. one expert's tensor missing: the stack of the others fails
            raise FisherInputError(
                f"cannot build {tensor.name} from the Fisher file's stored tensors with the "
                f"{tensor.model_type} checkpoint conversion ({str(error).splitlines()[0]})",
                file=fisher_file.path,
                tensor=tensor.name,
                fix="the file lacks or mis-shapes some of the stored tensors (e.g. one expert's); "
                "recompute it with `mergekit-fisher compute`",
            ) from None
        return (tensor.name, tuple(built[1].shape)) if built else (None, None)
    # Look the Fisher up under names of the *same* tensor only. A tied name is used only when it is
    # what the model itself stores (a tied checkpoint); an untied model's missing lm_head Fisher
    # must never be replaced by its embedding's.
    stored = fisher_file.find(*dict.fromkeys([tensor.name, info.name, *(info.aliases or ())]))
    return (stored, fisher_file.header(stored).shape) if stored else (None, None)


def _checked_fisher_file(model, input_parameters, method_name, shared) -> FisherFile:
    fisher_file = open_for_model(input_parameters[model].get(FISHER), model, method_name)
    check_is_fisher(fisher_file, str(model))  # a Gram file (for regmean) has no Fisher in it
    check_space(fisher_file, model)
    check_provenance(fisher_file, model, shared[PROVENANCE])
    if shared["fisher_validate"] == FisherValidation.FULL:
        scan_values(fisher_file, model)
    else:
        check_plausible_stats(fisher_file, model)
    return fisher_file


def resolve_fisher_inputs(
    *,
    method_name: str,
    weight_info: Mapping[ModelReference, object],
    model_order: Sequence[ModelReference],
    base_model: Optional[ModelReference],
    shared_parameters: Dict,
    input_parameters: Mapping[ModelReference, Mapping],
    output_name: str,
    vocabulary_axis: Optional[int],
    truncate: bool,
):
    """Validate and locate each merged input's Fisher for one output tensor.

    Returns ({model: FisherInput}, rows to keep under unsafe vocabulary truncation or None).
    """
    check_shared(shared_parameters, where=f"merge method {method_name}")
    uses_base = method_name != "fisher"  # delta methods: the base needs no Fisher
    inputs: Dict[ModelReference, FisherInput] = {}
    model_rows = []
    for model in model_order:
        info = weight_info[model]
        tensor = _model_tensor(model, info)
        if tensor is None and not getattr(info, "optional", False):
            # mergekit would fail on it mid-merge ("required but not present"), after writing shards
            raise FisherInputError(
                f"the model has no tensor {info.name} "
                f"(nor {', '.join(load_candidates(info)[1:]) or 'an alias'}), "
                "which mergekit's architecture for it requires: stock mergekit cannot merge this "
                "checkpoint either (its architecture file does not match the model's config)",
                model=str(model),
                fix="check the model's config.json against mergekit's architecture for its "
                "model_type; a checkpoint saved by a current transformers usually matches",
                kind="model",
            )
        if tensor is None:
            continue  # an optional weight this model lacks: no Fisher needed
        if vocabulary_axis is not None and tensor.shape is not None:
            # mergekit truncates to the smallest vocabulary over *all* loaded inputs, the base
            # included
            model_rows.append(tensor.shape[vocabulary_axis])
        if uses_base and model == base_model:
            continue
        fisher_file = _checked_fisher_file(model, input_parameters, method_name, shared_parameters)
        stored, fisher_shape = _locate_fisher(fisher_file, tensor, info)
        if stored is None:
            if shared_parameters["missing_fisher"] != MissingFisher.UNIFORM:
                looked_for = (
                    tensor.name
                    if tensor.model_type
                    else ", ".join(dict.fromkeys([tensor.name, info.name, *(info.aliases or ())]))
                )
                how = (
                    " (built by the checkpoint conversion from its stored tensors)"
                    if tensor.model_type
                    else ""
                )
                raise FisherInputError(
                    f"tensor missing from the Fisher file (looked for {looked_for}{how})",
                    model=str(model),
                    file=fisher_file.path,
                    tensor=info.name,
                    fix="recompute the Fisher for this model with `mergekit-fisher compute`, "
                    "or set `missing_fisher: uniform` to weight this tensor uniformly",
                )
            warn_once(
                LOG,
                ("uniform", fisher_file.path, info.name),
                "%s: tensor %s is not in Fisher file %s; using a uniform Fisher "
                "(missing_fisher: uniform)",
                model,
                info.name,
                fisher_file.path,
            )
            inputs[model] = FisherInput(
                path=fisher_file.path, tensor=None, expected_shape=tensor.shape
            )
            continue
        if tensor.shape is not None and fisher_shape != tensor.shape:
            raise FisherInputError(
                f"Fisher shape {fisher_shape} does not match the model tensor {tensor.name} "
                f"{tensor.shape}",
                model=str(model),
                file=fisher_file.path,
                tensor=stored,
                fix="this Fisher was computed for another model "
                "(see its fisher_config.json `model`); "
                "recompute it for this model with `mergekit-fisher compute`",
            )
        inputs[model] = FisherInput(
            path=fisher_file.path,
            tensor=stored,
            expected_shape=tensor.shape,
            model_type=tensor.model_type,
        )
    truncate_rows = min(model_rows) if truncate and model_rows else None
    return inputs, truncate_rows
