"""Graph tasks that bring each input's Fisher tensor to the merge kernel, lazily.

mergekit's kernels see the *output* tensor name only, but a Fisher must be looked up under each
*input's* name (slices with layer offsets, aliases, tied embeddings) and must follow mergekit's
vocabulary permutation when tokenizers are merged. The planner knows all of that when it builds
each `ExecuteMergeMethodTask`; `fisher_aware_merge_task` (installed in place of that constructor in
`mergekit.plan` by `registry.patch_planner`) builds a `FisherMergeTask` instead for Fisher methods.

The data flow is the graph's own: `LoadFisherTensors` (optionally wrapped by
`PermuteFisherVocabulary`) is a declared argument of `FisherMergeTask`, so mergekit's executor
schedules, moves (`--cuda`) and frees Fisher tensors exactly like model tensors; `FisherMergeTask`
then binds them to the kernel's per-input `fisher` parameter, where the recipe had the file's path.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask, TensorDictWrapper
from mergekit.tokenizer import BuildTokenizer, PermutedVocabulary, TokenizerInfo
from mergekit.tokenizer.config import TokenEmbeddingConfig
from mergekit.tokenizer.truncate import TruncatedVocabulary

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file import open_fisher
from mergekit_fisher.math import Normalization, normalize_fisher
from mergekit_fisher.merge.gram_tasks import regmean_merge_task
from mergekit_fisher.merge.loader_task import LoaderTask
from mergekit_fisher.merge.methods import is_fisher_method
from mergekit_fisher.merge.parameters import FISHER
from mergekit_fisher.merge.recipe import check_weights
from mergekit_fisher.merge.regmean import is_regmean_method
from mergekit_fisher.merge.resolution import FisherInput, resolve_fisher_inputs
from mergekit_fisher.naming import convert_stored


class LoadFisherTensors(LoaderTask, Task[Dict[ModelReference, torch.Tensor]]):
    """Read, normalize and floor the Fisher of every input of one output tensor (float32, CPU)."""

    inputs: ImmutableMap[ModelReference, FisherInput]
    normalize: str
    floor: float
    output_name: str
    vocabulary_axis: Optional[int] = None
    truncate_rows: Optional[int] = None  # --unsafe-truncate-embeddings: keep this many token rows

    def execute(self) -> Dict[ModelReference, torch.Tensor]:
        return {model: self._load(model, spec) for model, spec in self.inputs.items()}

    def _load(self, model: ModelReference, spec: FisherInput) -> torch.Tensor:
        fisher_file = open_fisher(spec.path)
        stats = fisher_file.global_stats() if self._needs_stats(spec) else None
        if spec.tensor is None:
            # A uniform Fisher at the file's own mean level: after `mean` normalization it is 1.
            raw = torch.tensor(stats.mean, dtype=torch.float32)
        else:
            raw = self._read(fisher_file, spec)
            if spec.expected_shape is not None and tuple(raw.shape) != spec.expected_shape:
                raise FisherInputError(
                    f"Fisher shape {tuple(raw.shape)} does not match the model tensor "
                    f"{spec.expected_shape}",
                    model=str(model),
                    file=spec.path,
                    tensor=spec.tensor,
                    fix="this Fisher was computed for another model; recompute it for this one",
                )
            if self.truncate_rows is not None and raw.ndim:
                raw = raw.narrow(self.vocabulary_axis, 0, self.truncate_rows)
        return normalize_fisher(
            raw,
            self.normalize,
            global_mean=stats.mean if stats else None,
            global_l2=stats.l2 if stats else None,
            floor=self.floor,
        )

    @staticmethod
    def _read(fisher_file, spec: FisherInput) -> torch.Tensor:
        if spec.model_type is None:
            return fisher_file.get_tensor(spec.tensor)
        # built from stored tensors by the checkpoint conversion, as LoadTensor builds the weight
        sources = {
            name: (lambda name=name: fisher_file.get_tensor(name)) for name in fisher_file.names()
        }
        return convert_stored(spec.model_type, sources, [spec.tensor])[1]

    def _needs_stats(self, spec: FisherInput) -> bool:
        # `tensor` normalization floors relative to the tensor's own mean; every other mode
        # scales or floors by the file's global statistics.
        return self.normalize != Normalization.TENSOR or spec.tensor is None

    def floor_levels(self) -> Dict[ModelReference, float]:
        """The floor each model's loaded Fisher carries, in its normalized units (for `explain`)."""
        levels = {}
        for model, spec in self.inputs.items():
            if self.normalize == Normalization.TENSOR:
                levels[model] = self.floor  # (F + floor·t)/t = F/t + floor, t the tensor's mean
                continue
            stats = open_fisher(spec.path).global_stats()
            zero = torch.tensor(0.0, dtype=torch.float64)
            levels[model] = float(
                normalize_fisher(
                    zero,
                    self.normalize,
                    global_mean=stats.mean,
                    global_l2=stats.l2,
                    floor=self.floor,
                )
            )
        return levels


