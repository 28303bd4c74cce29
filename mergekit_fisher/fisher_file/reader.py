"""Lazy, thread-safe reading of Fisher files (format v1).

Nothing here loads a tensor until it is asked for: opening a file reads headers only. Handles are
cached per shard and guarded by a lock, so mergekit's ``--multi-gpu`` worker threads can share one
`FisherFile`. Pickle-based files are refused outright -- they are never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file.config import (
    CONFIG_FILENAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_CONFIG_KEY,
    INDEX_FILENAME,
    SINGLE_FILENAME,
    FisherConfig,
    GlobalStats,
)
from mergekit_fisher.fisher_file.paths import check_regular_file, contained_shard

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ALLOWED_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}
# Tensors are read with positional reads (os.preadv) into fresh buffers rather than through a
# memory map: a long merge then keeps only the tensors in use resident, not every page it touched.
_PREAD = hasattr(os, "preadv") and sys.byteorder == "little"
CONVERT_HINT = "convert it to a Fisher file with `mergekit-fisher convert IN OUT --model MODEL`"
REPAIR_FIX = "recompute the Fisher file, or restore it from its source"


@dataclass(frozen=True)
class TensorHeader:
    shape: Tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "F32"


def _safetensors_error(path: str, error: Exception) -> FisherInputError:
    return FisherInputError(
        f"not a valid safetensors file ({error})",
        file=path,
        fix="recompute it with `mergekit-fisher compute`, or re-download it (it may be truncated)",
    )


def load_weight_map(index_path: str) -> Dict[str, object]:
    """The `weight_map` of a Fisher directory's `fisher.safetensors.index.json`; ValueError if
    broken. Its values are not checked here: `paths.contained_shard` checks each before anything is
    opened.

    (Model checkpoints are read by mergekit's `ShardedTensorIndex`, see `tools.checkpoint`; it only
    knows `model.safetensors*` names and does not check the index, which a Fisher file must.)"""
    try:
        with open(index_path, encoding="utf-8") as fp:
            weight_map = json.load(fp)["weight_map"]
    except (
        ValueError,
        KeyError,
        TypeError,
        OSError,
    ) as error:  # UnicodeDecodeError is a ValueError
        raise ValueError(repr(error)) from None
    if not isinstance(weight_map, dict):
        raise ValueError("weight_map is not a mapping")
    return weight_map


class FisherFile:
    """One Fisher file or directory. Cheap to construct: reads headers and JSON only."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(str(path)))
        self._lock = threading.Lock()
        self._handles: Dict[str, object] = {}
        self._fds: Dict[str, int] = {}
        self._locations: Dict[
            str, Tuple[int, int]
        ] = {}  # name -> (absolute begin, end) in its shard
        self._stats: Optional[GlobalStats] = None
        self.values_checked = False  # set once a full pass has checked every value
        self.config: Optional[FisherConfig] = None
        self.tensor_paths: Dict[str, str] = {}  # tensor name -> shard file
        self._headers: Dict[str, TensorHeader] = {}
        self._resolve()

    # ---------------------------------------------------------------- layout
    def _resolve(self) -> None:
        path = self.path
        if not os.path.exists(path):
            raise FisherInputError(
                "Fisher file does not exist",
                file=path,
                fix=(
                    "check the `fisher:` path (use an absolute path), or compute it with "
                    "`mergekit-fisher compute`"
                ),
            )
        if os.path.isdir(path):
            self._resolve_directory(path)
        else:
            self._resolve_single(path)
        self._read_headers()

    def _refuse_pickle(self, path: str) -> None:
        raise FisherInputError(
            "refusing to read a pickle-based file: unpickling can run arbitrary code",
            file=path,
            fix=CONVERT_HINT,
        )

    def _resolve_single(self, path: str) -> None:
        if path.lower().endswith(PICKLE_SUFFIXES):
            self._refuse_pickle(path)
        if not path.endswith(".safetensors"):
            raise FisherInputError(
                "unrecognised Fisher file: expected a .safetensors file or a Fisher directory",
                file=path,
                fix=CONVERT_HINT,
            )
        check_regular_file(path, fix=REPAIR_FIX)
        self.tensor_paths = {name: path for name in self._shard_names(path)}
        with self._open_raw(path) as handle:
            metadata = handle.metadata() or {}
        if HEADER_CONFIG_KEY in metadata:
            self.config = self._parse_config(metadata[HEADER_CONFIG_KEY], path)

    def _resolve_directory(self, path: str) -> None:
        config_path = os.path.join(path, CONFIG_FILENAME)
        if os.path.lexists(config_path):
            self.config = self._parse_config(self._read_text(config_path), config_path)
        index_path = os.path.join(path, INDEX_FILENAME)
        single_path = os.path.join(path, SINGLE_FILENAME)
        if os.path.lexists(index_path):
            check_regular_file(index_path, fix=REPAIR_FIX)
            try:
                weight_map = load_weight_map(index_path)
            except ValueError as error:
                raise FisherInputError(
                    f"broken shard index ({error})",
                    file=index_path,
                    fix=REPAIR_FIX,
                ) from None
            # every entry is checked (contained, regular) before any shard -- or any other file --
            # is opened
            for name, shard in weight_map.items():
                self.tensor_paths[name] = contained_shard(
                    path,
                    shard,
                    index_name=INDEX_FILENAME,
                    tensor=name,
                    fix="a Fisher directory's index names only its own shard files: "
                    "copy the complete Fisher directory (all shards), or recompute it",
                )
        elif os.path.lexists(single_path):
            check_regular_file(single_path, fix=REPAIR_FIX)
            self.tensor_paths = {name: single_path for name in self._shard_names(single_path)}
        else:
            pickles = [f for f in sorted(os.listdir(path)) if f.lower().endswith(PICKLE_SUFFIXES)]
            if pickles:
                self._refuse_pickle(os.path.join(path, pickles[0]))
            raise FisherInputError(
                f"directory holds neither {SINGLE_FILENAME} nor {INDEX_FILENAME}",
                file=path,
                fix="point `fisher:` at the output directory of `mergekit-fisher compute`",
            )

    @staticmethod
    def _read_text(path: str) -> str:
        """A small JSON file of the directory (config, index): a regular file, valid UTF-8."""
        check_regular_file(path, fix="restore it from the `mergekit-fisher compute` output")
        try:
            with open(path, encoding="utf-8") as fp:
                return fp.read()
        except UnicodeDecodeError as error:
            raise FisherInputError(
                f"not UTF-8 text (byte {error.start}: {error.reason})",
                file=path,
                fix="restore it from the `mergekit-fisher compute` output (JSON, UTF-8)",
            ) from None
        except OSError as error:
            raise FisherInputError(
                f"cannot read it ({error.strerror or error})",
                file=path,
                fix="check its permissions",
            ) from None

    @staticmethod
    def _parse_config(text: str, where: str) -> FisherConfig:
        try:
            config = FisherConfig.model_validate_json(text)
        except ValueError as error:
            raise FisherInputError(
                f"unreadable Fisher config ({error.__class__.__name__}: "
                f"{str(error).splitlines()[0]})",
                file=where,
                fix="restore fisher_config.json from the `mergekit-fisher compute` output",
            ) from None
        if config.format != FORMAT_NAME or config.format_version > FORMAT_VERSION:
            raise FisherInputError(
                f"unsupported Fisher format {config.format!r} version {config.format_version} "
                f"(this mergekit-fisher reads {FORMAT_NAME!r} up to version {FORMAT_VERSION})",
                file=where,
                fix="upgrade mergekit-fisher, or convert the file with `mergekit-fisher convert`",
            )
        return config

    def _open_raw(self, shard: str):
        try:
            return safe_open(shard, framework="pt", device="cpu")
        except Exception as error:  # SafetensorError, OSError, ...
            raise _safetensors_error(shard, error) from None

    def _shard_names(self, shard: str) -> List[str]:
        with self._open_raw(shard) as handle:
            return list(handle.keys())

    def _read_headers(self) -> None:
        by_shard: Dict[str, List[str]] = {}
        for name, shard in self.tensor_paths.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            with self._open_raw(shard) as handle:
                available = set(handle.keys())
                for name in names:
                    if name not in available:
                        raise FisherInputError(
                            f"the index lists this tensor in {os.path.basename(shard)} but the "
                            "shard lacks it",
                            file=self.path,
                            tensor=name,
                            fix="recompute the Fisher file, or restore the complete shard",
                        )
                    info = handle.get_slice(name)
                    dtype = info.get_dtype()
                    if dtype not in ALLOWED_DTYPES:
                        raise FisherInputError(
                            f"unsupported dtype {dtype} (Fisher values must be floating point)",
                            file=self.path,
                            tensor=name,
                            fix="store Fisher values as float32 or bfloat16",
                        )
                    self._headers[name] = TensorHeader(tuple(info.get_shape()), dtype)
            self._locations.update(self._data_offsets(shard, names))

    @staticmethod
    def _data_offsets(shard: str, names: List[str]) -> Dict[str, Tuple[int, int]]:
        # safetensors layout: u64 little-endian header size N, N bytes of JSON, then the data.
        with open(shard, "rb") as fp:
            (header_size,) = struct.unpack("<Q", fp.read(8))
            header = json.loads(fp.read(header_size))
        start = 8 + header_size
        return {
            name: (start + header[name]["data_offsets"][0], start + header[name]["data_offsets"][1])
            for name in names
        }

    # ---------------------------------------------------------------- queries
    def __contains__(self, name: str) -> bool:
        return name in self.tensor_paths

    def names(self) -> List[str]:
        return list(self.tensor_paths)

    def header(self, name: str) -> TensorHeader:
        return self._headers[name]

    def find(self, *candidates: str) -> Optional[str]:
        """The first of `candidates` stored in this file (checkpoint name, aliases, tied names)."""
        for name in candidates:
            if name and name in self.tensor_paths:
                return name
        return None

    def _handle(self, shard: str):
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._open_raw(shard)
            self._handles[shard] = handle
        return handle

    def _fd(self, shard: str) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                fd = os.open(shard, os.O_RDONLY)
                self._fds[shard] = fd
            return fd

    def _read(self, name: str) -> torch.Tensor:
        header = self._headers[name]
        dtype = ALLOWED_DTYPES[header.dtype]
        begin, end = self._locations[name]
        if end == begin:
            return torch.empty(header.shape, dtype=dtype)
        buffer = bytearray(end - begin)
        view = memoryview(buffer)
        fd = self._fd(self.tensor_paths[name])
        done = 0
        while done < len(buffer):  # positional reads: no shared file offset, safe across threads
            count = os.preadv(fd, [view[done:]], begin + done)
            if count <= 0:
                raise FisherInputError(
                    "file is shorter than its header says",
                    file=self.tensor_paths[name],
                    tensor=name,
                    fix="the file is truncated: copy or recompute it",
                )
            done += count
        return torch.frombuffer(buffer, dtype=dtype).reshape(header.shape)

    def get_tensor(self, name: str, *, check: bool = True) -> torch.Tensor:
        """Load one tensor as float32 on the CPU; with `check`, refuse NaN/Inf/negative values."""
        if _PREAD:
            raw = self._read(name)
        else:
            with self._lock:
                raw = self._handle(self.tensor_paths[name]).get_tensor(name)
        tensor = raw.to(torch.float32) if raw.dtype != torch.float32 else raw
        if check:
            check_fisher_values(tensor, file=self.path, tensor=name)
        return tensor

    def iter_tensors(self, *, check: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        for name in self.tensor_paths:
            yield name, self.get_tensor(name, check=check)

    def global_stats(self) -> GlobalStats:
        """From the config when it carries them, else one streaming pass (which also checks
        values)."""
        if self._stats is None:
            stats = self.config.global_stats() if self.config is not None else None
            if stats is None:
                stats = self.compute_stats()
            self._stats = stats
        return self._stats

    def remember_stats(self, computed: GlobalStats) -> None:
        """Keep stats computed by a full pass, unless the file's own metadata provides them."""
        if self._stats is None:
            stats = self.config.global_stats() if self.config is not None else None
            self._stats = stats or computed

    def compute_stats(self) -> GlobalStats:
        stats = GlobalStats(sum=0.0, sum_sq=0.0, num_elements=0)
        for _name, tensor in self.iter_tensors(check=True):
            stats = stats + GlobalStats.of_tensor(tensor)
        return stats

    def close(self) -> None:
        with self._lock:
            self._handles.clear()
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def check_fisher_values(
    values: torch.Tensor, *, file: Optional[str] = None, tensor: Optional[str] = None
) -> None:
    """A Fisher is a mean of squares: finite and >= 0. Anything else is a broken file."""
    # A float64 sum of float32/bf16 values cannot overflow, so it is finite iff every value is:
    # one pass instead of isfinite + all (the expensive part of a validation scan).
    if not math.isfinite(float(values.sum(dtype=torch.float64))):
        bad = int((~torch.isfinite(values)).sum())
        raise FisherInputError(
            f"{bad} non-finite (NaN/Inf) Fisher value(s)",
            file=file,
            tensor=tensor,
            fix="recompute it with `mergekit-fisher compute`, which refuses non-finite gradients; "
            "check the model itself for NaN/Inf weights",
        )
    if values.numel() and float(values.min()) < 0:
        bad = int((values < 0).sum())
        raise FisherInputError(
            f"{bad} negative Fisher value(s); a diagonal Fisher is a mean of squares and cannot "
            "be negative",
            file=file,
            tensor=tensor,
            fix="recompute it with `mergekit-fisher compute`; if it comes from another tool, "
            "check that it stores squared gradients",
        )


_CACHE: Dict[str, FisherFile] = {}
_CACHE_LOCK = threading.Lock()


def open_fisher(path: str) -> FisherFile:
    """A process-wide cache of opened Fisher files, keyed by absolute path and modification time."""
    key_path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        stamp = os.stat(key_path).st_mtime_ns
    except OSError:
        stamp = None
    key = f"{key_path}@{stamp}"
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    opened = FisherFile(key_path)
    with _CACHE_LOCK:
        # a rewritten file replaces its stale entry (and its open descriptors)
        stale = [k for k in _CACHE if k.rsplit("@", 1)[0] == key_path and k != key]
        for old_key in stale:
            _CACHE.pop(old_key).close()
        return _CACHE.setdefault(key, opened)
