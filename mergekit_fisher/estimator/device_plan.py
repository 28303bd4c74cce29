"""`--device-map auto` for `compute`: room for the accumulators, planned by accelerate.

`from_pretrained(device_map="auto")` fills each GPU with weights as if inference were all it had
to do; `compute` then adds a float32 (or float64) accumulator beside every weight on the same
device, and the first device would run out of memory. We plan the map ourselves with accelerate's
`infer_auto_device_map` on a meta-device copy of the model, giving each device the share of its
capacity that its weights may take once their accumulators sit next to them:

    weights_on_device * (1 + accumulator_bytes / weight_bytes) <= capacity

Nothing may land on the CPU or disk when GPUs are used: a per-example gradient needs its weight
on the device that runs the layer.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Union

import torch

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file.writer import human_bytes

Capacity = Dict[Union[int, str], int]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS.update({"GIB": 2**30, "TB": 10**12, "TIB": 2**40})


def parse_max_memory(text: str) -> Capacity:
    """`0=70GiB,1=70GiB` (or `cuda:0=...`, `cpu=...`) -> {0: bytes, 1: bytes}."""
    capacity: Capacity = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, _, size = item.partition("=")
        match = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]*)", size.strip())
        device = device.strip().lower().removeprefix("cuda:")
        unit = match.group(2).upper() if match else None
        if not match or unit not in _UNITS or not (device.isdigit() or device == "cpu"):
            raise FisherInputError(
                f"invalid --max-memory entry {item!r}",
                fix="write DEVICE=SIZE pairs, e.g. --max-memory 0=70GiB,1=70GiB",
            )
        capacity[int(device) if device.isdigit() else device] = int(
            float(match.group(1)) * _UNITS[unit]
        )
    if not capacity:
        raise FisherInputError("empty --max-memory", fix="e.g. --max-memory 0=70GiB,1=70GiB")
    return capacity


def weight_share(weight_dtype: torch.dtype, accumulator_dtype: torch.dtype) -> float:
    """The fraction of a device's memory its weights may take, their accumulators the rest."""
    weight = torch.empty((), dtype=weight_dtype).element_size()
    accumulator = torch.empty((), dtype=accumulator_dtype).element_size()
    return weight / (weight + accumulator)


def plan_device_map(
    meta_model: torch.nn.Module,
    capacity: Capacity,
    *,
    weight_dtype: torch.dtype,
    accumulator_dtype: torch.dtype,
) -> Dict[str, Union[int, str]]:
    """A device map for `meta_model` (built under `accelerate.init_empty_weights`) that leaves room
    for the accumulators on every device of `capacity` (bytes per device)."""
    from accelerate import infer_auto_device_map

    share = weight_share(weight_dtype, accumulator_dtype)
    budget = {device: int(size * share) for device, size in capacity.items()}
    device_map = infer_auto_device_map(
        meta_model,
        max_memory=budget,
        no_split_module_classes=getattr(meta_model, "_no_split_modules", None) or [],
        dtype=weight_dtype,
    )
    gpus = [device for device in capacity if device not in ("cpu", "disk")]
    spilled = sorted({str(d) for d in device_map.values() if d in ("cpu", "disk")})
    if gpus and spilled:
        need = sum(p.numel() for p in meta_model.parameters()) * (
            torch.empty((), dtype=weight_dtype).element_size()
            + torch.empty((), dtype=accumulator_dtype).element_size()
        )
        have = sum(capacity[d] for d in gpus)
        raise FisherInputError(
            f"the model and its accumulators need about {human_bytes(need)}, the GPUs offer "
            f"{human_bytes(have)}: part of the model would go to {' and '.join(spilled)}, where no "
            "per-example gradient can be taken",
            fix=(
                "use more GPUs (or --max-memory to give them more), --dtype bfloat16, or a LoRA "
                "adapter with --params adapter-targets"
            ),
        )
    return device_map


def meta_model(model: str, *, task: str, dtype: torch.dtype, trust_remote_code: bool):
    """The model's architecture on the meta device (its config only: no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from mergekit_fisher.choices import Task

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    cls = AutoModelForSequenceClassification if task == Task.SEQ_CLS else AutoModelForCausalLM
    with init_empty_weights():
        return cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def auto_device_map(
    model: str,
    *,
    task: str,
    dtype: torch.dtype,
    accumulator_dtype: torch.dtype,
    max_memory: Optional[Capacity],
    trust_remote_code: bool,
):
    """`--device-map auto`: the planned map (GPUs present) or "auto" unchanged (no GPU: CPU)."""
    if max_memory is None:
        if not torch.cuda.is_available():
            return None  # everything on the CPU, as without --device-map
        from accelerate.utils import get_max_memory

        max_memory = {d: s for d, s in get_max_memory().items() if d not in ("cpu", "disk")}
    skeleton = meta_model(model, task=task, dtype=dtype, trust_remote_code=trust_remote_code)
    return plan_device_map(
        skeleton, max_memory, weight_dtype=dtype, accumulator_dtype=accumulator_dtype
    )