class PermuteFisherVocabulary(Task[Dict[ModelReference, torch.Tensor]]):
    """Apply the tokenizer merge's row permutation to the Fishers, as `PermutedVocabulary` does to
    weights.

    A row whose token a model does not have (or whose embedding the recipe forces) gets Fisher 0 for
    that model: the model carries no information about it, so the other models decide (where every
    model has 0, the plain weighted average). Padding rows (pad_to_multiple_of) get 0 too.
    """

    fisher_task: LoadFisherTensors
    tokenizer_task: BuildTokenizer
    tokens: Optional[ImmutableMap[str, TokenEmbeddingConfig]] = None
    pad_to_multiple_of: Optional[int] = None
    vocabulary_axis: int

    def arguments(self) -> Dict[str, Task]:
        return {"tokenizer_info": self.tokenizer_task, "fishers": self.fisher_task}

    def uses_accelerator(self) -> bool:
        return False

    def group_label(self) -> Optional[str]:
        return self.fisher_task.group_label()

    def execute(
        self, tokenizer_info: TokenizerInfo, fishers: Dict[ModelReference, torch.Tensor]
    ) -> Dict[ModelReference, torch.Tensor]:
        vocab = tokenizer_info.tokenizer.get_vocab()
        vocab_size = len(vocab)
        if self.pad_to_multiple_of and vocab_size % self.pad_to_multiple_of:
            vocab_size = (vocab_size // self.pad_to_multiple_of + 1) * self.pad_to_multiple_of
        forced = {token for token, cfg in (self.tokens or {}).items() if cfg.force}
        result = {}
        for model, fisher in fishers.items():
            if fisher.ndim == 0:  # uniform stays uniform
                result[model] = fisher
                continue
            permutation = tokenizer_info.permutations[model]
            new_ids, old_ids = [], []
            for token, token_id in vocab.items():
                old = permutation.get(token_id, -1)
                if old >= 0 and token not in forced:
                    new_ids.append(token_id)
                    old_ids.append(old)
            rows = fisher.movedim(self.vocabulary_axis, 0)
            permuted = rows.new_zeros((vocab_size, *rows.shape[1:]))
            permuted[torch.tensor(new_ids, dtype=torch.long)] = rows[
                torch.tensor(old_ids, dtype=torch.long)
            ]
            result[model] = permuted.movedim(0, self.vocabulary_axis)
        return result


FisherSource = Union[LoadFisherTensors, PermuteFisherVocabulary]


class FisherMergeTask(ExecuteMergeMethodTask):
    """mergekit's merge task plus one declared argument: the inputs' loaded Fishers."""

    fisher_tensors: FisherSource

    def arguments(self) -> Dict[str, Task]:
        return {**super().arguments(), "fishers": self.fisher_tensors}

    def execute(
        self, tensors: Dict[ModelReference, torch.Tensor], fishers: Dict[ModelReference, Any]
    ) -> Optional[torch.Tensor]:
        # Bind each loaded Fisher to the kernel's per-input `fisher` parameter (the recipe had its
        # path there), then run mergekit's own adapter unchanged: optional-tensor policies, buffer
        # copies, dtype handling and parameter binding stay mergekit's.
        input_parameters = ImmutableMap(
            {
                model: ImmutableMap({**params, FISHER: fishers[model]})
                if model in fishers
                else params
                for model, params in self.input_parameters.items()
            }
        )
        bound = self.model_copy(update={"input_parameters": input_parameters})
        return ExecuteMergeMethodTask.execute(bound, tensors=tensors)


def fisher_aware_merge_task(**kwargs) -> ExecuteMergeMethodTask:
    """Drop-in for `ExecuteMergeMethodTask(...)` in mergekit's planner."""
    regmean = is_regmean_method(kwargs["method_name"])
    if not regmean and not is_fisher_method(kwargs["method_name"]):
        return ExecuteMergeMethodTask(**kwargs)
    gather = kwargs["gather_tensors"]
    if isinstance(gather, TensorDictWrapper):
        raise FisherInputError(
            f"{kwargs['method_name']} needs each input's checkpoint tensor names to find its "
            f"{'Gram' if regmean else 'Fisher'}, which mergekit-pytorch's raw state dicts do not "
            "carry",
            fix="save the models as Hugging Face checkpoints and merge with `mergekit-yaml` "
            "(or `mergekit-fisher merge`)",
        )
    vocabulary_gather = (PermutedVocabulary, TruncatedVocabulary)
    inner = gather.gather_tensors if isinstance(gather, vocabulary_gather) else gather
    output_weight = kwargs["output_weight"]
    shared = kwargs["parameters"]
    check_weights(
        kwargs["method_name"],
        {
            model: params["weight"]
            for model, params in kwargs["input_parameters"].items()
            if "weight" in params
        },
        shared,
        output_weight.name,
    )
    if regmean:  # the Gram is over the layer's inputs: vocabulary permutations do not touch it
        return regmean_merge_task(inner.weight_info, **kwargs)
    inputs, truncate_rows = resolve_fisher_inputs(
        method_name=kwargs["method_name"],
        weight_info=inner.weight_info,
        model_order=kwargs["model_order"],
        base_model=kwargs["base_model"],
        shared_parameters=dict(shared.items()),
        input_parameters=kwargs["input_parameters"],
        output_name=output_weight.name,
        vocabulary_axis=output_weight.vocabulary_axis,
        truncate=isinstance(gather, TruncatedVocabulary),
    )
    source: FisherSource = LoadFisherTensors(
        inputs=ImmutableMap(data=inputs),
        normalize=shared["fisher_normalize"],
        floor=shared["fisher_floor"],
        output_name=output_weight.name,
        vocabulary_axis=output_weight.vocabulary_axis,
        truncate_rows=truncate_rows,
    )
    if isinstance(gather, PermutedVocabulary):
        source = PermuteFisherVocabulary(
            fisher_task=source,
            tokenizer_task=gather.tokenizer_task,
            tokens=gather.tokens,
            pad_to_multiple_of=gather.pad_to_multiple_of,
            vocabulary_axis=gather.vocabulary_axis,
        )
    return FisherMergeTask(**kwargs, fisher_tensors=source)
