"""`compute --statistic gram`: the Gram matrix Σ xᵀx of every linear layer's inputs, for RegMean.

Forward passes only (no gradients): a forward pre-hook on every nn.Linear / HF Conv1D whose weight
is a selected parameter adds xᵀx of the rows of its input that belong to non-padding tokens, and
counts those rows. A LoRA layer's base Linear receives the layer's input x (peft calls
``base_layer(x)``), so a LoRA-wrapped layer gets the Gram of its input under the base weight's name
-- what `merge_method: regmean` needs for the merged weight W0 + BA of a `base+adapter` model; the
adapter's own lora_A / lora_B are not selected parameters in the dense space.

Which rows count, by the input's shape: (B, T, ..., in) with the batch's (B, T) -> the rows where
the attention mask is 1; (B, in) -> every row (one per example: a pooled classification head);
anything else (inputs routed token by token, e.g. MoE experts) -> every row it was given. A Linear
whose weight is an embedding's too (a tied LM head) gets no Gram: the merge would otherwise apply
the head's least-squares solution to the embedding table.

Layers that read the very same input tensor (q/k/v, gate/up) get bit-identical sums: the file
stores such a Gram once and maps the other names to it (`gram_shared`, see `fisher_file/gram.py`).

`GramEngine` has the runner's engine interface (`step`, `accumulator.sums` / `load_state`,
`close`, `fallback_keys`), so reduction over processes, checkpoints and resume are the Fisher's.
Counts travel in `accumulator.sums` as float64 scalars under `count_key(key)`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.estimator.data import Batch
from mergekit_fisher.estimator.engine import accepted_inputs

COUNT_PREFIX = "count::"


def count_key(key: str) -> str:
    return COUNT_PREFIX + key


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return (Conv1D,)


def gram_layers(model: nn.Module, keys: Dict[int, str]) -> Dict[str, Tuple[nn.Module, bool]]:
    """key -> (module, transposed) for every Linear / Conv1D whose weight is selected by `keys`
    (id(param) -> key), tied embedding weights excepted. `transposed`: weight stored [in, out]."""
    conv1d = _conv1d_type()
    embedded = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    layers: Dict[str, Tuple[nn.Module, bool]] = {}
    for module in model.modules():
        if not isinstance(module, (nn.Linear, *conv1d)):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) not in keys:
            continue
        if id(weight) in embedded:
            continue
        key = keys[id(weight)]
        if key in layers:
            continue  # one module object reached twice (shared): its input is the same
        layers[key] = (module, isinstance(module, conv1d))
    return layers


class GramAccumulator:
    """`sums[key]`: Σ xᵀx ([in, in], accumulator dtype); `sums[count_key(key)]`: rows (float64)."""

    def __init__(self, widths: Dict[str, int], *, dtype: torch.dtype, devices):
        self.dtype = dtype
        self.sums: Dict[str, torch.Tensor] = {}
        for key, width in widths.items():
            self.sums[key] = torch.zeros((width, width), dtype=dtype, device=devices[key])
            self.sums[count_key(key)] = torch.zeros((), dtype=torch.float64, device=devices[key])

    def add(self, key: str, rows: torch.Tensor) -> None:
        target = self.sums[key]
        rows = rows.to(device=target.device, dtype=self.dtype)
        target.addmm_(rows.T, rows)
        self.sums[count_key(key)].add_(rows.shape[0])

    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            target = self.sums[key]
            target.copy_(value.to(target.device, target.dtype))


class GramEngine:
    def __init__(
        self,
        model: nn.Module,
        *,
        keys: Dict[int, str],
        accumulator_dtype: torch.dtype = torch.float32,
        model_name: str = "model",
    ):
        model.requires_grad_(False)
        self.model = model
        self.model_name = model_name
        self.layers = gram_layers(model, keys)
        if not self.layers:
            raise FisherInputError(
                "no linear layer (nn.Linear or Conv1D) among the selected parameters: nothing to "
                "take a Gram of",
                model=model_name,
                fix="check --params / --lora; RegMean merges linear layers",
            )
        self.accumulator = GramAccumulator(
            {key: self._width(module, t) for key, (module, t) in self.layers.items()},
            dtype=accumulator_dtype,
            devices={key: module.weight.device for key, (module, _) in self.layers.items()},
        )
        self.accepted = accepted_inputs(model)
        self._mask: Optional[torch.Tensor] = None
        self._handles = [
            module.register_forward_pre_hook(self._hook(key), with_kwargs=True)
            for key, (module, _) in self.layers.items()
        ]
        self.num_examples = 0
        self.num_tokens = 0

    @staticmethod
    def _width(module: nn.Module, transposed: bool) -> int:
        return module.weight.shape[0] if transposed else module.weight.shape[1]

    def transposed_keys(self) -> List[str]:
        return sorted(key for key, (_, transposed) in self.layers.items() if transposed)

    def _hook(self, key: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor) and self._mask is not None:
                self.accumulator.add(key, self._rows(x.detach()))

        return hook

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        width = x.shape[-1]
        if x.ndim >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            keep = mask.to(device=x.device, dtype=torch.bool)
            return x[keep].reshape(-1, width)
        return x.reshape(-1, width)

    def step(self, batch: Batch) -> int:
        """Add one batch's Grams; returns its number of non-padding tokens."""
        inputs = {
            name: value
            for name, value in batch.model_inputs().items()
            if name in ("input_ids", "attention_mask") or name in self.accepted
        }
        self._mask = batch.attention_mask
        try:
            with torch.no_grad():
                self.model(**inputs)
        finally:
            self._mask = None
        tokens = int(batch.attention_mask.sum())
        self.num_examples += len(batch.indices)
        self.num_tokens += tokens
        return tokens

    def fallback_keys(self) -> List[str]:
        return []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def check_gram_options(opts) -> None:
    """`--statistic gram` with the compute options (runner's `_validate`)."""
    from mergekit_fisher.choices import Space, Statistic

    if opts.statistic not in Statistic.values():
        raise FisherInputError(
            f"unknown --statistic {opts.statistic!r}", fix=f"use {' or '.join(Statistic.values())}"
        )
    if opts.statistic == Statistic.GRAM and opts.space == Space.ADAPTER:
        raise FisherInputError(
            "--statistic gram takes the Grams of the dense layers' inputs; --space adapter names "
            "tensors after lora_A / lora_B",
            fix="use --space dense (the default): a LoRA layer's Gram is stored under its base "
            "weight's name, for merging `base+adapter` models",
        )


