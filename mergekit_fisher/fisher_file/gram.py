"""Gram files: RegMean's statistic in the Fisher file container (format v1, `statistic: gram`).

A Gram file has the layout of a Fisher file (a directory with ``fisher_config.json`` and
``fisher.safetensors`` or its shards, or one ``.safetensors`` with the config in its header) and is
read and written by the same reader and writer. A reader tells the two apart by the config's
``statistic``: ``gram`` for a Gram file; ``fisher`` or absent (files written before Gram files
existed) for a Fisher file. What differs:

* each tensor is the **sum** over the data's non-padding tokens of xᵀx for the inputs x of one
  linear layer (nn.Linear, HF Conv1D, LoRA-wrapped ones), shape [in, in], stored under the name of
  that layer's weight (the checkpoint's name, `naming.py`); only linear layers have one;
* ``gram_counts[name]``: the number of input rows summed into it (sum / count is the mean Gram the
  merge uses, so models measured on different amounts of data weigh alike);
* ``gram_transposed``: the weights stored [in, out] (HF Conv1D), whose input is their first axis;
* ``gram_shared``: ``{weight name: stored name}`` for layers that read the same input as another
  (q/k/v, gate/up): their Gram is identical and stored once, under the other layer's name;
* values are symmetric, finite, with a diagonal >= 0; off-diagonal entries may be negative.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mergekit_fisher.choices import Statistic
from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file.reader import FisherFile

GRAM_FIX = "compute it with `mergekit-fisher compute MODEL OUT --data DATA --statistic gram`"
# bf16 storage rounds G[i, j] and G[j, i] separately: allow that much asymmetry (relative to the
# largest diagonal entry, which bounds every |G[i, j]| by Cauchy-Schwarz)
SYMMETRY_TOLERANCE = 1e-2


def statistic_of(fisher_file: FisherFile) -> Statistic:
    config = fisher_file.config
    value = getattr(config, "statistic", None) if config is not None else None
    return Statistic(value) if value else Statistic.FISHER


def is_gram(fisher_file: FisherFile) -> bool:
    return statistic_of(fisher_file) == Statistic.GRAM


def check_is_gram(fisher_file: FisherFile, model: Optional[str] = None) -> None:
    if not is_gram(fisher_file):
        raise FisherInputError(
            "this is a Fisher file, not a Gram file (its fisher_config.json has no "
            "`statistic: gram`); regmean needs the Gram matrices of each linear layer's inputs",
            model=model,
            file=fisher_file.path,
            kind="Gram file",
            fix=GRAM_FIX,
        )


def check_is_fisher(fisher_file: FisherFile, model: Optional[str] = None) -> None:
    if is_gram(fisher_file):
        raise FisherInputError(
            "this is a Gram file (statistic: gram, for `merge_method: regmean`), not a Fisher file",
            model=model,
            file=fisher_file.path,
            fix="pass it as `gram:` to a regmean merge, or compute a Fisher with "
            "`mergekit-fisher compute` (the default --statistic fisher)",
        )


def shared_names(fisher_file: FisherFile) -> dict:
    return dict(getattr(fisher_file.config, "gram_shared", None) or {})


def locate_gram(fisher_file: FisherFile, *candidates: str) -> Optional[tuple]:
    """(the candidate found, the tensor that holds its Gram) for the first candidate the file has
    a Gram for -- stored under its own name or, through `gram_shared`, another's; else None."""
    shared = shared_names(fisher_file)
    for name in candidates:
        if name in fisher_file:
            return name, name
        if name in shared:
            return name, shared[name]
    return None


def check_shared(fisher_file: FisherFile) -> None:
    """Every `gram_shared` entry points at a stored tensor (a name of the file)."""
    for name, stored in shared_names(fisher_file).items():
        if not isinstance(stored, str) or stored not in fisher_file:
            raise FisherInputError(
                f"gram_shared maps this layer to {stored!r}, which the file does not store",
                file=fisher_file.path,
                tensor=name,
                kind="Gram file",
                fix=f"the config was edited or is incomplete: recompute it ({GRAM_FIX})",
            )


def input_axis(fisher_file: FisherFile, name: str) -> int:
    """The axis of the layer's weight that its input multiplies: 1 for nn.Linear, 0 for Conv1D."""
    transposed = getattr(fisher_file.config, "gram_transposed", None) or ()
    return 0 if name in transposed else 1


def gram_count(fisher_file: FisherFile, name: str) -> int:
    counts = getattr(fisher_file.config, "gram_counts", None) or {}
    count = counts.get(name)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise FisherInputError(
            f"no positive row count for this Gram in fisher_config.json `gram_counts` "
            f"(got {count!r})",
            file=fisher_file.path,
            tensor=name,
            kind="Gram file",
            fix=f"the config was edited or is incomplete: recompute it ({GRAM_FIX})",
        )
    return count


def check_gram_values(values: torch.Tensor, *, file: str, tensor: str) -> None:
    """Square, finite, symmetric, diagonal >= 0: what an XᵀX is."""
    where = {"file": file, "tensor": tensor, "kind": "Gram file"}
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise FisherInputError(
            f"a Gram matrix is square, this tensor has shape {tuple(values.shape)}",
            fix=f"recompute the Gram file ({GRAM_FIX})",
            **where,
        )
    if not math.isfinite(float(values.sum(dtype=torch.float64))):
        bad = int((~torch.isfinite(values)).sum())
        raise FisherInputError(
            f"{bad} non-finite (NaN/Inf) Gram value(s)",
            fix="recompute it; check the model for NaN/Inf weights and use --dtype float32",
            **where,
        )
    diagonal = values.diagonal()
    if values.numel() and float(diagonal.min()) < 0:
        raise FisherInputError(
            f"{int((diagonal < 0).sum())} negative diagonal value(s): a Gram's diagonal is a sum "
            "of squares",
            fix=f"recompute the Gram file ({GRAM_FIX})",
            **where,
        )
    if values.numel():
        scale = float(diagonal.max())
        asymmetry = float((values - values.T).abs().max())
        if asymmetry > SYMMETRY_TOLERANCE * scale:
            raise FisherInputError(
                f"not symmetric (max |G - Gᵀ| = {asymmetry:.3g}, largest diagonal {scale:.3g})",
                fix=f"recompute the Gram file ({GRAM_FIX})",
                **where,
            )


def read_gram(fisher_file: FisherFile, name: str, *, check: bool = True) -> torch.Tensor:
    """One stored Gram sum, float32 on the CPU (values checked unless `check=False`)."""
    values = fisher_file.get_tensor(name, check=False)
    if check:
        check_gram_values(values, file=fisher_file.path, tensor=name)
    return values


def mean_gram(fisher_file: FisherFile, name: str, *, check: bool = True) -> torch.Tensor:
    """Sum / count: the mean Gram per input row (float64, CPU)."""
    values = read_gram(fisher_file, name, check=check)
    return values.to(torch.float64) / gram_count(fisher_file, name)


def scan_gram_file(fisher_file: FisherFile) -> None:
    """Every tensor's values and count, once per opened file (plan time, before any merging)."""
    if fisher_file.values_checked:
        return
    check_shared(fisher_file)
    for name in fisher_file.names():
        read_gram(fisher_file, name, check=True)
        gram_count(fisher_file, name)
    fisher_file.values_checked = True
