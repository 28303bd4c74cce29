"""Which parameters the fast hooks cover, and with which handler; the rest go to the exact fallback.

Module types are matched EXACTLY (no isinstance): a subclass may change `forward` (scaled embeddings,
quantized linears), and a wrong formula would give a silently wrong Fisher. Norm layers are accepted only
after a numerical check of ``out == weight * x_hat (+ bias)`` with a perturbed weight.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_fisher.estimator.hooks import EmbeddingHandler, Handler, LinearHandler, NormHandler


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    return Conv1D


def _rms_normalizer(eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def normalize(x):  # HF Llama/Mistral/Qwen: statistics in float32, cast back before the weight
        x32 = x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return out.to(x.dtype)

    return normalize


def _norm_candidates(module: nn.Module) -> List[Callable[[torch.Tensor], torch.Tensor]]:
    if type(module) is nn.LayerNorm:
        shape, eps = module.normalized_shape, module.eps
        return [lambda x: F.layer_norm(x, shape, None, None, eps)]
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    if type(module) is nn.RMSNorm and eps is None:
        eps = torch.finfo(module.weight.dtype).eps
    if not isinstance(eps, float):
        return []
    candidates = [_rms_normalizer(eps)]
    if hasattr(nn, "RMSNorm") and type(module) is nn.RMSNorm:
        candidates.append(lambda x: F.rms_norm(x, (x.shape[-1],), None, eps))
    return candidates


@torch.no_grad()
def _verified_normalizer(module: nn.Module) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The x_hat function for which module(x) == weight * x_hat(x) + bias holds, or None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.device.type == "meta":
        return None
    bias = getattr(module, "bias", None)
    own = dict(module.named_parameters(recurse=False))
    if set(own) - {"weight", "bias"} or any(True for _ in module.children()):
        return None
    candidates = _norm_candidates(module)
    if not candidates:
        return None
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn((2, 3, *weight.shape), generator=generator).to(weight.device, weight.dtype)
    saved = weight.detach().clone()
    try:
        weight.copy_(torch.rand(weight.shape, generator=generator).add_(0.5).to(weight.device, weight.dtype))
        try:
            out = module(x)
        except Exception:
            return None
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            return None
        tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
        for normalize in candidates:
            expected = weight * normalize(x)
            if isinstance(bias, nn.Parameter):
                expected = expected + bias
            if torch.allclose(out.float(), expected.float(), rtol=tol, atol=tol):
                return normalize
        return None
    finally:
        weight.copy_(saved)


def plan_handlers(
    model: nn.Module,
    keys: Dict[int, str],
    *,
    wrappers: Optional[Dict[nn.Module, Tuple[nn.Module, bool]]] = None,
) -> Tuple[List[Handler], Dict[str, nn.Parameter]]:
    """Handlers for the fast path and the parameters left to the fallback.

    `keys`: id(param) -> accumulator key, for the parameters whose Fisher is wanted.
    `wrappers`: LoRA wrapper module -> (base layer, transposed): hooked as one dense Linear W0 + BA.
    """
    wrappers = wrappers or {}
    conv1d = _conv1d_type()
    consumed: Set[int] = set()  # modules handled through a wrapper
    for wrapper in wrappers:
        for sub in wrapper.modules():
            if sub is not wrapper:
                consumed.add(id(sub))

    proposals: List[Tuple[nn.Module, str, Dict[str, nn.Parameter], dict]] = []
    for module in model.modules():
        if id(module) in consumed:
            continue
        if module in wrappers:
            base, transposed = wrappers[module]
            params = {role: getattr(base, role) for role in ("weight", "bias")
                      if isinstance(getattr(base, role, None), nn.Parameter)}
            proposals.append((module, "linear", params, {"transposed": transposed}))
            continue
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        kind: Optional[str] = None
        extra: dict = {}
        if type(module) is nn.Linear:
            kind = "linear"
        elif conv1d is not None and type(module) is conv1d:
            kind, extra = "linear", {"transposed": True}
        elif type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq:
            kind = "embedding"
        elif "norm" in type(module).__name__.lower():
            normalize = _verified_normalizer(module)
            if normalize is not None:
                kind, extra = "norm", {"normalize": normalize}
        if kind is None or set(own) - {"weight", "bias"}:
            continue
        proposals.append((module, kind, own, extra))

    # A parameter is fast only if EVERY module using it is covered (tied weights across a covered and an
    # uncovered module must be summed per example, which only the fallback can then do).
    owners: Dict[int, int] = {}
    for module in model.modules():
        if id(module) in consumed:
            continue
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    for wrapper in wrappers:  # the wrapper stands in for its base layer
        for param in wrapper.parameters():
            owners[id(param)] = owners.get(id(param), 0) + 1
    covered_count: Dict[int, int] = {}
    for _module, _kind, params, _extra in proposals:
        for param in params.values():
            covered_count[id(param)] = covered_count.get(id(param), 0) + 1

    handlers: List[Handler] = []
    fast: Set[int] = set()
    for module, kind, params, extra in proposals:
        roles = {role: p for role, p in params.items()
                 if id(p) in keys and covered_count.get(id(p)) == owners.get(id(p))}
        if not roles:
            continue
        role_keys = {role: keys[id(p)] for role, p in roles.items()}
        fast.update(id(p) for p in roles.values())
        if kind == "linear":
            handlers.append(LinearHandler(module, role_keys, roles, **extra))
        elif kind == "embedding":
            handlers.append(EmbeddingHandler(module, role_keys, roles))
        else:
            handlers.append(NormHandler(module, role_keys, roles, **extra))

    fallback: Dict[str, nn.Parameter] = {}
    seen: Set[int] = set()
    for param in model.parameters():
        if id(param) in keys and id(param) not in fast and id(param) not in seen:
            seen.add(id(param))
            fallback[keys[id(param)]] = param
    return handlers, fallback
