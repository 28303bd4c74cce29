"""Plan-time resolution and lazy loading of each input's Gram for `merge_method: regmean`.

The counterpart of `resolution` + `tasks` for Fisher methods: `regmean_merge_task` (called by
`tasks.fisher_aware_merge_task`, which mergekit's planner calls in place of
`ExecuteMergeMethodTask`) resolves, at plan time, which Gram of which file serves each input of one
output tensor -- under the input's stored name, aliases and tied names (`naming.load_candidates`) --
and checks everything checkable without merging: `gram:` is given and names a Gram file (not a
Fisher file), provenance, every value (`gram_validate: full`), the Gram's shape against the weight's
input dimension, and that either every input has a Gram for the tensor or none has.
`LoadGramTensors` is a declared graph argument of `GramMergeTask`, so mergekit's executor schedules,
moves (`--cuda`) and frees Grams like model tensors.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from pydantic import BaseModel

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file import FisherFile, open_fisher
from mergekit_fisher.fisher_file.gram import (
    GRAM_FIX,
    check_is_gram,
    check_shared,
    gram_count,
    input_axis,
    locate_gram,
    mean_gram,
    scan_gram_file,
)
from mergekit_fisher.hub import resolve_fisher_path
from mergekit_fisher.merge.loader_task import LoaderTask
from mergekit_fisher.merge.provenance import check_provenance
from mergekit_fisher.merge.regmean import (
    GRAM,
    PROVENANCE,
    VALIDATE,
    GramValidation,
    check_regmean_shared,
    no_gram,
)
from mergekit_fisher.merge.resolution import _model_tensor

KIND = "Gram file"


class GramInput(BaseModel, frozen=True):
    path: str
    tensor: Optional[str]  # None: this output tensor has no Gram (weighted average)


def open_gram_for_model(path, model: ModelReference) -> FisherFile:
    if path is not None and not isinstance(path, str):
        raise FisherInputError(
            f"`gram:` must be a path to a Gram file or directory, got {path!r}",
            model=str(model),
            kind="recipe",
            fix="write the path as a string under this model's `parameters:`",
        )
    if not path:
        raise FisherInputError(
            "no Gram file given for this model (merge method regmean)",
            model=str(model),
            kind="recipe",
            fix=f"add `gram: /path/to/gram` under this model's `parameters:` ({GRAM_FIX})",
        )
    try:
        gram_file = open_fisher(resolve_fisher_path(path, kind=KIND))
    except FisherInputError as error:
        raise FisherInputError(
            error.problem.replace("Fisher file", "Gram file"),
            fix=error.fix,
            model=error.model or str(model),
            file=error.file,
            tensor=error.tensor,
            kind=KIND,
        ) from None
    check_is_gram(gram_file, str(model))
    return gram_file


def _checked_gram_file(model, input_parameters, shared) -> FisherFile:
    gram_file = open_gram_for_model(input_parameters[model].get(GRAM), model)
    check_provenance(gram_file, model, shared[PROVENANCE])
    try:
        if shared[VALIDATE] == GramValidation.FULL:
            scan_gram_file(gram_file)
        else:
            check_shared(gram_file)
            for name in gram_file.names():
                gram_count(gram_file, name)
    except FisherInputError as error:
        raise FisherInputError(
            error.problem,
            fix=error.fix,
            model=str(model),
            file=error.file,
            tensor=error.tensor,
            kind=KIND,
        ) from None
    return gram_file


def resolve_gram_inputs(
    *,
    weight_info: Mapping[ModelReference, object],
    model_order: Sequence[ModelReference],
    shared_parameters: Dict,
    input_parameters: Mapping[ModelReference, Mapping],
    output_name: str,
) -> Tuple[Dict[ModelReference, GramInput], int]:
    """({model: GramInput}, the weight's input axis) for one output tensor."""
    check_regmean_shared(shared_parameters)
    # model -> (its Gram file, (name found, tensor holding its Gram) or None, the weight's shape)
    found: Dict[ModelReference, Tuple[FisherFile, Optional[tuple], Optional[tuple]]] = {}
    for model in model_order:
        info = weight_info[model]
        tensor = _model_tensor(model, info)
        if tensor is None:
            continue  # an optional weight this model lacks: mergekit's policy decides
        gram_file = _checked_gram_file(model, input_parameters, shared_parameters)
        stored = None
        if tensor.model_type is None:  # converted (fused MoE) tensors are not linear layers here
            candidates = dict.fromkeys([tensor.name, info.name, *(info.aliases or ())])
            stored = locate_gram(gram_file, *candidates)
        found[model] = (gram_file, stored, tensor.shape)
    with_gram = [model for model, (_, stored, _) in found.items() if stored]
    if with_gram and len(with_gram) < len(found):
        lacking = next(model for model, (_, stored, _) in found.items() if not stored)
        raise FisherInputError(
            f"the Gram file of {with_gram[0]} has a Gram for this tensor, this model's has none",
            model=str(lacking),
            file=found[lacking][0].path,
            tensor=output_name,
            kind=KIND,
            fix="compute every model's Gram file the same way (`--statistic gram`, same "
            "adapter options), so each linear layer has a Gram in all of them",
        )
    axis = 1
    if with_gram:
        axes = {input_axis(found[model][0], found[model][1][0]) for model in with_gram}
        if len(axes) > 1:
            raise FisherInputError(
                "the Gram files disagree on the weight's layout (`gram_transposed`)",
                tensor=output_name,
                kind=KIND,
                fix="recompute the Gram files for models of the same architecture",
            )
        (axis,) = axes
    inputs = {}
    for model, (gram_file, stored, shape) in found.items():
        if stored is not None:
            _check_shape(model, gram_file, stored[1], shape, axis)
        inputs[model] = GramInput(path=gram_file.path, tensor=stored[1] if stored else None)
    return inputs, axis


def _check_shape(model, gram_file: FisherFile, stored: str, shape, axis: int) -> None:
    gram_shape = gram_file.header(stored).shape
    if shape is None:
        return  # a pickle checkpoint: no header shapes; the kernel's solve checks them
    if len(shape) != 2:
        raise FisherInputError(
            f"the Gram file has a Gram for a tensor of shape {shape}, which is not a linear "
            "layer's 2-D weight",
            model=str(model),
            file=gram_file.path,
            tensor=stored,
            kind=KIND,
            fix=f"this Gram file was computed for another model: {GRAM_FIX}",
        )
    expected = (shape[axis], shape[axis])
    if tuple(gram_shape) != expected:
        raise FisherInputError(
            f"Gram shape {tuple(gram_shape)} does not match the weight {shape} (expected "
            f"{expected}: its input dimension squared)",
            model=str(model),
            file=gram_file.path,
            tensor=stored,
            kind=KIND,
            fix=f"this Gram file was computed for another model; recompute it ({GRAM_FIX})",
        )


class LoadGramTensors(LoaderTask, Task[Dict[ModelReference, torch.Tensor]]):
    """Each input's mean Gram (sum / count, float32, CPU) for one output tensor, or `no_gram()`."""

    inputs: ImmutableMap[ModelReference, GramInput]
    output_name: str

    def execute(self) -> Dict[ModelReference, torch.Tensor]:
        result = {}
        for model, spec in self.inputs.items():
            if spec.tensor is None:
                result[model] = no_gram()
                continue
            gram_file = open_fisher(spec.path)
            result[model] = mean_gram(gram_file, spec.tensor).to(torch.float32)
        return result


class GramMergeTask(ExecuteMergeMethodTask):
    """mergekit's merge task plus one declared argument: the inputs' loaded Grams. Weights whose
    input is their first axis (HF Conv1D, `input_axis` 0) are transposed around the kernel."""

    gram_tensors: LoadGramTensors
    input_axis: int = 1

    def arguments(self) -> Dict[str, Task]:
        return {**super().arguments(), "grams": self.gram_tensors}

    def execute(
        self, tensors: Dict[ModelReference, torch.Tensor], grams: Dict[ModelReference, torch.Tensor]
    ) -> Optional[torch.Tensor]:
        input_parameters = ImmutableMap(
            {
                model: ImmutableMap({**params, GRAM: grams[model]}) if model in grams else params
                for model, params in self.input_parameters.items()
            }
        )
        bound = self.model_copy(update={"input_parameters": input_parameters})
        transposed = self.input_axis == 0 and any(g.numel() for g in grams.values())
        if transposed:
            tensors = {model: tensor.T for model, tensor in tensors.items()}
        result = ExecuteMergeMethodTask.execute(bound, tensors=tensors)
        return result.T.contiguous() if transposed and result is not None else result


def regmean_merge_task(inner_weight_info, **kwargs) -> GramMergeTask:
    output_weight = kwargs["output_weight"]
    inputs, axis = resolve_gram_inputs(
        weight_info=inner_weight_info,
        model_order=kwargs["model_order"],
        shared_parameters=dict(kwargs["parameters"].items()),
        input_parameters=kwargs["input_parameters"],
        output_name=output_weight.name,
    )
    loader = LoadGramTensors(inputs=ImmutableMap(data=inputs), output_name=output_weight.name)
    return GramMergeTask(**kwargs, gram_tensors=loader, input_axis=axis)
