"""One parameter's per-example gradients for a batch, kept in the factored form the hooks deliver.

Viewed as a (rows, cols) matrix, example b's gradient G_b is the SUM of one or more terms -- one per
call of the parameter in the forward pass (tied embedding + lm_head, a module called twice):

* `DenseGrads`:  (B, rows, cols) already materialised (norms, biases: small);
* `OuterGrads`:  left_b^T right_b summed over tokens (Linear / Conv1D / LoRA dense weights);
* `RowGrads`:    a few rows per example (Embedding: the rows of the tokens example b holds);
* `ExpertGrads`: a 3-D fused-experts parameter (E, rows, cols): one `OuterGrads` per expert hit.

`add_squared_sum` squares ``sum(terms)`` in row blocks of bounded size, so a tied V x H matrix never
needs the B x V x H per-example buffer (8 GB for Llama-3.2-1B at batch 8). It is also how a GPU
squares a single linear-map term (one batched matmul per block); CPUs take
`outer_squares.add_per_example` for that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from mergekit_fisher.math import working_dtype


@dataclass
class DenseGrads:
    per_example: torch.Tensor  # (B, *shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.per_example.dtype

    def add_block(self, out: torch.Tensor, start: int, stop: int) -> None:
        out.add_(self.per_example.reshape(out.shape[0], -1, out.shape[2])[:, start:stop])


@dataclass
class OuterGrads:
    left: torch.Tensor  # (B, T, rows)
    right: torch.Tensor  # (B, T, cols)

    @property
    def dtype(self) -> torch.dtype:
        return self.right.dtype

    def block(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of every example's G_b, (B, stop - start, cols), freshly allocated."""
        return torch.bmm(
            self.left[:, :, start:stop].transpose(1, 2).to(dtype), self.right.to(dtype)
        )

    def add_block(self, out: torch.Tensor, start: int, stop: int) -> None:
        out.baddbmm_(
            self.left[:, :, start:stop].transpose(1, 2).to(out.dtype), self.right.to(out.dtype)
        )


@dataclass
class RowGrads:
    """Row `rows[k]` of example `examples[k]`'s gradient is `values[k]`; each (example, row) pair
    once."""

    examples: torch.Tensor  # (K,)
    rows: torch.Tensor  # (K,)
    values: torch.Tensor  # (K, cols)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def split(self, edges: List[int]) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Entries falling in each row block [edges[i], edges[i+1]), rows made block-local."""
        order = torch.argsort(self.rows)
        rows, examples, values = self.rows[order], self.examples[order], self.values[order]
        bounds = torch.searchsorted(rows, torch.tensor(edges, device=rows.device)).tolist()
        return [
            (examples[lo:hi], rows[lo:hi] - start, values[lo:hi])
            for start, lo, hi in zip(edges, bounds, bounds[1:])
        ]

    @staticmethod
    def add_block(out: torch.Tensor, part: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        examples, local_rows, values = part
        if examples.numel():
            block = out.shape[1]
            out.view(-1, out.shape[2]).index_add_(
                0, examples * block + local_rows, values.to(out.dtype)
            )


@dataclass
class ExpertGrads:
    """Slice [e] of example b's gradient is `terms[e]`'s G_b (OuterGrads, tokens routed to e
    grouped by example); experts absent got no token."""

    terms: List[Tuple[int, OuterGrads]]

    @staticmethod
    def merged(parts: Sequence["ExpertGrads"]) -> Dict[int, OuterGrads]:
        """Several calls' terms, summed per expert: a sum of outer products over tokens is one
        outer product over the concatenated tokens (summed, then squared)."""
        by_expert: Dict[int, List[OuterGrads]] = {}
        for part in parts:
            for expert, term in part.terms:
                by_expert.setdefault(expert, []).append(term)
        return {
            expert: terms[0]
            if len(terms) == 1
            else OuterGrads(
                torch.cat([t.left for t in terms], 1), torch.cat([t.right for t in terms], 1)
            )
            for expert, terms in by_expert.items()
        }


def on_device(term, device: torch.device):
    """The same term with its tensors on `device` (a model spread by --device-map runs calls
    elsewhere)."""
    return dataclasses.replace(
        term, **{f.name: getattr(term, f.name).to(device) for f in dataclasses.fields(term)}
    )


def add_squared_sum(
    target: torch.Tensor, terms: Sequence, weights: torch.Tensor, budget: int
) -> None:
    """``target += sum_b w_b * (sum of the terms' G_b)**2``, in row blocks of at most `budget`
    elements of the (B, rows, cols) per-example gradients: summed, THEN squared -- (a+b)**2 != a**2
    + b**2."""
    rows = target.shape[0] if target.dim() else 1
    cols = target.numel() // rows
    batch, device = weights.numel(), target.device
    dtype = working_dtype(terms[0].dtype)
    # a linear-map term first: its batched matmul allocates the block, the others add to it
    terms = sorted(
        (on_device(term, device) for term in terms),
        key=lambda term: not isinstance(term, OuterGrads),
    )
    block = max(1, min(rows, budget // max(1, batch * cols)))
    edges = list(range(0, rows, block)) + [rows]
    row_parts = {id(term): term.split(edges) for term in terms if isinstance(term, RowGrads)}
    w = weights.to(device=device, dtype=dtype).unsqueeze(0)
    target_2d = target.view(rows, cols)
    for i, (start, stop) in enumerate(zip(edges, edges[1:])):
        first = terms[0]
        if isinstance(first, OuterGrads):
            out, rest = first.block(start, stop, dtype), terms[1:]
        else:
            out, rest = torch.zeros(batch, stop - start, cols, dtype=dtype, device=device), terms
        for term in rest:
            if isinstance(term, RowGrads):
                RowGrads.add_block(out, row_parts[id(term)][i])
            else:
                term.add_block(out, start, stop)
        total = w.matmul(out.square_().reshape(batch, -1)).reshape(stop - start, cols)
        target_2d[start:stop].add_(total.to(target.dtype))
