"""PEFT / LoRA: load an adapter, find its wrappers, name things -- all through PEFT's own API.

Dense space: the Fisher of the effective weights the forward uses. A LoRA layer's is W0 + s*B@A: its
per-example gradient is delta^T x taken at the LoRA wrapper (input x, output gradient delta) --
exactly what the Linear handler computes -- so no merged copy is ever materialised. A
`ModulesToSaveWrapper` (peft adds `score` / `classifier` for SEQ_CLS; users add `lm_head`,
`embed_tokens`) runs its active copy (``modules_to_save[active adapter]``), which is what gets a
Fisher; `original_module` is not used and gets none. A `TrainableTokensLayer` embeds with W0 where
the trained rows are replaced: hooked as one embedding (or, tied to an LM head, one Linear) of that
effective weight. Every name is the base checkpoint's, built from the module tree of
``peft_model.get_base_model()`` (wrappers stand for the module they wrap). Adapter space: the
adapter's own trained tensors under the adapter file's names, as peft's `get_peft_model_state_dict`
names them (lora_A / lora_B, the modules_to_save copies, trainable token deltas).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Set, Tuple

from torch import nn

from mergekit_fisher.errors import FisherInputError


def _peft():
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    return BaseTunerLayer, AuxiliaryTrainingWrapper, ModulesToSaveWrapper


def module_in_use(wrapper) -> nn.Module:
    """The module a `ModulesToSaveWrapper` runs, by peft's own rule
    (`AuxiliaryTrainingWrapper.forward`): the original module when adapters are disabled or one of
    the active adapters has no copy here, else the copy of the first active adapter."""
    active = list(wrapper.active_adapters)
    if (
        wrapper.disable_adapters
        or not active
        or any(a not in wrapper.modules_to_save for a in active)
    ):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def _walk(
    module: nn.Module, prefix: str, out: Dict[int, List[str]], adapter: Set[int], types
) -> None:
    base_tuner, auxiliary, modules_to_save = types
    if isinstance(module, modules_to_save):
        used = module_in_use(module)
        if used is not module.original_module:
            adapter.update(id(p) for p in used.parameters())
        return _walk(used, prefix, out, adapter, types)
    if isinstance(module, auxiliary):  # TrainableTokensWrapper: its token adapter is a tuner layer
        return _walk(module.token_adapter, prefix, out, adapter, types)
    if isinstance(module, base_tuner):
        base = module.get_base_layer()
        if isinstance(getattr(base, "weight", None), nn.Parameter):
            adapter.add(id(base.weight))
        return _walk(base, prefix, out, adapter, types)
    for name, param in module.named_parameters(recurse=False):
        out.setdefault(id(param), []).append(prefix + name)
    for name, child in module.named_children():
        _walk(child, f"{prefix}{name}.", out, adapter, types)


def dense_names(peft_model) -> Tuple[Dict[int, List[str]], Set[int]]:
    """(id(param) -> its base checkpoint names, ids of the parameters the adapter trains) for every
    parameter the dense forward uses: LoRA / trainable-token base weights, active modules_to_save
    copies, everything else of the base model. Original modules of modules_to_save and adapter
    tensors are absent."""
    names: Dict[int, List[str]] = {}
    targets: Set[int] = set()
    _walk(peft_model.get_base_model(), "", names, targets, _peft())
    return names, targets


def adapter_names(peft_model) -> Dict[int, List[str]]:
    """id(param) -> [its name in adapter_model.safetensors], for the active adapter's tensors."""
    from peft.utils import get_peft_model_state_dict

    adapter = peft_model.active_adapter
    params = {name: p for name, p in peft_model.named_parameters(remove_duplicate=False)}
    state = {**{name: b for name, b in peft_model.named_buffers(remove_duplicate=False)}, **params}
    by_id = {id(p): p for p in params.values()}
    saved = get_peft_model_state_dict(
        peft_model, state_dict=state, adapter_name=adapter, save_embedding_layers=False
    )
    out: Dict[int, List[str]] = {}
    for name, value in saved.items():
        if id(value) in by_id:  # peft hands back the very tensors it was given
            out.setdefault(id(value), []).append(name)
    return out


def load_adapter(model, adapter: str, *, model_name: str):
    if not os.path.isdir(adapter) or not os.path.exists(
        os.path.join(adapter, "adapter_config.json")
    ):
        raise FisherInputError(
            "adapter not found (expected a directory with adapter_config.json)",
            model=adapter,
            fix="pass the PEFT adapter directory saved with `save_pretrained` to --lora",
        )
    from peft import PeftModel

    try:
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as fp:
            config = json.load(fp)
    except ValueError as error:
        raise FisherInputError(
            f"unreadable adapter_config.json ({error})",
            model=adapter,
            fix="restore the adapter directory",
        ) from None
    if config.get("peft_type", "LORA") != "LORA":
        raise FisherInputError(
            f"unsupported adapter type {config.get('peft_type')!r}",
            model=adapter,
            fix="use a LoRA adapter",
        )
    if config.get("use_dora"):
        # DoRA rescales W0 + BA by a learned magnitude: delta^T x at the wrapper is not its weight
        # gradient
        raise FisherInputError(
            "DoRA adapters are not supported (only plain LoRA)",
            model=adapter,
            fix="merge the adapter (merge_and_unload) and compute the Fisher of the merged model",
        )
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except Exception as error:  # size mismatch, missing target modules, ...
        first = (
            str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        )
        raise FisherInputError(
            f"the adapter does not fit this base model ({first[:300]})",
            model=adapter,
            fix=f"pass the base model the adapter was trained on (adapter_config.json names "
            f"{config.get('base_model_name_or_path')!r}; got {model_name!r})",
        ) from None
    return peft_model


def lora_wrappers(peft_model) -> Dict[nn.Module, Tuple[str, Dict[str, nn.Parameter], dict]]:
    """wrapper module -> (handler kind, role -> base parameter, handler options), for every PEFT
    layer the dense hooks take as one module of its effective weight: LoRA Linear over nn.Linear /
    Conv1D (W0 + BA), trainable tokens over an embedding or a tied LM head (W0 with the trained rows
    replaced)."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.trainable_tokens import TrainableTokensLayer
    except ImportError:  # pragma: no cover - older peft
        TrainableTokensLayer = None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = None
    found = {}
    for module in peft_model.modules():
        if type(module) is LoraLinear:
            base = module.get_base_layer()
            params = {
                role: getattr(base, role)
                for role in ("weight", "bias")
                if isinstance(getattr(base, role, None), nn.Parameter)
            }
            if type(base) is nn.Linear:
                found[module] = ("linear", params, {"transposed": False})
            elif Conv1D is not None and type(base) is Conv1D:
                found[module] = ("linear", params, {"transposed": True})
        elif TrainableTokensLayer is not None and type(module) is TrainableTokensLayer:
            base = module.get_base_layer()
            if (
                isinstance(base, nn.Embedding)
                and base.max_norm is None
                and not base.scale_grad_by_freq
            ):
                scale = module._get_embed_scale()
                found[module] = (
                    "embedding",
                    {"weight": base.weight},
                    {
                        "scale": 1.0 if scale is None else float(scale),
                        "padding_idx": base.padding_idx,
                    },
                )
            elif isinstance(
                base, nn.Linear
            ):  # tied to the embedding: F.linear(x, W) without a bias
                found[module] = ("linear", {"weight": base.weight}, {"transposed": False})
    return found
