"""Fused MoE experts (transformers 5's `...Experts` modules) on the fast path.

transformers 5 holds a block's experts as two 3-D parameters, ``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I), and calls them once per block with the flattened tokens and the router's
choice: ``experts(x (N, H), top_k_index (N, k), top_k_weights (N, k))``. Token n routed to expert e
with weight w computes ``g, u = (x_n W_gu[e]^T).chunk(2)``, ``a = act(g) * u``, ``y = a W_d[e]^T``
and adds ``w * y`` to output row n.

From the block's output gradient delta (N, H) -- one backward pass for the whole batch -- the routed
tokens' own gradients follow locally: ``delta_y = w * delta_n``; expert e's down_proj gradient is
``sum_n delta_y^T a`` over the tokens routed to e, its gate_up_proj gradient ``sum_n [delta_g;
delta_u]^T x_n`` with ``delta_a = delta_y W_d[e]``, ``delta_u = delta_a * act(g)``, ``delta_g =
delta_a * u * act'(g)`` (act' by autograd on the recomputed g). Grouped by example (rows [b*T,
(b+1)*T) of the flattened tokens are example b's, see hooks.TOKENS), these are per-example outer
products, squared like any Linear's (`gradient_terms.ExpertGrads`). Recomputing g, u and delta_a
costs one expert forward and one input-gradient matmul per expert (about 16 % of a Mixtral-shaped
step, README "Benchmarks"); the backward's own input gradients are autograd's, unchanged.

Which modules follow that formula is checked numerically, with perturbed weights, at plan time
(`verified_experts`), as coverage does for norms: anything else stays on the exact fallback.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from mergekit_fisher.estimator.gradient_terms import ExpertGrads, OuterGrads
from mergekit_fisher.estimator.hooks import Handler
from mergekit_fisher.math import working_dtype

ROLES = ("gate_up_proj", "down_proj")


def experts_reference(x, top_k_index, top_k_weights, gate_up, down, act) -> torch.Tensor:
    """The fused-experts forward as written out in the module docstring (dense, for checking)."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        token, slot = torch.where(top_k_index == e)
        gate, up = torch.nn.functional.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(act(gate) * up, down[e])
        out.index_add_(0, token, y * top_k_weights[token, slot, None])
    return out


def experts_shapes(module: torch.nn.Module) -> Optional[Tuple[int, int, int]]:
    """(E, I, H) if `module` holds exactly gate_up_proj (E, 2I, H) and down_proj (E, H, I) and an
    `act_fn`, else None."""
    own = dict(module.named_parameters(recurse=False))
    trained_children = any(any(True for _ in child.parameters()) for child in module.children())
    if set(own) != set(ROLES) or trained_children:
        return None
    gate_up, down = own["gate_up_proj"], own["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3 or not callable(getattr(module, "act_fn", None)):
        return None
    experts, double, hidden = gate_up.shape
    if double % 2 or tuple(down.shape) != (experts, hidden, double // 2):
        return None
    return experts, double // 2, hidden


@torch.no_grad()
def verified_experts(module: torch.nn.Module, perturbed) -> bool:
    """The module computes `experts_reference` (checked twice, with perturbed weights)."""
    shapes = experts_shapes(module)
    if shapes is None or module.gate_up_proj.device.type == "meta":
        return False
    experts, _inter, hidden = shapes
    weight = module.gate_up_proj
    generator = torch.Generator().manual_seed(97531)
    tokens, top = 7, min(2, experts)
    x = torch.randn((tokens, hidden), generator=generator).to(weight.device, weight.dtype)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top] for _ in range(tokens)])
    index = index.to(weight.device)
    scores = torch.rand((tokens, top), generator=generator).to(weight.device, weight.dtype)
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    with perturbed(module, generator) as trials:
        for _ in trials():
            try:
                out = module(x, index, scores)
            except Exception:  # noqa: BLE001 - not experts we understand
                return False
            expected = experts_reference(
                x, index, scores, module.gate_up_proj, module.down_proj, module.act_fn
            )
            if not isinstance(out, torch.Tensor) or out.shape != expected.shape:
                return False
            if not torch.allclose(out.float(), expected.float(), rtol=tol, atol=tol):
                return False
    return True


