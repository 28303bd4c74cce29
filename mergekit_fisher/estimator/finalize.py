"""The end of a run: the accumulated sums become the Fisher file, one tensor at a time.

For each parameter in turn: its sum is reduced in place onto the main process, divided in place,
moved to the CPU, renamed/re-laid-out to the checkpoint's stored tensors and handed to the
incremental `FisherWriter`; the accumulator's reference is dropped at once. No process ever holds
more than its accumulators plus one tensor (and the writer's pending shard, which on the CPU is
made of the very tensors handed over: safetensors writes them from their own memory).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import torch

from mergekit_fisher.errors import FisherInputError

log = logging.getLogger(__name__)

StoredLayout = Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]


FINITE_CHUNK = 1 << 20  # elements checked at once


def all_finite(tensor: torch.Tensor) -> bool:
    """`isfinite(tensor).all()` in chunks: on the whole tensor it allocates temporaries of up to
    1.75x the tensor (measured, bench/bench_memory.py), on top of every accumulator."""
    flat = tensor.reshape(-1)
    return all(
        bool(torch.isfinite(flat[start : start + FINITE_CHUNK]).all())
        for start in range(0, flat.numel(), FINITE_CHUNK)
    )


def check_finite(sums: Dict[str, torch.Tensor], names: Dict[str, List[str]], model: str) -> None:
    """Every process checks its own partial sums: a NaN/Inf anywhere makes the total non-finite
    (and finite partial sums of squares cannot sum to NaN), so all processes agree without
    reducing first."""
    for key, value in sums.items():
        if not all_finite(value):
            raise FisherInputError(
                "non-finite (NaN/Inf) gradients",
                model=model,
                tensor=names.get(key, [key])[0],
                fix=(
                    "check the model weights and data; try --dtype float32 if the model ran in "
                    "half precision"
                ),
            )


def stream_to_writer(
    sums: Dict[str, torch.Tensor],
    peers,
    *,
    names: Dict[str, List[str]],
    num_examples: int,
    stored_layout: StoredLayout,
    writer,
) -> Optional[BaseException]:
    """Empty `sums` (popping each entry) into `writer` (main process; None elsewhere). Returns the
    main process's write failure instead of raising it: every process must still take part in the
    remaining reductions, then all stop together (`Peers.settle`)."""
    failure: Optional[BaseException] = None
    for key in list(sums):
        tensor = sums.pop(key)
        peers.sum_to_main_(tensor)
        if writer is None or failure is not None:
            del tensor
            continue
        try:
            tensor.div_(num_examples)
            fisher = tensor.to("cpu")
            del tensor  # the device copy (when the accumulator lived on a GPU)
            first, *others = names[key]
            # tied weights stored under several names: one copy each (safetensors stores no
            # shared memory)
            tensors = {first: fisher, **{name: fisher.clone() for name in others}}
            for name, value in stored_layout(tensors).items():
                writer.add(name, value)
        except Exception as error:  # disk full, unwritable: stop after the reductions
            log.debug("writing the Fisher failed", exc_info=True)
            failure = error
    return failure
