"""Load tokenizer and model (optionally with a LoRA adapter) and work out checkpoint tensor
names."""

from __future__ import annotations

import json
import os
from typing import Optional, Set

import torch

from mergekit_fisher.choices import Dtype, Task
from mergekit_fisher.errors import FisherInputError

# keyed by the enum; its members are their strings, so DTYPES["float32"] works too
DTYPES = {
    Dtype.FLOAT32: torch.float32,
    Dtype.FLOAT64: torch.float64,
    Dtype.BFLOAT16: torch.bfloat16,
    Dtype.FLOAT16: torch.float16,
}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else error.__class__.__name__)[:300]


def check_model_path(model: str) -> None:
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not os.path.isdir(model):
        raise FisherInputError(
            "model directory does not exist",
            model=model,
            fix="check the MODEL path (a directory saved with save_pretrained, or a hub id)",
        )


REMOTE_CODE_PROBLEM = (
    "the model's architecture is defined by Python files shipped with it (auto_map in "
    "config.json), "
    "which are not run by default"
)
REMOTE_CODE_FIX = "read those files, then pass --trust-remote-code if you trust them"


def check_remote_code(model: str, trust_remote_code: bool) -> None:
    """A config with `auto_map` ships its own code: refused without --trust-remote-code, even when
    its `model_type` is a built-in one (transformers would then quietly use the built-in class
    instead)."""
    if trust_remote_code:
        return
    config_path = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(config_path):
        try:  # a Hub id: its config.json, as from_pretrained would fetch it
            from transformers.utils import cached_file

            config_path = cached_file(model, "config.json")
        except Exception:
            config_path = None
        if not config_path:
            return  # from_pretrained says what is wrong
    try:
        with open(config_path, encoding="utf-8") as fp:
            config = json.load(fp)
    except (OSError, ValueError):
        return  # transformers reports a broken config.json when it loads the model
    if isinstance(config, dict) and config.get("auto_map"):
        raise FisherInputError(REMOTE_CODE_PROBLEM, model=model, fix=REMOTE_CODE_FIX)


def load_tokenizer(model: str, *, trust_remote_code: bool, fallback: Optional[str] = None):
    from transformers import AutoTokenizer

    errors = []
    for source in [model] + ([fallback] if fallback else []):
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as error:  # OSError, ValueError from missing files
            errors.append(_first_line(error))
    raise FisherInputError(
        f"cannot load a tokenizer ({errors[0]})",
        model=model,
        fix="save the tokenizer next to the model (tokenizer.save_pretrained(MODEL))",
    )


def load_model(
    model: str, *, task: str, dtype: str, device_map: Optional[str], trust_remote_code: bool
):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_remote_code(model, trust_remote_code)
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
        if not trust_remote_code and (
            "custom code" in str(error) or "trust_remote_code" in str(error)
        ):
            raise FisherInputError(REMOTE_CODE_PROBLEM, model=model, fix=REMOTE_CODE_FIX) from None
        raise FisherInputError(
            f"cannot load the model for --task {task} ({_first_line(error)})",
            model=model,
            fix="check the path / hub id, --task, and --trust-remote-code for custom architectures",
        ) from None
    loaded.eval()  # dropout off: the Fisher of the model as it predicts
    for param in loaded.parameters():
        param.requires_grad_(False)
    return loaded


def checkpoint_names(model_dir: str) -> Optional[Set[str]]:
    """Tensor names the saved checkpoint holds (its index / safetensors headers only), or None if
    unknown (a hub id, a pickle-only checkpoint): then every parameter is written under its
    in-memory name."""
    if not os.path.isdir(model_dir):
        return None
    from mergekit_fisher.tools.checkpoint import checkpoint_index

    try:
        return set(checkpoint_index(model_dir).tensor_paths) or None
    except FisherInputError:
        return None