class ByExample:
    """Routed tokens of examples `examples` (n,), sorted, laid out as (B, max count, D),
    zero-padded: a zero row adds nothing to a sum of outer products."""

    def __init__(self, examples: torch.Tensor, batch: int):
        counts = torch.bincount(examples, minlength=batch)
        starts = torch.cumsum(counts, 0) - counts
        self.index = (
            examples,
            torch.arange(examples.numel(), device=examples.device) - starts[examples],
        )
        self.shape = (batch, int(counts.max()) if examples.numel() else 0)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(*self.shape, values.shape[1])
        out[self.index] = values
        return out


def expert_token_grads(
    x: torch.Tensor,
    delta: torch.Tensor,
    scale: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's routed tokens x (n, H), block output gradients delta (n, H), routing weights
    scale (n,) -> (delta_y (n, H), a (n, I), delta_gu (n, 2I)): the down_proj gradient is
    sum delta_y^T a, the gate_up_proj one sum delta_gu^T x."""
    gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
    delta_y = delta * scale.unsqueeze(-1)
    delta_a = delta_y.matmul(down)
    with torch.enable_grad():
        leaf = gate.detach().requires_grad_(True)
        activated = act(leaf)
        (delta_g,) = torch.autograd.grad(activated, leaf, delta_a * up)
    activated = activated.detach()
    return delta_y, activated * up, torch.cat([delta_g, delta_a * activated], dim=-1)


class ExpertsHandler(Handler):
    """Fused experts: input (B*T, H) hidden states plus the routing (top_k_index, top_k_weights)."""

    def saved_extras(self, args, kwargs, x):
        rest = list(args[1:3])
        for name in ("top_k_index", "top_k_weights")[len(rest) :]:
            rest.append(kwargs.get(name))
        index, scores = rest
        if not (
            isinstance(x, torch.Tensor)
            and isinstance(index, torch.Tensor)
            and isinstance(scores, torch.Tensor)
            and index.shape == scores.shape
            and index.dim() == 2
            and index.shape[0] == x.reshape(-1, x.shape[-1]).shape[0]
        ):
            return None
        return index.detach(), scores.detach()

    def contribute(self, x, delta, sink, index=None, scores=None):
        batch, hidden = x.shape[0], x.shape[-1]
        dtype = working_dtype(delta.dtype)
        flat_x = x.reshape(-1, hidden).to(dtype)
        flat_delta = delta.reshape(-1, hidden).to(dtype)
        seq = flat_x.shape[0] // batch
        scores = scores.reshape(flat_x.shape[0], -1).to(dtype)
        index = index.reshape(flat_x.shape[0], -1)
        # one expert at a time in the working dtype: never a float32 copy of all E experts
        gate_up, down = self.module.gate_up_proj.detach(), self.module.down_proj.detach()
        down_terms: List[Tuple[int, OuterGrads]] = []
        gate_up_terms: List[Tuple[int, OuterGrads]] = []
        for e in torch.unique(index).tolist():
            if not 0 <= e < gate_up.shape[0]:
                continue  # transformers' "no expert" slot (num_experts) under expert parallelism
            token, slot = torch.where(index == e)  # sorted by token: grouped by example
            pad = ByExample(token // seq, batch)
            h = flat_x[token]
            delta_y, a, delta_gu = expert_token_grads(
                h,
                flat_delta[token],
                scores[token, slot],
                gate_up[e].to(dtype),
                down[e].to(dtype),
                self.module.act_fn,
            )
            if "down_proj" in self.keys:
                down_terms.append((e, OuterGrads(pad(delta_y), pad(a))))
            if "gate_up_proj" in self.keys:
                gate_up_terms.append((e, OuterGrads(pad(delta_gu), pad(h))))
        if "down_proj" in self.keys:
            sink.add(self.keys["down_proj"], ExpertGrads(down_terms))
        if "gate_up_proj" in self.keys:
            sink.add(self.keys["gate_up_proj"], ExpertGrads(gate_up_terms))
