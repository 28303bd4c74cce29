"""The processes of one `compute` run and how they stop together.

Every step that can fail on one process and not on the others (loading, reading the checkpoint,
each round of batches, writing) runs inside `Peers.phase`: afterwards every process learns what
happened everywhere, in one small collective. If any process failed, the main process raises one
`FisherInputError` naming the process and the cause and every other process raises `PeerStopped`
(exit 2, nothing printed) -- so no process is left waiting in a collective for one that died, and
the user reads one `Error:` line, not one traceback per process.

Messages cross processes as fixed-size byte tensors: nothing is pickled.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from typing import Iterator, List, Optional, Sequence

import torch

from mergekit_fisher.errors import FisherInputError

log = logging.getLogger(__name__)

MESSAGE_BYTES = 1024  # per process and phase: room for one error line, cut if longer
LINGER_S = 1.0


class PeerStopped(FisherInputError):
    """Another process failed; the main process says why. Exits 2 without printing."""

    def show(self, file=None) -> None:  # click calls this to print `Error: ...`
        pass


def describe(error: BaseException) -> str:
    """One line: our own errors as they would print, anything else as `Type: first line`."""
    if isinstance(error, FisherInputError):
        return error.message
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def _encode(text: str, device) -> torch.Tensor:
    raw = text.encode("utf-8")[:MESSAGE_BYTES]
    buffer = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    if raw:
        buffer[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return buffer.to(device)


def _decode(buffer: torch.Tensor) -> str:
    raw = bytes(buffer.cpu().tolist()).rstrip(b"\0")
    return raw.decode("utf-8", errors="replace")


class Peers:
    """The world of one run: `world` processes, this one is `rank`; collectives on `device`."""

    def __init__(self, accelerator):
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.lost = False  # a peer stopped answering: no more collectives

    # ------------------------------------------------------------------ failing together
    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Run a step that may fail on some processes; afterwards all of them fail or none."""
        if self.world == 1:
            yield
            return
        failure: Optional[BaseException] = None
        try:
            yield
        except Exception as error:  # KeyboardInterrupt/SystemExit stop the process as they are
            log.debug("process %d failed while %s", self.rank, what, exc_info=True)
            failure = error
        self.settle(what, failure)

    def settle(self, what: str, failure: Optional[BaseException]) -> None:
        """Tell every process about `failure` (None: this one is fine) and stop them all if any
        process failed."""
        if self.world == 1:
            if failure is not None:
                raise failure
            return
        try:
            messages = self._gather(describe(failure) if failure is not None else "")
        except Exception as error:  # a process died (killed, crashed) or never answered
            raise self._lost(what, error) from None
        failed = [(rank, text) for rank, text in enumerate(messages) if text]
        if not failed:
            return
        if not self.is_main:
            # a launcher (torchrun) stops every process once the first one exits: let the main
            # process print the error and exit first
            time.sleep(LINGER_S)
            raise PeerStopped(f"process {failed[0][0]} failed") from None
        if failure is not None and isinstance(failure, FisherInputError) and len(failed) == 1:
            raise failure  # the main process's own error, as a single process would show it
        rank, text = failed[0]
        others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise FisherInputError(
            f"process {rank} of {self.world}{others} failed while {what}: {text}"
            + ("" if isinstance(failure, FisherInputError) or " Fix: " in text else _RERUN),
        ) from None

    def _lost(self, what: str, error: BaseException) -> FisherInputError:
        self.lost = True
        first = str(error).strip().splitlines()[:1]
        cause = f" ({type(error).__name__}: {first[0][:200]})" if first else ""
        make = FisherInputError if self.is_main else PeerStopped
        return make(
            f"another process stopped answering while {what}{cause}",
            fix=(
                "it was killed or crashed, or never started: read its log; every node must run "
                "the same command with the same launcher settings"
            ),
        )

    def _gather(self, text: str) -> List[str]:
        import torch.distributed as dist

        mine = _encode(text, self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        return [_decode(buffer) for buffer in everyone]

    def close(self) -> None:
        """Leave the process group before the interpreter exits: gloo's threads, torn down by
        the interpreter instead, aborted about one 2-process run in five ("terminate called
        without an active exception"); with the barrier and the collection, none in 26."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_available() and dist.is_initialized():
            if not self.lost:  # a peer that stopped answering would never reach the barrier
                dist.barrier()  # no process tears down while another still talks to it
            dist.destroy_process_group()
            gc.collect()  # free the group's threads now, not during interpreter teardown

    # ------------------------------------------------------------------ moving numbers
    def sum_to_main_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the main process's `tensor` becomes the sum over processes (the others' are
        left undefined). No copy on any process."""
        if self.world > 1:
            import torch.distributed as dist

            dist.reduce(tensor, dst=0, op=dist.ReduceOp.SUM)
        return tensor

    def sum_ints(self, values: Sequence[int]) -> List[int]:
        """The sums over processes of a few counters, on every process."""
        tensor = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [int(v) for v in tensor.tolist()]

    def from_main(self, values: Sequence[int]) -> List[int]:
        """The main process's counters, on every process (the others pass placeholders)."""
        tensor = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.broadcast(tensor, src=0)
        return [int(v) for v in tensor.tolist()]


_RERUN = ". Fix: rerun with -v to see that process's traceback"
