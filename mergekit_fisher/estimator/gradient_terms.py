"""One parameter's per-example gradients for a batch, kept in the factored form the hooks deliver.

Viewed as a (rows, cols) matrix, example b's gradient G_b is the SUM of one or more terms -- one per call of
the parameter in the forward pass (tied embedding + lm_head, a module called twice):

* `DenseGrads`:  (B, rows, cols) already materialised (norms, biases: small);
* `OuterGrads`:  left_b^T right_b summed over tokens (Linear / Conv1D / LoRA dense weights);
* `RowGrads`:    a few rows per example (Embedding: the rows of the tokens example b holds).

`FisherAccumulator.add_terms` squares ``sum(terms)`` block by block, so a tied V x H matrix never needs the
B x V x H per-example buffer (8 GB for Llama-3.2-1B at batch 8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Tuple

import torch


@dataclass
class DenseGrads:
    per_example: torch.Tensor  # (B, *shape)

    def add_block(self, out: torch.Tensor, start: int, stop: int) -> None:
        out.add_(self.per_example.reshape(out.shape[0], -1, out.shape[2])[:, start:stop])


@dataclass
class OuterGrads:
    left: torch.Tensor  # (B, T, rows)
    right: torch.Tensor  # (B, T, cols)

    def add_block(self, out: torch.Tensor, start: int, stop: int) -> None:
        out.baddbmm_(self.left[:, :, start:stop].transpose(1, 2).to(out.dtype), self.right.to(out.dtype))


@dataclass
class RowGrads:
    """Row `rows[k]` of example `examples[k]`'s gradient is `values[k]`; each (example, row) pair once."""

    examples: torch.Tensor  # (K,)
    rows: torch.Tensor  # (K,)
    values: torch.Tensor  # (K, cols)

    def split(self, edges: List[int]) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Entries falling in each row block [edges[i], edges[i+1]), rows made block-local."""
        order = torch.argsort(self.rows)
        rows, examples, values = self.rows[order], self.examples[order], self.values[order]
        bounds = torch.searchsorted(rows, torch.tensor(edges, device=rows.device)).tolist()
        return [(examples[lo:hi], rows[lo:hi] - start, values[lo:hi])
                for start, lo, hi in zip(edges, bounds, bounds[1:])]

    @staticmethod
    def add_block(out: torch.Tensor, part: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        examples, local_rows, values = part
        if examples.numel():
            block = out.shape[1]
            out.view(-1, out.shape[2]).index_add_(0, examples * block + local_rows, values.to(out.dtype))


def on_device(term, device: torch.device):
    """The same term with its tensors on `device` (a model spread by --device-map runs calls elsewhere)."""
    return dataclasses.replace(term, **{f.name: getattr(term, f.name).to(device) for f in dataclasses.fields(term)})


def grad_dtype(term) -> torch.dtype:
    """The dtype the term's gradients arrive in (the model's)."""
    return getattr(term, dataclasses.fields(term)[-1].name).dtype
