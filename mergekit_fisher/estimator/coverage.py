"""Which parameters the fast hooks cover, and with which handler; the rest go to the exact fallback.

nn.Linear, HF Conv1D and nn.Embedding are matched by EXACT type. A subclass may change `forward`
(quantized linears), and a wrong formula would give a silently wrong Fisher, so subclasses --
Falcon's `FalconLinear`, Gemma's scaled embeddings -- and norm layers are accepted only after a
numerical check, with perturbed weights, of ``out == x W^T (+ b)``, ``out == c * embedding(ids, W)``
for a constant c, or ``out == (offset + weight) * x_hat (+ bias)`` with offset 0 (Llama, LayerNorm)
or 1 (Gemma's ``1 + w``). Whether a call's input is per-example is checked per call
(hooks.Handler.input_form) and by the plan-time probe (hooks.probe_structure); this module only
decides which formula a module follows.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_fisher.estimator.experts import ExpertsHandler, verified_experts
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
    """The x_hat for which module(x) == (offset + weight) * x_hat(x) + bias holds, or None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.device.type == "meta":
        return None
    own = dict(module.named_parameters(recurse=False))
    if set(own) - {"weight", "bias"} or any(True for _ in module.children()):
        return None
    candidates = _norm_candidates(module)
    if not candidates:
        return None
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn((2, 3, *weight.shape), generator=generator).to(weight.device, weight.dtype)
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    with _perturbed(module, generator) as trials:
        for normalize in candidates:
            for offset in (0.0, 1.0):
                if all(_norm_matches(module, x, normalize, offset, tol) for _ in trials()):
                    return normalize
    return None


def _norm_matches(module, x, normalize, offset, tol) -> bool:
    try:
        out = module(x)
    except Exception:  # noqa: BLE001 - not a norm we understand
        return False
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return False
    bias = getattr(module, "bias", None)
    expected = (module.weight + offset) * normalize(x)
    if isinstance(bias, nn.Parameter):
        expected = expected + bias
    return torch.allclose(out.float(), expected.float(), rtol=tol, atol=tol)


class _perturbed:
    """Context: `trials()` yields twice, each time with the module's own parameters set to fresh
    random values (weights around 1, biases around 0); the originals are restored on exit."""

    def __init__(self, module: nn.Module, generator: torch.Generator):
        self.params = dict(module.named_parameters(recurse=False))
        self.generator = generator
        self.saved = {}

    def __enter__(self):
        self.saved = {name: p.detach().clone() for name, p in self.params.items()}
        return self.trials

    def trials(self):
        for _ in range(2):
            for name, p in self.params.items():
                fresh = torch.rand(p.shape, generator=self.generator)
                fresh = fresh.add_(0.5) if name == "weight" and p.dim() == 1 else fresh.sub_(0.5)
                p.data.copy_(fresh.to(p.device, p.dtype))
            yield

    def __exit__(self, *exc):
        for name, p in self.params.items():
            p.data.copy_(self.saved[name])
        return False


def _own_weight_and_bias(module: nn.Module) -> bool:
    own = dict(module.named_parameters(recurse=False))
    return (
        "weight" in own
        and own[
            "weight"
        ].is_floating_point()  # quantized weights are not checked by perturbing them
        and not set(own) - {"weight", "bias"}
        and not any(True for _ in module.children())
    )


@torch.no_grad()
def _verified_linear(module: nn.Module) -> bool:
    """A subclass of nn.Linear (Falcon's FalconLinear) that computes exactly x W^T + b."""
    if (
        not _own_weight_and_bias(module)
        or module.weight.device.type == "meta"
        or module.weight.dim() != 2
    ):
        return False
    weight = module.weight
    generator, x, tol = _probe_input(weight, seed=4321)
    with _perturbed(module, generator) as trials:
        for _ in trials():
            try:
                out = module(x)
            except Exception:  # noqa: BLE001
                return False
            bias = module.bias if isinstance(getattr(module, "bias", None), nn.Parameter) else None
            expected = F.linear(x, weight, bias)
            if (
                not isinstance(out, torch.Tensor)
                or out.shape != expected.shape
                or not torch.allclose(out.float(), expected.float(), rtol=tol, atol=tol)
            ):
                return False
    return True


