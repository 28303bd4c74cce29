"""Per-example gradients for a whole batch from ONE backward pass, squared and summed layer by
layer.

A forward hook keeps each covered module's input; a tensor hook on its output receives delta =
dL/d(output) during backward. Because the batch loss is the SUM of per-example losses and examples
do not interact, delta[b] is example b's own output gradient, so the per-example weight gradient is
``G_b = sum_t delta_bt^T x_bt`` (Linear), a scatter of delta rows (Embedding), ``sum_t delta_bt *
x_hat_bt`` (norms). We square G_b -- never a batch-summed gradient -- and add ``w_b * G_b**2`` to
the accumulator.

Which calls may take that path is decided by STRUCTURE, per call (`input_form`): the module's input
must be ``(B, ..., T, ..., features)`` -- B the batch size, T the current batch's sequence length --
or, for a sequence-classification head the plan-time probe has seen keep examples apart, ``(B,
features)``, or tokens flattened example-major, ``(B*T, features)`` (an MoE block's
``hidden.view(-1, H)``), where the probe saw every call so and a change to one example stay in that
example's T rows. Anything else (routed inputs such as ``expert(hidden[top_x])``, flattenings in
another order, batch-less tables) sends the module's parameters to the exact fallback from that
batch on. Fused MoE experts and routers: estimator/experts.py. A hook
never replaces or changes a module's output: the one batch-shared case kept on the fast path -- a
``(1, T, ...)`` output such as GPT-2's / BERT's position embeddings -- is resolved in the autograd
graph (`_resolve_shared`): when every consumer of that output is a broadcasting ``+``, the
consumer's own ``(B, ...)`` output gradient IS the per-example gradient of the shared output. Any
other consumer (DeBERTa's relative-position products) -> exact fallback.

A parameter used by several calls (tied embeddings / lm_head, a module called twice) gets its
per-example contributions held (in factored form, see gradient_terms) until the backward pass has
delivered all of them, then SUMMED, and only then squared: (a+b)**2 != a**2 + b**2.

Parameters keep ``requires_grad=False``; each covered fast-path call whose output does not yet
require grad turns its output into a leaf, and ``torch.autograd.grad`` w.r.t. those leaves drives
the backward pass, so no ``.grad`` buffers are ever allocated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from mergekit_fisher.estimator.accumulator import FisherAccumulator
from mergekit_fisher.estimator.gradient_terms import DenseGrads, OuterGrads, RowGrads
from mergekit_fisher.math import working_dtype

log = logging.getLogger(__name__)

# the forms a call's input can take (`Handler.input_form`)
EXAMPLE = "example"  # (B, ..., T, ..., features): every row belongs to one example
# (B, features): one row per example (pooled seq-cls heads), only where the probe allowed it
ROWS = "rows"
SHARED = "shared"  # (1, ..., T, ..., features) with B > 1: computed once, broadcast over the batch
# (B*T, ..., features): tokens flattened example-major (MoE blocks' `hidden.view(-1, H)`), only
# where the probe saw every call so and saw one example's change stay in that example's T rows
TOKENS = "tokens"


def _flat_tokens(tensor: torch.Tensor, trailing: int) -> torch.Tensor:
    """(B, ..., *trailing dims) -> (B, T, prod(trailing))."""
    batch = tensor.shape[0]
    tail = 1
    for size in tensor.shape[tensor.dim() - trailing :]:
        tail *= size
    return tensor.reshape(batch, -1, tail)


class Handler:
    """How one module type turns (input, output gradient) into per-example parameter gradients."""

    trailing = 1  # feature dims at the end of the input (0 for an embedding's ids)

    def __init__(
        self, module: torch.nn.Module, keys: Dict[str, str], params: Dict[str, torch.nn.Parameter]
    ):
        self.module = module
        self.keys = keys  # role ("weight", "bias") -> accumulator key
        self.params = params  # role -> parameter
        # set by `probe_structure`: (B, features) / (B*T, features) inputs keep examples apart
        self.rows_allowed = False
        self.tokens_allowed = False

    # the output whose gradient drives `contribute`: the output itself, or one element of a tuple
    # (MoE routers return (logits, scores, indices))
    output_index: Optional[int] = None

    def saved_input(self, args, kwargs):
        if args:
            return args[0]
        return next(iter(kwargs.values()), None)

    def saved_extras(self, args, kwargs, x) -> Optional[tuple]:
        """Further inputs `contribute` needs (MoE experts: the routing), detached; None: not in the
        form this handler understands (exact fallback)."""
        return ()

    def output_of(self, output):
        if self.output_index is None:
            return output
        if isinstance(output, (tuple, list)) and len(output) > self.output_index:
            return output[self.output_index]
        return None

    def input_form(self, x, batch: int, seq: int) -> Optional[str]:
        """EXAMPLE / ROWS / TOKENS / SHARED, or None (not structurally per-example: exact
        fallback)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 + self.trailing:
            return None
        tokens = x.shape[1 : x.dim() - self.trailing]
        if x.shape[0] == batch:
            if seq in tokens:
                return EXAMPLE
            if not tokens and self.trailing and self.rows_allowed:
                return ROWS
        if x.shape[0] == batch * seq and not tokens and self.trailing and self.tokens_allowed:
            return TOKENS
        if x.shape[0] == batch:
            return None
        if x.shape[0] == 1 and seq in tokens:
            return SHARED
        return None

    def contribute(self, x: torch.Tensor, delta: torch.Tensor, sink: "GradientSink", *extras):
        """Per-example gradient terms from x (B, ..., features) and delta (B, ..., out)."""
        raise NotImplementedError


