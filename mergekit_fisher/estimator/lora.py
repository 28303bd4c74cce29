"""PEFT / LoRA: load an adapter, find its wrappers, name things.

Dense space: the Fisher of the effective weight W0 + s*B@A. Its per-example gradient is delta^T x taken at
the LoRA wrapper (input x, output gradient delta) -- exactly what the Linear handler computes -- so no merged
copy is ever materialised. Names are the base checkpoint's: ``base_model.model.`` and ``.base_layer`` are
stripped. Adapter space: lora_A / lora_B under the adapter file's own names (adapter name removed).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Tuple

from torch import nn

from mergekit_fisher.errors import FisherInputError

PEFT_PREFIX = "base_model.model."


def dense_name(name: str) -> str:
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def adapter_file_name(name: str, adapter: str = "default") -> str:
    """peft's in-memory name -> the name in adapter_model.safetensors."""
    return re.sub(rf"\.(lora_[AB]|lora_embedding_[AB])\.{re.escape(adapter)}(\.|$)", r".\1\2", name)


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def load_adapter(model, adapter: str, *, model_name: str):
    if not os.path.isdir(adapter) or not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        raise FisherInputError(
            "adapter not found (expected a directory with adapter_config.json)", model=adapter,
            fix="pass the PEFT adapter directory saved with `save_pretrained` to --lora",
        )
    from peft import PeftModel

    try:
        with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as fp:
            config = json.load(fp)
    except ValueError as error:
        raise FisherInputError(f"unreadable adapter_config.json ({error})", model=adapter,
                               fix="restore the adapter directory") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise FisherInputError(f"unsupported adapter type {config.get('peft_type')!r}", model=adapter,
                               fix="use a LoRA adapter")
    if config.get("use_dora"):
        # DoRA rescales W0 + BA by a learned magnitude: delta^T x at the wrapper is not its weight gradient
        raise FisherInputError("DoRA adapters are not supported (only plain LoRA)", model=adapter,
                               fix="merge the adapter (merge_and_unload) and compute the Fisher of the merged model")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except Exception as error:  # size mismatch, missing target modules, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise FisherInputError(
            f"the adapter does not fit this base model ({first[:300]})", model=adapter,
            fix=f"pass the base model the adapter was trained on (adapter_config.json names "
            f"{config.get('base_model_name_or_path')!r}; got {model_name!r})",
        ) from None
    return peft_model


def lora_wrappers(peft_model) -> Dict[nn.Module, Tuple[nn.Module, bool]]:
    """LoRA Linear wrapper -> (base layer, transposed weight?) for every wrapper the dense handler can take."""
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = None
    found = {}
    for module in peft_model.modules():
        if type(module) is not LoraLinear:
            continue
        base = module.get_base_layer()
        if type(base) is nn.Linear:
            found[module] = (base, False)
        elif Conv1D is not None and type(base) is Conv1D:
            found[module] = (base, True)
    return found
