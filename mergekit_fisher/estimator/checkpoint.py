"""Resumable state: accumulators + position in ONE safetensors file (JSON state in its header),
replaced atomically. Never pickle."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional

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


def checkpoint_identity_state(identity: dict) -> dict:
    """What a checkpoint records of the model it was computed for: its weights' fingerprints."""
    return {
        "model_fingerprint": identity.get("model_fingerprint"),
        "adapter_fingerprint": identity.get("adapter_fingerprint"),
    }


def restore_sums(path: str, sums: Dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's sums into the accumulators `sums`, one tensor at a time (never a second
    copy of them all)."""
    with safe_open(path, framework="pt") as handle:
        stored = set(handle.keys())
        if stored != set(sums):
            raise FisherInputError(
                "the checkpoint holds other tensors than this run accumulates",
                file=path,
                kind="checkpoint",
                fix="delete the checkpoint file to start over",
            )
        for key, target in sums.items():
            target.copy_(handle.get_tensor(key).to(target.device, target.dtype))


def load_checkpoint(path: str, fingerprint: str, identity: Optional[dict] = None) -> Optional[dict]:
    """The state of a checkpoint written by the same run: the same options and data
    (`fingerprint`) and the same weights (`identity`'s fingerprints); anything else is refused.
    The sums are read later, into the accumulators (`restore_sums`)."""
    if not os.path.lexists(path):
        return None
    try:
        if not os.path.isfile(path):
            raise OSError("not a regular file")
        with safe_open(path, framework="pt") as handle:
            state = json.loads((handle.metadata() or {})[STATE_KEY])
        if not isinstance(state, dict):
            raise ValueError("state is not a JSON object")
    except Exception as error:
        raise FisherInputError(
            f"unreadable checkpoint ({error.__class__.__name__})",
            file=path,
            kind="checkpoint",
            fix="delete the checkpoint file to start over",
        ) from None
    if state.get("fingerprint") != fingerprint:
        raise FisherInputError(
            "the checkpoint was written by a run with different options or data",
            file=path,
            kind="checkpoint",
            fix=(
                "rerun with exactly the same options to resume, or delete the checkpoint file to "
                "start over"
            ),
        )
    if identity is not None:
        for key, what in (("model_fingerprint", "model"), ("adapter_fingerprint", "adapter")):
            then, now = state.get(key), checkpoint_identity_state(identity)[key]
            if then != now:
                raise FisherInputError(
                    f"the {what}'s weights changed since the checkpoint was written (fingerprint "
                    f"{then} then, "
                    f"{now} now): resuming would mix the Fisher of two models",
                    file=path,
                    kind="checkpoint",
                    fix=f"restore the {what} the run started with to resume, or delete the "
                    "checkpoint file "
                    "to start over",
                )
    return state
