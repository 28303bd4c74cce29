"""Resumable state: accumulators + position in ONE safetensors file (JSON state in its header), replaced
atomically. Never pickle."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_fisher.errors import FisherInputError

STATE_KEY = "mergekit_fisher_state"


def checkpoint_path(out_dir: str) -> str:
    return os.path.abspath(out_dir).rstrip(os.sep) + ".checkpoint.safetensors"


def save_checkpoint(path: str, sums: Dict[str, torch.Tensor], state: dict) -> None:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=parent)
    os.close(fd)
    try:
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in sums.items()}
        save_file(tensors, tmp, metadata={STATE_KEY: json.dumps(state), "format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, fingerprint: str) -> Optional[Tuple[Dict[str, torch.Tensor], dict]]:
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            state = json.loads((handle.metadata() or {})[STATE_KEY])
            sums = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise FisherInputError(
            f"unreadable checkpoint ({error.__class__.__name__})", file=path, kind="checkpoint",
            fix="delete the checkpoint file to start over",
        ) from None
    if state.get("fingerprint") != fingerprint:
        raise FisherInputError(
            "the checkpoint was written by a run with different options or data", file=path, kind="checkpoint",
            fix="rerun with exactly the same options to resume, or delete the checkpoint file to start over",
        )
    return sums, state
