"""Writing Fisher files (format v1): incrementally, atomically.

`FisherWriter` takes tensors one at a time and flushes a shard whenever the next tensor would push
it past `max_shard_size`, so at most one shard is held in memory (combining the Fisher files of a 7B
model does not need 28 GB of RAM). Everything is written into a temporary sibling and
renamed into place at the end: a killed run never leaves something that looks like a complete
Fisher file. The global sum / sum of squares for `fisher_config.json` are accumulated on the way,
in float64, from the values as stored.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
import uuid
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Union

import torch
from safetensors.torch import save_file

from mergekit_fisher import __version__
from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file.card import CARD_NAME, render_card
from mergekit_fisher.fisher_file.config import (
    CONFIG_FILENAME,
    HEADER_CONFIG_KEY,
    INDEX_FILENAME,
    SINGLE_FILENAME,
    FisherConfig,
    GlobalStats,
)
from mergekit_fisher.fisher_file.paths import is_inside

DEFAULT_MAX_SHARD_SIZE = "5GB"


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_shard_size(value: Union[int, str]) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes (HF's units: KB = 1000 B, KiB = 1024 B)."""
    if isinstance(value, int) and value > 0:
        return value
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except (KeyError, ValueError):
        size = 0
    if size < 1:
        raise FisherInputError(
            f"invalid shard size {value!r}",
            fix="use a size such as 5GB, 500MB or 2GiB (--max-shard-size)",
        )
    return int(size)


def check_output_free(
    path: str,
    overwrite: bool,
    *,
    fix: str = "choose another path or pass --overwrite",
    inputs: Iterable[Optional[str]] = (),
    needed_bytes: Optional[int] = None,
) -> None:
    """The one place for output checks; callers call it early, before any expensive work.

    * an existing `path` needs `overwrite`;
    * `path` must not be, contain or lie inside any of `inputs` (compared as realpaths, after
      symlinks): replacing it would delete the model, the data or the Fisher being read -- with or
      without --overwrite;
    * its parent must be a directory we can write (or creatable in one), with `needed_bytes` free.
    """
    out_real = os.path.realpath(path)
    for given in inputs:
        if not given or not os.path.lexists(given):
            continue  # a hub id, an unset option
        real = os.path.realpath(given)
        if is_inside(out_real, real) or is_inside(real, out_real):
            relation = (
                "is"
                if out_real == real
                else "lies inside"
                if is_inside(out_real, real)
                else "contains"
            )
            raise FisherInputError(
                f"the output {relation} the input {given}; writing it would "
                + ("overwrite" if relation != "lies inside" else "change")
                + " that input",
                file=path,
                kind="output",
                fix="choose an OUT outside every input (model, adapter, data, Fisher files)",
            )
    if os.path.lexists(path) and not overwrite:
        raise FisherInputError("output already exists", file=path, kind="output", fix=fix)
    check_output_writable(path, needed_bytes)


def _existing_ancestor(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path)) or os.sep
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"  # unreachable


def check_output_writable(path: str, needed_bytes: Optional[int] = None) -> None:
    """Before any computation: OUT's parent is (or can be made) a directory we can write, on a
    filesystem with `needed_bytes` free -- the errors a write would otherwise raise only at the very
    end."""
    ancestor = _existing_ancestor(path)
    if not os.path.isdir(ancestor):
        raise FisherInputError(
            f"its parent {ancestor} is not a directory",
            file=path,
            kind="output",
            fix="choose an OUT whose parent is a directory",
        )
    try:  # really create a file: os.access says yes to root on a read-only filesystem
        fd, probe = tempfile.mkstemp(prefix=".mergekit-fisher-probe-", dir=ancestor)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise FisherInputError(
            f"cannot write in {ancestor} ({error.strerror or error})",
            file=path,
            kind="output",
            fix="choose an OUT in a directory you can write, or fix its permissions",
        ) from None
    if needed_bytes is not None:
        free = shutil.disk_usage(ancestor).free
        if free < needed_bytes:
            raise FisherInputError(
                f"not enough free space in {ancestor}: the output needs about "
                f"{human_bytes(needed_bytes)}, "
                f"{human_bytes(free)} are free",
                file=path,
                kind="output",
                fix="free some space, or choose an OUT on another filesystem",
            )


