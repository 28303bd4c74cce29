"""Load tokenizer and model (optionally with a LoRA adapter) and work out checkpoint tensor names."""

from __future__ import annotations

import os
from typing import List, Optional, Set

import torch

from mergekit_fisher.choices import Dtype, Task
from mergekit_fisher.errors import FisherInputError

# keyed by the enum; its members are their strings, so DTYPES["float32"] works too
DTYPES = {Dtype.FLOAT32: torch.float32, Dtype.FLOAT64: torch.float64, Dtype.BFLOAT16: torch.bfloat16,
          Dtype.FLOAT16: torch.float16}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else error.__class__.__name__)[:300]


def check_model_path(model: str) -> None:
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not os.path.isdir(model):
        raise FisherInputError("model directory does not exist", model=model,
                               fix="check the MODEL path (a directory saved with save_pretrained, or a hub id)")


def load_tokenizer(model: str, *, trust_remote_code: bool, fallback: Optional[str] = None):
    from transformers import AutoTokenizer

    errors = []
    for source in [model] + ([fallback] if fallback else []):
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as error:  # OSError, ValueError from missing files
            errors.append(_first_line(error))
    raise FisherInputError(
        f"cannot load a tokenizer ({errors[0]})", model=model,
        fix="save the tokenizer next to the model (tokenizer.save_pretrained(MODEL))",
    )


def load_model(model: str, *, task: str, dtype: str, device_map: Optional[str], trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == Task.SEQ_CLS else AutoModelForCausalLM
    kwargs = {
        "dtype": DTYPES[dtype],
        "trust_remote_code": trust_remote_code,
        # MoE experts as plain per-expert matmuls: exact in every dtype (grouped_mm has no float64)
        "experts_implementation": "eager",
    }
    if device_map:
        kwargs["device_map"] = device_map
    try:
        loaded = cls.from_pretrained(model, **kwargs)
    except Exception as error:
        if not trust_remote_code and ("custom code" in str(error) or "trust_remote_code" in str(error)):
            raise FisherInputError(
                "the model's architecture is defined by Python files shipped with it (auto_map in config.json), "
                "which are not run by default", model=model,
                fix="read those files, then pass --trust-remote-code if you trust them",
            ) from None
        raise FisherInputError(
            f"cannot load the model for --task {task} ({_first_line(error)})", model=model,
            fix="check the path / hub id, --task, and --trust-remote-code for custom architectures",
        ) from None
    loaded.eval()  # dropout off: the Fisher of the model as it predicts
    for param in loaded.parameters():
        param.requires_grad_(False)
    return loaded


def checkpoint_names(model_dir: str) -> Optional[Set[str]]:
    """Tensor names the saved checkpoint holds (its index / safetensors headers only), or None if unknown
    (a hub id, a pickle-only checkpoint): then every parameter is written under its in-memory name."""
    if not os.path.isdir(model_dir):
        return None
    from mergekit_fisher.tools.checkpoint import checkpoint_index

    try:
        return set(checkpoint_index(model_dir).tensor_paths) or None
    except FisherInputError:
        return None