def gram_outputs(
    sums: Dict[str, torch.Tensor],
    names: Dict[str, List[str]],
    transposed: List[str],
    model_name: str = "model",
) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Reduced sums -> (tensors by output name, the config fields of a Gram file). Every process
    calls it, so all of them stop alike on a non-finite Gram."""
    tensors: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    flipped: List[str] = []
    for key, value in sums.items():
        if key.startswith(COUNT_PREFIX):
            continue
        if not bool(torch.isfinite(value).all()):
            raise FisherInputError(
                "non-finite (NaN/Inf) layer inputs",
                model=model_name,
                tensor=names[key][0],
                fix="check the model weights and data; try --dtype float32 if the model ran in "
                "half precision",
            )
        count = int(round(float(sums[count_key(key)])))
        if count < 1:
            continue  # a layer the data never reached (an unused head): no Gram, averaged
        for name in names[key]:
            tensors[name] = value
            counts[name] = count
            if key in transposed:
                flipped.append(name)
    shared = shared_inputs(tensors, counts)
    for name in shared:
        del tensors[name]
    fields = {"statistic": "gram", "gram_counts": counts}
    if flipped:
        fields["gram_transposed"] = sorted(flipped)
    if shared:
        fields["gram_shared"] = shared
    return tensors, fields


def shared_inputs(tensors: Dict[str, torch.Tensor], counts: Dict[str, int]) -> Dict[str, str]:
    """{name: earlier name} for Grams identical to an earlier one of the same module (q/k/v and
    gate/up read the very same input tensor, so their sums are bit for bit equal): stored once."""
    by_parent: Dict[str, List[str]] = {}
    for name in tensors:
        by_parent.setdefault(name.rsplit(".", 2)[0], []).append(name)
    shared: Dict[str, str] = {}
    for group in by_parent.values():
        kept: List[str] = []
        for name in group:
            twin = next(
                (
                    other
                    for other in kept
                    if counts[other] == counts[name]
                    and tensors[other].shape == tensors[name].shape
                    and torch.equal(tensors[other], tensors[name])
                ),
                None,
            )
            if twin is None:
                kept.append(name)
            else:
                shared[name] = twin
    return shared