def _probe_input(weight: torch.Tensor, *, seed: int):
    """A seeded (2, 3, in) input on the weight's device and dtype for a numerical module check,
    the generator (for the perturbed trials) and the tolerance for that dtype."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 3, weight.shape[1]), generator=generator).to(weight.device, weight.dtype)
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return generator, x, tol


@torch.no_grad()
def _verified_router(module: nn.Module) -> bool:
    """An MoE router (transformers 5's `...TopKRouter`): a module of one (E, H) `weight` whose
    output is a tuple starting with the logits ``x.reshape(-1, H) W^T`` -- their gradient is all the
    weight's gradient, whatever the rest of the router (softmax, top-k) does with them."""
    own = dict(module.named_parameters(recurse=False))
    weight = own.get("weight")
    if (
        set(own) != {"weight"}
        or weight.dim() != 2
        or not weight.is_floating_point()
        or weight.device.type == "meta"
        or any(True for _ in module.children())
        or any(True for _ in module.buffers(recurse=False))
    ):
        return False
    generator, x, tol = _probe_input(weight, seed=8642)
    with _perturbed(module, generator) as trials:
        for _ in trials():
            try:
                out = module(x)
            except Exception:  # noqa: BLE001 - not a router we understand
                return False
            if not isinstance(out, tuple) or not out or not isinstance(out[0], torch.Tensor):
                return False
            expected = F.linear(x.reshape(-1, weight.shape[1]), weight)
            if out[0].shape != expected.shape or not torch.allclose(
                out[0].float(), expected.float(), rtol=tol, atol=tol
            ):
                return False
    return True


@torch.no_grad()
def _verified_embedding_scale(module: nn.Module) -> Optional[float]:
    """c for an nn.Embedding subclass computing exactly c * embedding(ids, W) (Gemma: sqrt(H))."""
    if not _own_weight_and_bias(module) or "bias" in dict(module.named_parameters(recurse=False)):
        return None
    if (
        module.max_norm is not None
        or module.scale_grad_by_freq
        or module.weight.device.type == "meta"
    ):
        return None
    weight = module.weight
    generator = torch.Generator().manual_seed(2468)
    ids = torch.randint(0, weight.shape[0], (2, 5), generator=generator).to(weight.device)
    tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    scales = []
    with _perturbed(module, generator) as trials:
        for _ in trials():
            try:
                out = module(ids)
            except Exception:  # noqa: BLE001
                return None
            plain = F.embedding(ids, weight, module.padding_idx)
            if not isinstance(out, torch.Tensor) or out.shape != plain.shape:
                return None
            ref = plain.double()
            scale = float((out.double() * ref).sum() / ref.square().sum())
            if not torch.allclose(
                out.double(), scale * ref, rtol=tol, atol=tol * float(ref.abs().max())
            ):
                return None
            scales.append(scale)
    if abs(scales[0] - scales[1]) > tol * abs(scales[0]):
        return None
    return 1.0 if abs(scales[0] - 1.0) <= 1e-12 else scales[0]


def plan_handlers(
    model: nn.Module,
    keys: Dict[int, str],
    *,
    wrappers: Optional[Dict[nn.Module, Tuple[str, Dict[str, nn.Parameter], dict]]] = None,
) -> Tuple[List[Handler], Dict[str, nn.Parameter]]:
    """Handlers for the fast path and the parameters left to the fallback.

    `keys`: id(param) -> accumulator key, for the parameters whose Fisher is wanted. `wrappers`:
    PEFT layer -> (kind, role -> base parameter, handler options) (see lora.lora_wrappers): hooked
    as one module of its effective weight (LoRA: a dense Linear W0 + BA).
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
            kind, params, extra = wrappers[module]
            proposals.append((module, kind, dict(params), dict(extra)))
            continue
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        kind: Optional[str] = None
        extra: dict = {}
        if type(module) is nn.Linear or (
            isinstance(module, nn.Linear) and _verified_linear(module)
        ):
            kind = "linear"
        elif conv1d is not None and type(module) is conv1d:
            kind, extra = "linear", {"transposed": True}
        elif isinstance(module, nn.Embedding):
            scale = (
                1.0
                if type(module) is nn.Embedding
                and module.max_norm is None
                and not module.scale_grad_by_freq
                else _verified_embedding_scale(module)
            )
            if scale is not None:
                kind, extra = "embedding", {"scale": scale, "padding_idx": module.padding_idx}
        elif "norm" in type(module).__name__.lower():
            normalize = _verified_normalizer(module)
            if normalize is not None:
                kind, extra = "norm", {"normalize": normalize}
        elif verified_experts(module, _perturbed):
            proposals.append((module, "experts", own, {}))
            continue
        elif _verified_router(module):
            kind, extra = "linear", {"output_index": 0}
        if kind is None or set(own) - {"weight", "bias"}:
            continue
        proposals.append((module, kind, own, extra))

    # A parameter is fast only if EVERY module using it is covered (tied weights across a covered
    # and an
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
        roles = {
            role: p
            for role, p in params.items()
            if id(p) in keys and covered_count.get(id(p)) == owners.get(id(p))
        }
        if not roles:
            continue
        role_keys = {role: keys[id(p)] for role, p in roles.items()}
        fast.update(id(p) for p in roles.values())
        if kind == "linear":
            handlers.append(LinearHandler(module, role_keys, roles, **extra))
        elif kind == "embedding":
            handlers.append(EmbeddingHandler(module, role_keys, roles, **extra))
        elif kind == "experts":
            handlers.append(ExpertsHandler(module, role_keys, roles))
        else:
            handlers.append(NormHandler(module, role_keys, roles, **extra))

    fallback: Dict[str, nn.Parameter] = {}
    seen: Set[int] = set()
    for param in model.parameters():
        if id(param) in keys and id(param) not in fast and id(param) not in seen:
            seen.add(id(param))
            fallback[keys[id(param)]] = param
    return handlers, fallback
