"""Per-example gradients for a whole batch from ONE backward pass, squared and summed layer by layer.

A forward hook keeps each covered module's input; a tensor hook on its output receives delta = dL/d(output)
during backward. Because the batch loss is the SUM of per-example losses and examples do not interact,
delta[b] is example b's own output gradient, so the per-example weight gradient is
``G_b = sum_t delta_bt^T x_bt`` (Linear), a scatter of delta rows (Embedding), ``sum_t delta_bt * x_hat_bt``
(norms). We square G_b -- never a batch-summed gradient -- and add ``w_b * G_b**2`` to the accumulator.

A parameter used by several calls (tied embeddings / lm_head, a module called twice) gets its per-example
contributions held (in factored form, see gradient_terms) until the backward pass has delivered all of them,
then SUMMED, and only then squared: (a+b)**2 != a**2 + b**2.

Parameters keep ``requires_grad=False``; the first covered module whose output does not yet require grad
turns its output into a leaf, and ``torch.autograd.grad`` w.r.t. those leaves drives the backward pass,
so no ``.grad`` buffers are ever allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from mergekit_fisher.estimator.accumulator import FisherAccumulator
from mergekit_fisher.estimator.gradient_terms import DenseGrads, OuterGrads, RowGrads
from mergekit_fisher.math import working_dtype


def _flat_tokens(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
    """(B, ..., *trailing dims) -> (B, T, prod(trailing))."""
    batch = tensor.shape[0]
    tail = 1
    for size in tensor.shape[tensor.dim() - trailing:]:
        tail *= size
    return tensor.reshape(batch, -1, tail)


class Handler:
    """Knows how one module type turns (input, output gradient) into per-example parameter gradients."""

    def __init__(self, module: torch.nn.Module, keys: Dict[str, str], params: Dict[str, torch.nn.Parameter]):
        self.module = module
        self.keys = keys  # role ("weight", "bias") -> accumulator key
        self.params = params  # role -> parameter
        self.batchless = False  # set by `probe_batch_dependence`: output not indexed by example

    def saved_input(self, args, kwargs) -> torch.Tensor:
        return args[0] if args else next(iter(kwargs.values()))

    def contribute(self, x: torch.Tensor, delta: torch.Tensor, sink: "GradientSink") -> None:
        raise NotImplementedError


class LinearHandler(Handler):
    """nn.Linear (weight O x I), HF Conv1D (weight I x O, `transposed`), and LoRA wrappers as dense W0+BA."""

    def __init__(self, module, keys, params, *, transposed: bool = False):
        super().__init__(module, keys, params)
        self.transposed = transposed

    def contribute(self, x, delta, sink):
        dtype = working_dtype(delta.dtype)
        x = _flat_tokens(x, 1).to(dtype)  # (B, T, I)
        delta = _flat_tokens(delta, 1).to(dtype)  # (B, T, O)
        if "bias" in self.keys:
            sink.add(self.keys["bias"], DenseGrads(delta.sum(1)))
        if "weight" not in self.keys:
            return
        key = self.keys["weight"]
        # rows of the stored weight: O for Linear, I for Conv1D
        left, right = (x, delta) if self.transposed else (delta, x)
        sink.add(key, OuterGrads(left, right))


class EmbeddingHandler(Handler):
    """nn.Embedding: example b's gradient row v is the sum of delta over b's positions holding token v."""

    def contribute(self, ids, delta, sink):
        module = self.module
        key = self.keys["weight"]
        dtype = working_dtype(delta.dtype)
        batch = delta.shape[0]
        vocab, hidden = module.weight.shape
        ids = ids.reshape(batch, -1).to(delta.device)
        delta = delta.reshape(batch, -1, hidden).to(dtype)
        example = torch.arange(batch, device=delta.device).unsqueeze(1).expand_as(ids)
        flat_keys = (example * vocab + ids).reshape(-1)
        flat_delta = delta.reshape(-1, hidden)
        if module.padding_idx is not None:  # nn.Embedding never updates its padding row
            keep = ids.reshape(-1) != module.padding_idx
            flat_keys, flat_delta = flat_keys[keep], flat_delta[keep]
        unique, inverse = torch.unique(flat_keys, return_inverse=True)
        rows = torch.zeros(unique.numel(), hidden, dtype=dtype, device=delta.device)
        rows.index_add_(0, inverse, flat_delta)
        sink.add(key, RowGrads(examples=unique // vocab, rows=unique % vocab, values=rows))


class NormHandler(Handler):
    """Elementwise-affine norms ``out = weight * x_hat (+ bias)``; `normalize` recomputes x_hat from the input."""

    def __init__(self, module, keys, params, *, normalize: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(module, keys, params)
        self.normalize = normalize

    def contribute(self, x, delta, sink):
        dtype = working_dtype(delta.dtype)
        shape = next(iter(self.params.values())).shape
        trailing = len(shape)
        delta32 = _flat_tokens(delta, trailing).to(dtype)
        batch = delta.shape[0]
        if "weight" in self.keys:
            with torch.no_grad():
                x_hat = _flat_tokens(self.normalize(x), trailing).to(dtype)
            sink.add(self.keys["weight"], DenseGrads((delta32 * x_hat).sum(1).reshape(batch, *shape)))
        if "bias" in self.keys:
            sink.add(self.keys["bias"], DenseGrads(delta32.sum(1).reshape(batch, *shape)))


@dataclass
class _Call:
    handler: Handler
    saved: torch.Tensor


@dataclass
class _PassState:
    weights: torch.Tensor
    received: Dict[str, int] = field(default_factory=dict)
    terms: Dict[str, list] = field(default_factory=dict)


class GradientSink:
    """Routes per-example gradient terms: straight into the accumulator, or -- for a parameter used by
    several calls -- held until the last call has delivered its term, then summed and squared."""

    def __init__(self, capture: "PerExampleCapture"):
        self.capture = capture

    def add(self, key: str, term) -> None:
        capture = self.capture
        if key in capture.broadcast:
            return
        state = capture.pass_state
        if capture.uses.get(key, 0) <= 1:
            capture.accumulator.add_terms(key, [term], state.weights)
            return
        state.terms.setdefault(key, []).append(term)
        state.received[key] = state.received.get(key, 0) + 1
        if state.received[key] == capture.uses[key]:
            capture.accumulator.add_terms(key, state.terms.pop(key), state.weights)


class PerExampleCapture:
    """Installs the hooks for `handlers`; drives one forward + several weighted backward passes."""

    def __init__(self, handlers: List[Handler], accumulator: FisherAccumulator):
        self.handlers = handlers
        self.accumulator = accumulator
        self.sink = GradientSink(self)
        self.active = False
        self.calls: List[_Call] = []
        self.leaves: List[torch.Tensor] = []
        self.uses: Dict[str, int] = {}
        self.pass_state: Optional[_PassState] = None
        self.batch_size = 0
        # keys of calls whose output has no per-example batch dimension (e.g. GPT-2's position embedding,
        # computed once and broadcast over the batch): their gradient is a batch sum, so the runner sends
        # them to the exact fallback -- from the batch where this is first seen on, for good
        self.broadcast: set = set()
        self._handles = []
        for handler in handlers:
            self._handles.append(
                handler.module.register_forward_hook(self._forward_hook(handler), with_kwargs=True)
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---------------------------------------------------------------- forward
    def _forward_hook(self, handler: Handler):
        def hook(module, args, kwargs, output):
            if not self.active or not isinstance(output, torch.Tensor):
                return None
            saved = handler.saved_input(args, kwargs).detach()
            replaced = False
            if handler.batchless:
                self.broadcast.update(handler.keys.values())
                return None
            if output.dim() and output.shape[0] == 1 != self.batch_size and saved.dim() and saved.shape[0] == 1:
                # computed once for the whole batch and broadcast (GPT-2 position embeddings): hand the
                # model an expanded view instead, so that its gradient arrives per example
                output = output.expand(self.batch_size, *output.shape[1:])
                saved = saved.expand(self.batch_size, *saved.shape[1:])
                replaced = True
            elif output.dim() == 0 or output.shape[0] != self.batch_size:
                self.broadcast.update(handler.keys.values())
                return None
            call = _Call(handler, saved)
            self.calls.append(call)
            for key in handler.keys.values():
                self.uses[key] = self.uses.get(key, 0) + 1
            if not output.requires_grad:
                # nothing upstream needs a gradient (params are frozen): start the graph here
                output.requires_grad_(True)
                self.leaves.append(output)
            output.register_hook(lambda delta, call=call: self._on_output_grad(call, delta))
            return output if replaced else None

        return hook

    def begin_forward(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.calls.clear()
        self.leaves.clear()
        self.uses.clear()
        self.active = True

    def end_forward(self) -> None:
        self.active = False

    def release(self) -> None:
        self.calls.clear()
        self.leaves.clear()
        self.uses.clear()
        self.pass_state = None

    # ---------------------------------------------------------------- backward
    def _on_output_grad(self, call: _Call, delta: torch.Tensor) -> None:
        if self.pass_state is None:
            return None
        call.handler.contribute(call.saved, delta.detach(), self.sink)
        return None

    def backward(self, loss: torch.Tensor, weights: torch.Tensor, *, retain_graph: bool) -> None:
        """One weighted pass: every per-example gradient of `loss` squared, times weights[b], accumulated."""
        if not self.leaves:
            return
        self.pass_state = _PassState(weights=weights.detach())
        try:
            torch.autograd.grad(loss, self.leaves, retain_graph=retain_graph, allow_unused=True)
            # shared parameters whose other uses got no gradient (unused outputs): complete now
            for key, terms in list(self.pass_state.terms.items()):
                self.accumulator.add_terms(key, terms, self.pass_state.weights)
        finally:
            self.pass_state = None


@torch.no_grad()
def probe_batch_dependence(model: torch.nn.Module, handlers: List[Handler], device, vocab_size: int) -> None:
    """Mark handlers whose outputs are not indexed by example (computed from parameters/buffers only).

    Shapes alone cannot tell a (3, H) table from a batch of 3, so run two tiny dummy batches (2 and 3
    examples) and watch each covered module's leading output dimension: it must follow the batch size,
    or be 1 in both (computed once and broadcast; expanded at run time); anything else falls back.
    """
    seen: Dict[int, List[int]] = {id(h): [] for h in handlers}
    hooks = [h.module.register_forward_hook(
        lambda _m, _a, out, key=id(h): seen[key].append(out.shape[0] if isinstance(out, torch.Tensor) and out.dim()
                                                      else -1)) for h in handlers]
    ids = torch.arange(4, device=device).remainder(max(1, vocab_size)).unsqueeze(0)
    try:
        for batch in (2, 3):
            model(input_ids=ids.expand(batch, -1), attention_mask=torch.ones_like(ids).expand(batch, -1))
            for h in handlers:
                seen[id(h)].append(-batch)  # marker: end of this batch
    except Exception:  # a model that cannot run the dummy batch: keep the run-time shape checks only
        return
    finally:
        for handle in hooks:
            handle.remove()
    for h in handlers:
        dims, batch, ok = seen[id(h)], 2, True
        for value in dims:
            if value < -1:  # marker
                batch = 3
                continue
            if value not in (batch, 1):
                ok = False
        h.batchless = not ok