def estimated_size(num_elements: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a Fisher of `num_elements` values takes on disk (headers and config are noise)."""
    return int(num_elements) * torch.empty((), dtype=dtype).element_size() + 64 * 1024


LOCK_SUFFIX = ".lock"
_LOCK_SIGNATURE = b"mergekit-fisher output lock"


def lock_path(path: str) -> str:
    return os.path.abspath(path).rstrip(os.sep) + LOCK_SUFFIX


@contextlib.contextmanager
def output_lock(path: str) -> Iterator[str]:
    """Hold `OUT.lock` (an exclusive `fcntl.flock`) while a run writes OUT, its checkpoint and
    temporaries: a second run on the same OUT fails at once instead of racing the first. The kernel
    releases a killed run's lock, so a leftover file never blocks a rerun (or a resume); the file is
    removed on exit. Parents of OUT that do not exist are created, and removed again on exit if they
    stay empty."""
    import fcntl

    target = lock_path(path)
    created = []
    parent = os.path.dirname(target)
    while not os.path.lexists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
    except OSError as error:
        raise FisherInputError(
            f"cannot create the output's parent ({error.strerror or error})",
            file=path,
            kind="output",
            fix="choose an OUT in a directory you can write",
        ) from None
    try:
        while True:
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise FisherInputError(
                    f"another run is writing this output (it holds {target})",
                    file=path,
                    kind="output",
                    fix="wait for it to finish, or choose another OUT",
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(target).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file we locked: lock the new one
        content = os.pread(fd, 256, 0)
        if content and not content.startswith(_LOCK_SIGNATURE):
            os.close(fd)
            raise FisherInputError(
                f"{target} exists and is not a mergekit-fisher lock file",
                file=path,
                kind="output",
                fix=f"move {target} away, or choose another OUT",
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, _LOCK_SIGNATURE + f" (pid {os.getpid()})\n".encode(), 0)
        try:
            yield target
        finally:
            try:
                os.remove(target)
            except OSError:
                pass
            os.close(fd)
    finally:
        for directory in created:  # innermost first
            try:
                os.rmdir(directory)
            except OSError:
                break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: str, mode: int) -> None:
    # mkstemp/mkdtemp create private (0600/0700) entries; give the result ordinary permissions.
    os.chmod(path, mode & ~_umask())


def shard_name(index: int, count: int) -> str:
    """HF-style shard names: fisher-00001-of-00003.safetensors."""
    return f"fisher-{index:05d}-of-{count:05d}.safetensors"


class FisherWriter:
    """Add Fisher tensors one by one; `close()` publishes the file and returns its final config.

    `out_path` ending in ``.safetensors`` gives one standalone file with the config in its header
    (all tensors are held until `close`); anything else is a directory with ``fisher.safetensors``
    or shards + ``fisher.safetensors.index.json``, and ``fisher_config.json``.
    Use as a context manager: an exception inside the block discards everything written.
    """

    def __init__(
        self,
        out_path: Union[str, os.PathLike],
        config: Optional[FisherConfig] = None,
        *,
        dtype: torch.dtype = torch.float32,
        max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
        overwrite: bool = False,
    ):
        self.out_path = os.path.abspath(os.fspath(out_path))
        check_output_free(self.out_path, overwrite)
        self.config = config or FisherConfig()
        self.dtype = dtype
        self.max_shard_size = parse_shard_size(max_shard_size)
        self.single_file = self.out_path.endswith(".safetensors")
        parent = os.path.dirname(self.out_path) or "."
        os.makedirs(parent, exist_ok=True)
        self._tmp_dir = tempfile.mkdtemp(
            prefix=f".{os.path.basename(self.out_path)}.tmp-", dir=parent
        )
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[Dict[str, str]] = []  # per flushed shard: its temp file and tensor names
        self._names: set = set()
        self._stats = GlobalStats(sum=0.0, sum_sq=0.0, num_elements=0)  # of the values as stored
        self._total_bytes = 0
        self._closed = False
        self.written: Optional[FisherConfig] = None  # the final config, once closed

    # ------------------------------------------------------------------ adding
    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        stored = tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()
        self._stats = self._stats + GlobalStats.of_tensor(stored)
        size = stored.numel() * stored.element_size()
        self._total_bytes += size
        if (
            not self.single_file
            and self._pending
            and self._pending_bytes + size > self.max_shard_size
        ):
            self._flush()
        self._names.add(name)
        self._pending[name] = stored
        self._pending_bytes += size

    def _flush(self) -> None:
        path = os.path.join(self._tmp_dir, f"part-{len(self._shards):05d}.safetensors")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append({"path": path, "names": list(self._pending)})
        self._pending = {}
        self._pending_bytes = 0

    # ------------------------------------------------------------------ closing
    def final_config(self) -> FisherConfig:
        return self.config.model_copy(
            update={
                "sum": self._stats.sum,
                "sum_sq": self._stats.sum_sq,
                "num_elements": self._stats.num_elements,
                "dtype": str(self.dtype).replace("torch.", ""),
                "tool_version": self.config.tool_version or f"mergekit-fisher {__version__}",
                "created": self.config.created
                or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
        )

    def close(self) -> FisherConfig:
        if self._closed:
            raise RuntimeError("FisherWriter already closed")
        self._closed = True
        config = self.final_config()
        config_json = config.model_dump_json(indent=2, exclude_none=True)
        try:
            if self.single_file:
                staged = os.path.join(self._tmp_dir, SINGLE_FILENAME)
                save_file(
                    self._pending, staged, metadata={HEADER_CONFIG_KEY: config_json, "format": "pt"}
                )
                _publish_mode(staged, 0o666)
                self._replace(staged)
            else:
                if self._pending or not self._shards:
                    self._flush()
                self._name_shards()
                with open(
                    os.path.join(self._tmp_dir, CONFIG_FILENAME), "w", encoding="utf-8"
                ) as fp:
                    fp.write(config_json + "\n")
                # the Fisher's model card: a published Fisher says what it is (fisher_file/card.py)
                with open(os.path.join(self._tmp_dir, CARD_NAME), "w", encoding="utf-8") as fp:
                    fp.write(render_card(config, self.out_path))
                _publish_mode(self._tmp_dir, 0o777)
                self._replace(self._tmp_dir)
        finally:
            self._pending = {}
            if os.path.exists(self._tmp_dir):
                shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self.written = config
        return config

    def _name_shards(self) -> None:
        count = len(self._shards)
        if count == 1:
            os.rename(self._shards[0]["path"], os.path.join(self._tmp_dir, SINGLE_FILENAME))
            return
        weight_map = {}
        for index, shard in enumerate(self._shards, start=1):
            name = shard_name(index, count)
            os.rename(shard["path"], os.path.join(self._tmp_dir, name))
            weight_map.update({tensor: name for tensor in shard["names"]})
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(os.path.join(self._tmp_dir, INDEX_FILENAME), "w", encoding="utf-8") as fp:
            json.dump(index, fp, indent=2)

    def _replace(self, staged: str) -> None:
        # overwrite=True: move the old output aside, move the complete new one in, then drop the
        # old; if the second rename fails the old output is put back.
        old = None
        if os.path.lexists(self.out_path):
            parent, base = os.path.split(self.out_path)
            old = os.path.join(parent, f".{base}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(self.out_path, old)
        try:
            os.rename(staged, self.out_path)
        except BaseException:
            if old is not None:
                os.rename(old, self.out_path)
            raise
        if old is not None:
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)

    def abort(self) -> None:
        self._closed = True
        self._pending = {}
        shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def __enter__(self) -> "FisherWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_fisher(
    tensors: Mapping[str, torch.Tensor],
    out_path: Union[str, os.PathLike],
    config: Optional[FisherConfig] = None,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> FisherConfig:
    """Write a whole mapping (checkpoint names -> Fisher values) at once; see `FisherWriter`."""
    writer = FisherWriter(
        out_path, config, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite
    )
    try:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