class LinearHandler(Handler):
    """nn.Linear (weight O x I), HF Conv1D (weight I x O, `transposed`), LoRA wrappers (W0 + BA),
    MoE routers (logits = x W^T, the first of the outputs)."""

    def __init__(
        self, module, keys, params, *, transposed: bool = False, output_index: Optional[int] = None
    ):
        super().__init__(module, keys, params)
        self.transposed = transposed
        self.output_index = output_index  # MoE routers: the logits are element 0 of a tuple

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
    """nn.Embedding (times a constant `scale`, e.g. Gemma's sqrt(hidden)): example b's gradient row
    v is scale * the sum of delta over b's positions holding token v."""

    trailing = 0

    def __init__(
        self, module, keys, params, *, scale: float = 1.0, padding_idx: Optional[int] = None
    ):
        super().__init__(module, keys, params)
        self.scale = scale
        self.padding_idx = padding_idx

    def contribute(self, ids, delta, sink):
        key = self.keys["weight"]
        dtype = working_dtype(delta.dtype)
        batch = delta.shape[0]
        vocab, hidden = self.params["weight"].shape
        ids = ids.reshape(batch, -1).to(delta.device)
        delta = delta.reshape(batch, -1, hidden).to(dtype)
        if self.scale != 1.0:
            delta = delta * self.scale
        example = torch.arange(batch, device=delta.device).unsqueeze(1).expand_as(ids)
        flat_keys = (example * vocab + ids).reshape(-1)
        flat_delta = delta.reshape(-1, hidden)
        if self.padding_idx is not None:  # nn.Embedding never updates its padding row
            keep = ids.reshape(-1) != self.padding_idx
            flat_keys, flat_delta = flat_keys[keep], flat_delta[keep]
        unique, inverse = torch.unique(flat_keys, return_inverse=True)
        rows = torch.zeros(unique.numel(), hidden, dtype=dtype, device=delta.device)
        rows.index_add_(0, inverse, flat_delta)
        sink.add(key, RowGrads(examples=unique // vocab, rows=unique % vocab, values=rows))


class NormHandler(Handler):
    """Elementwise-affine norms ``out = (offset + weight) * x_hat (+ bias)`` (offset 1: Gemma's ``1
    + w``); `normalize` recomputes x_hat from the input. The weight gradient is delta * x_hat,
    whatever the offset."""

    def __init__(self, module, keys, params, *, normalize: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(module, keys, params)
        self.normalize = normalize
        self.trailing = next(iter(params.values())).dim()

    def contribute(self, x, delta, sink):
        dtype = working_dtype(delta.dtype)
        shape = next(iter(self.params.values())).shape
        delta32 = _flat_tokens(delta, self.trailing).to(dtype)
        batch = delta.shape[0]
        if "weight" in self.keys:
            with torch.no_grad():
                x_hat = _flat_tokens(self.normalize(x), self.trailing).to(dtype)
            sink.add(
                self.keys["weight"], DenseGrads((delta32 * x_hat).sum(1).reshape(batch, *shape))
            )
        if "bias" in self.keys:
            sink.add(self.keys["bias"], DenseGrads(delta32.sum(1).reshape(batch, *shape)))


@dataclass
class _Call:
    handler: Handler
    saved: torch.Tensor
    output: Optional[torch.Tensor] = (
        None  # SHARED calls only: resolved in the graph before backward
    )
    extras: tuple = ()
    tokens: bool = False  # TOKENS form: x and delta are (B*T, ...), unflattened for `contribute`


@dataclass
class _PassState:
    weights: torch.Tensor
    received: Dict[str, int] = field(default_factory=dict)
    terms: Dict[str, list] = field(default_factory=dict)


class GradientSink:
    """Routes per-example gradient terms: straight into the accumulator, or -- for a parameter used
    by several calls -- held until the last call has delivered its term, then summed and squared."""

    def __init__(self, capture: "PerExampleCapture"):
        self.capture = capture

    def add(self, key: str, term) -> None:
        capture = self.capture
        if key in capture.exact:
            return
        state = capture.pass_state
        if capture.uses.get(key, 0) <= 1:
            capture.accumulator.add_terms(key, [term], state.weights)
            return
        state.terms.setdefault(key, []).append(term)
        state.received[key] = state.received.get(key, 0) + 1
        if state.received[key] == capture.uses[key]:
            capture.accumulator.add_terms(key, state.terms.pop(key), state.weights)


def _is_broadcast_add(node, output: torch.Tensor) -> bool:
    return type(node).__name__ == "AddBackward0" and getattr(node, "_saved_alpha", 1) == 1


class PerExampleCapture:
    """Installs the hooks for `handlers`; drives one forward + several weighted backward passes."""

    def __init__(self, handlers: List[Handler], accumulator: FisherAccumulator):
        self.handlers = handlers
        self.accumulator = accumulator
        self.sink = GradientSink(self)
        self.active = False
        self.calls: List[_Call] = []
        self.shared: List[_Call] = []
        self.leaves: List[torch.Tensor] = []
        self.uses: Dict[str, int] = {}
        self.fired: set = set()
        self.pass_state: Optional[_PassState] = None
        self.batch_size = 0
        self.seq_len = 0
        # keys computed by the exact fallback: planned by the probe, or found at run time (a call
        # that is
        # not structurally per-example, a shared output with a non-additive consumer, a handler that
        # never
        # fired although planned) -- from the batch where this is first seen on, for good
        self.exact: Dict[str, str] = {}  # key -> reason
        self._node_hooks = []
        self._resolved = False
        self._handles = []
        for handler in handlers:
            self._handles.append(
                handler.module.register_forward_hook(self._forward_hook(handler), with_kwargs=True)
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def mark_exact(self, handler: Handler, reason: str) -> None:
        for key in handler.keys.values():
            if key not in self.exact:
                log.debug("%s -> exact fallback: %s", key, reason)
                self.exact[key] = reason

    # ---------------------------------------------------------------- forward
    def _forward_hook(self, handler: Handler):
        def hook(module, args, kwargs, output):
            if not self.active:
                return None
            self.fired.add(id(handler))
            if all(key in self.exact for key in handler.keys.values()):
                return None
            x = handler.saved_input(args, kwargs)
            form = handler.input_form(x, self.batch_size, self.seq_len)
            lead = {EXAMPLE: self.batch_size, ROWS: self.batch_size}.get(form, 1)
            if form == TOKENS:
                lead = self.batch_size * self.seq_len
            out = handler.output_of(output)
            extras = handler.saved_extras(args, kwargs, x) if form is not None else None
            if (
                form is None
                or extras is None
                or not isinstance(out, torch.Tensor)
                or out.dim() == 0
                or out.shape[0] != lead
            ):
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                self.mark_exact(
                    handler,
                    f"input {shape} is not (batch {self.batch_size}, ..., tokens "
                    f"{self.seq_len}, ...) in {type(module).__name__}",
                )
                return None
            if not out.requires_grad and out is not output:
                # a tuple element was consumed inside the module already (a router's scores):
                # a leaf made now would not reach them
                self.mark_exact(handler, f"{type(module).__name__}'s output needs no gradient")
                return None
            call = _Call(handler, x.detach(), extras=extras, tokens=form == TOKENS)
            for key in handler.keys.values():
                self.uses[key] = self.uses.get(key, 0) + 1
            if not out.requires_grad:
                # nothing upstream needs a gradient (params are frozen): start the graph here
                out.requires_grad_(True)
                self.leaves.append(out)
            if form == SHARED:
                call.output = out
                self.shared.append(call)
            else:
                self.calls.append(call)
                out.register_hook(lambda delta, call=call: self._on_output_grad(call, delta))
            return None  # the output is never replaced

        return hook

    def begin_forward(self, batch_size: int, seq_len: int) -> None:
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.release()
        self.active = True

    def end_forward(self) -> None:
        if self.active:
            for (
                handler
            ) in self.handlers:  # planned, but its module was never called: something else read it
                if id(handler) not in self.fired:
                    self.mark_exact(
                        handler,
                        f"{type(handler.module).__name__} was not called in the forward pass",
                    )
        self.active = False

    def release(self) -> None:
        for handle in self._node_hooks:
            handle.remove()
        self._node_hooks.clear()
        self.calls.clear()
        self.shared.clear()
        self.leaves.clear()
        self.uses.clear()
        self.fired.clear()
        self._resolved = False
        self.pass_state = None

    # ---------------------------------------------------------------- shared (1, T, ...) outputs
    def _resolve_shared(self, loss: torch.Tensor) -> None:
        """Find each shared output's consumers in the graph; all broadcasting adds: hook them."""
        self._resolved = True
        if not self.shared or loss.grad_fn is None:
            return
        by_leaf = {id(call.output): call for call in self.shared if call.output.grad_fn is None}
        by_node = {
            (call.output.grad_fn, call.output.output_nr): call
            for call in self.shared
            if call.output.grad_fn is not None
        }
        consumers: Dict[int, list] = {id(call): [] for call in self.shared}
        seen, stack = {loss.grad_fn}, [loss.grad_fn]
        while stack:
            node = stack.pop()
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                variable = getattr(nxt, "variable", None)
                call = by_leaf.get(id(variable)) if variable is not None else by_node.get((nxt, nr))
                if call is not None:
                    consumers[id(call)].append(node)
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        for call in self.shared:
            nodes = consumers[id(call)]
            if any(key in self.exact for key in call.handler.keys.values()):
                continue
            if not all(_is_broadcast_add(node, call.output) for node in nodes) or len(
                set(nodes)
            ) != len(nodes):
                names = sorted({type(node).__name__ for node in nodes})
                self.mark_exact(
                    call.handler,
                    f"shared {tuple(call.output.shape)} output of "
                    f"{type(call.handler.module).__name__} is consumed by {names}",
                )
                continue
            for key in call.handler.keys.values():
                self.uses[key] = self.uses.get(key, 0) + len(nodes) - 1
            for node in nodes:
                self._node_hooks.append(
                    node.register_prehook(
                        lambda grads, call=call: self._on_consumer_grad(call, grads)
                    )
                )

    def _on_consumer_grad(self, call: _Call, grads) -> None:
        if self.pass_state is None:
            return None
        grad = grads[0] if grads else None
        batch, shape = self.batch_size, tuple(call.output.shape)
        if grad is None or grad.dim() != len(shape) or grad.shape[0] != batch:
            self.mark_exact(
                call.handler,
                f"a consumer of the shared {shape} output has gradient "
                f"{None if grad is None else tuple(grad.shape)}",
            )
            return None
        delta = grad.detach().sum_to_size(
            (batch, *shape[1:])
        )  # example b's own gradient of the shared output
        call.handler.contribute(call.saved.expand(batch, *call.saved.shape[1:]), delta, self.sink)
        return None

    # ---------------------------------------------------------------- backward
    def _on_output_grad(self, call: _Call, delta: torch.Tensor) -> None:
        if self.pass_state is None:
            return None
        x, delta = call.saved, delta.detach()
        if call.tokens:  # (B*T, ...) -> (B, T, ...): rows are example-major (probe_structure)
            x = x.reshape(self.batch_size, self.seq_len, *x.shape[1:])
            delta = delta.reshape(self.batch_size, self.seq_len, *delta.shape[1:])
        call.handler.contribute(x, delta, self.sink, *call.extras)
        return None

    def backward(self, loss: torch.Tensor, weights: torch.Tensor, *, retain_graph: bool) -> None:
        """One weighted pass: each per-example gradient of `loss` squared, times weights[b]."""
        if not self.leaves:
            return
        if not self._resolved:
            self._resolve_shared(loss)
        self.pass_state = _PassState(weights=weights.detach())
        try:
            torch.autograd.grad(loss, self.leaves, retain_graph=retain_graph, allow_unused=True)
            # shared parameters whose other uses got no gradient (unused outputs): complete now
            for key, terms in list(self.pass_state.terms.items()):
                if key not in self.exact:
                    self.accumulator.add_terms(key, terms, self.pass_state.weights)
        finally:
            self.pass_state = None


# ---------------------------------------------------------------- plan-time probe
# tensor attributes and methods that read metadata, not values: using them is not using the
# parameter
_METADATA = {
    "dtype",
    "device",
    "shape",
    "requires_grad",
    "is_cuda",
    "is_meta",
    "is_cpu",
    "layout",
    "ndim",
    "is_leaf",
    "grad_fn",
    "grad",
    "is_sparse",
    "is_quantized",
    "itemsize",
    "nbytes",
    "names",
    "is_nested",
    "is_mkldnn",
    "_version",
    "output_nr",
    "_base",
    "is_mps",
    "is_xpu",
    "size",
    "dim",
    "numel",
    "stride",
    "is_floating_point",
    "is_complex",
    "element_size",
    "data_ptr",
    "is_contiguous",
    "get_device",
    "storage_offset",
    "untyped_storage",
    "__len__",
    "__hash__",
    "__repr__",
    "__format__",
    "nelement",
    "ndimension",
    "_is_view",
    "is_inference",
}


def _function_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _ParameterReads(torch.overrides.TorchFunctionMode):
    """Records fast-path parameters whose values are read while none of their handlers' modules is
    running (DeBERTa reads ``rel_embeddings.weight`` directly; a tied weight may be read by another
    module)."""

    def __init__(self, owners: Dict[int, List[Handler]], running: Dict[int, int]):
        super().__init__()
        self.owners = owners
        self.running = running
        self.outside: Dict[int, str] = {}  # id(handler) -> what read it

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _function_name(func) not in _METADATA:
            flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
            for value in flat:
                handlers = (
                    self.owners.get(id(value)) if isinstance(value, torch.nn.Parameter) else None
                )
                if handlers and not any(self.running.get(id(h.module)) for h in handlers):
                    for handler in handlers:
                        self.outside.setdefault(id(handler), _function_name(func) or str(func))
        return func(*args, **kwargs)


@torch.no_grad()
def probe_structure(
    model: torch.nn.Module,
    handlers: List[Handler],
    forward,
    device,
    vocab_size: int,
    pad_id: Optional[int],
    *,
    rows_allowed: bool,
) -> Dict[int, str]:
    """Plan-time structural check of every covered module: id(handler) -> why it must take the exact
    path.

    Three tiny dummy batches -- (2 examples, 5 tokens), (3, 7), and (3, 7) again with example 0's
    tokens changed -- and for every call of a covered module: its input form (`Handler.input_form`);
    whether rows of examples 1-2 stay the same when only example 0 changes (a routed or permuted
    input mixes examples even when its shape looks right); and whether the parameter is read outside
    its own module. Handlers whose calls were all per-example (B, features) rows and kept examples
    apart may take ROWS inputs later (`rows_allowed`: seq-cls heads); likewise (B*T, features)
    token rows whose example-0 block alone followed example 0 (`tokens_allowed`: MoE blocks). A
    model that cannot run the dummy batches keeps the run-time checks only -- and so no ROWS or
    TOKENS inputs, which only the probe can allow.
    """
    owners: Dict[int, List[Handler]] = {}
    for handler in handlers:
        for param in handler.params.values():
            owners.setdefault(id(param), []).append(handler)
    running: Dict[int, int] = {}
    records: Dict[int, list] = {id(h): [] for h in handlers}
    hooks = []

    def enter(module, _args):
        running[id(module)] = running.get(id(module), 0) + 1

    def leave(module, _args, _out):
        running[id(module)] -= 1

    for module in model.modules():
        hooks.append(module.register_forward_pre_hook(enter))
        hooks.append(module.register_forward_hook(leave))
    for handler in handlers:
        hooks.append(
            handler.module.register_forward_hook(
                lambda _m, args, kwargs, _out, h=handler: records[id(h)].append(
                    h.saved_input(args, kwargs)
                ),
                with_kwargs=True,
            )
        )
    vocab = max(2, vocab_size)
    allowed = [t for t in range(min(vocab, 64)) if t != pad_id] or [0]

    def batch_ids(batch, seq, offset):
        index = torch.arange(batch * seq).reshape(batch, seq) * 7 + offset
        return torch.tensor(allowed, device=device)[index % len(allowed)]

    reads = _ParameterReads(owners, running)
    shapes = [(2, 5, 0), (3, 7, 1)]
    per_batch: List[Dict[int, list]] = []
    try:
        with reads:
            for batch, seq, offset in shapes + [(3, 7, 1)]:
                ids = batch_ids(batch, seq, offset)
                if len(per_batch) == 2:  # change example 0 only
                    ids[0] = torch.tensor(allowed, device=device)[
                        (torch.arange(seq) * 3 + 5) % len(allowed)
                    ]
                for value in records.values():
                    value.clear()
                forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
                per_batch.append(
                    {
                        key: [
                            x.detach().clone() if isinstance(x, torch.Tensor) else x for x in calls
                        ]
                        for key, calls in records.items()
                    }
                )
    except Exception as error:  # noqa: BLE001 - a model that cannot run the dummy batch
        log.debug(
            "structure probe skipped (%s: %s); run-time checks only", type(error).__name__, error
        )
        return {}
    finally:
        for handle in hooks:
            handle.remove()

    reasons: Dict[int, str] = {}
    for handler in handlers:
        key = id(handler)
        if key in reads.outside:
            reasons[key] = (
                f"its parameter is read outside {type(handler.module).__name__} "
                f"({reads.outside[key]})"
            )
            continue
        handler.rows_allowed = rows_allowed
        handler.tokens_allowed = True
        forms = []
        for (batch, seq, _offset), calls in zip(shapes + [shapes[1]], per_batch):
            forms.extend(handler.input_form(x, batch, seq) for x in calls[key])
        handler.rows_allowed = handler.tokens_allowed = False
        if any(form is None for form in forms):
            reasons[key] = "an input is not (batch, ..., tokens, ..., features)"
            continue
        before, after = per_batch[1][key], per_batch[2][key]
        if len(before) != len(after):
            reasons[key] = "called a different number of times when one example changes (routed)"
            continue
        reason = _mixing(handler, before, after, *shapes[1][:2])
        if reason:
            reasons[key] = reason
            continue
        if rows_allowed and ROWS in forms:
            handler.rows_allowed = True
        if TOKENS in forms:
            handler.tokens_allowed = True
    return reasons


def _mixing(handler: Handler, before: list, after: list, batch: int, seq: int) -> Optional[str]:
    """Why the calls' inputs (before / after example 0 changed) mix examples, or None."""
    handler.rows_allowed = handler.tokens_allowed = True
    try:
        for x, y in zip(before, after):
            if x.shape != y.shape:
                return "its input changes shape when one example changes (routed)"
            form = handler.input_form(x, batch, seq)
            if form == TOKENS:  # rows example-major: example b's are rows [b*T, (b+1)*T)
                x, y = x.reshape(batch, seq, *x.shape[1:]), y.reshape(batch, seq, *y.shape[1:])
            elif x.shape[0] != batch:
                continue
            rest, changed = x[1:].double(), y[1:].double()
            scale = float(x.double().abs().max()) if x.numel() else 0.0
            if rest.numel() and float((rest - changed).abs().max()) > 1e-3 * scale + 1e-6:
                return "its input rows of one example depend on another example (routed / mixed)"
            if (
                form in (ROWS, TOKENS)
                and float((x[0].double() - y[0].double()).abs().max()) <= 1e-3 * scale + 1e-6
            ):
                # a flat input is one example's rows only if example 0's rows follow example 0
                return "its flattened input does not follow example 0 (routed)"
    finally:
        handler.rows_allowed = handler.tokens_allowed = False
    return None
