"""Where `compute`'s rows come from, read one at a time: nothing is loaded whole.

* JSONL and ``.txt`` files: one pass over the bytes finds where each non-blank line starts (and
  hashes the file); a row is parsed only when it is used, so `--num-examples 10` on a 100 GB file
  parses 10 lines (a line that is not valid JSON is an error only if it is selected).
* `datasets` sources (saved with ``save_to_disk``, a local dataset repository, or a hub name with
  `--subset`, `--split`, `--revision`): Arrow files memory-mapped, rows read by index.

`select` decides which rows a run uses: a seeded permutation (`torch.randperm`) of all rows, cut to
`--num-examples`, then every N-th for `--shard I/N`. Each selected row keeps its index in the whole
selection, which seeds its sampled labels: shards of one selection reproduce one run exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from array import array
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from mergekit_fisher.errors import FisherInputError

DataError = functools.partial(FisherInputError, kind="data file")

Row = Tuple[str, Dict[str, Any]]  # (where: "path:line" or "path[index]", the row)


class LineSource:
    """A JSONL (`kind="jsonl"`) or text (`kind="txt"`, one example per line) file."""

    strict = True  # our own files: unknown fields are refused

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        self.offsets, self.line_numbers = array("q"), array("q")
        self.sizes = array("q")  # bytes per row: what `group_by_length` sorts by
        digest = hashlib.sha256()
        position, number, pending = 0, 0, b""
        with open(path, "rb") as fp:
            for chunk in iter(lambda: fp.read(1 << 22), b""):
                digest.update(chunk)
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    number += 1
                    if line.strip():
                        self.offsets.append(position)
                        self.line_numbers.append(number)
                        self.sizes.append(len(line))
                    position += len(line) + 1
        if pending.strip():
            self.offsets.append(position)
            self.line_numbers.append(number + 1)
            self.sizes.append(len(pending))
        self.dataset_hash = digest.hexdigest()
        self.num_rows = len(self.offsets)

    def row(self, position: int) -> Row:
        number = self.line_numbers[position]
        with open(self.path, "rb") as fp:
            fp.seek(self.offsets[position])
            raw = fp.readline()
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise DataError(
                f"line {number} is not UTF-8 text (byte {error.start}: {error.reason})",
                file=self.path,
                fix="re-save the file as UTF-8",
            ) from None
        where = f"{self.path}:{number}"
        if self.kind == "txt":
            return where, {"text": line}
        return where, parse_json_line(line, number, self.path)


def parse_json_line(line: str, number: int, path: str) -> Dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as error:
        raise DataError(
            f"line {number} is not valid JSON ({error})",
            file=path,
            fix="write one JSON object per line (JSONL)",
        ) from None
    if not isinstance(row, dict):
        raise DataError(
            f"line {number} is not a JSON object",
            file=path,
            fix="write one JSON object per line (JSONL)",
        )
    return row


@dataclass(frozen=True)
class DatasetOptions:
    """What picks the rows of a `datasets` source (`--subset`, `--split`, `--revision`)."""

    subset: Optional[str] = None
    split: Optional[str] = None
    revision: Optional[str] = None


class DatasetSource:
    strict = False  # other people's datasets carry extra columns

    def __init__(self, path: str, options: DatasetOptions):
        self.path = path
        saved = os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")
        )
        self.dataset, self.split = _load_dataset(path, options, on_disk=saved)
        self.num_rows = len(self.dataset)
        digest = hashlib.sha256()
        if os.path.isdir(path):
            for root, _dirs, files in sorted(os.walk(path)):
                for name in sorted(files):
                    digest.update(name.encode())
                    with open(os.path.join(root, name), "rb") as fp:
                        for chunk in iter(lambda fp=fp: fp.read(1 << 22), b""):
                            digest.update(chunk)
        fingerprint = getattr(self.dataset, "_fingerprint", "") or ""
        digest.update(f"{path}:{options.subset}:{self.split}:{fingerprint}".encode())
        self.dataset_hash = digest.hexdigest()

    def row(self, position: int) -> Row:
        return f"{self.path}[{position}]", dict(self.dataset[position])


def _load_dataset(path: str, options: DatasetOptions, *, on_disk: bool):
    import datasets

    if on_disk and (options.subset or options.revision):
        raise DataError(
            "--subset and --revision choose a hub dataset; this is a dataset saved with "
            "save_to_disk",
            file=path,
            fix="drop --subset/--revision (--split picks a split of a saved DatasetDict)",
        )
    try:
        if on_disk:
            loaded = datasets.load_from_disk(path)
        else:
            loaded = datasets.load_dataset(
                path, name=options.subset, split=options.split, revision=options.revision
            )
    except Exception as error:  # FileNotFoundError, ConnectionError, DatasetNotFoundError, ...
        first = str(error).splitlines()[0] if str(error) else ""
        raise DataError(
            f"cannot load the data ({error.__class__.__name__}: {first})",
            file=path,
            fix=(
                "pass a .jsonl/.txt file, a dataset saved with `save_to_disk`, or a reachable hub "
                "dataset name (with --subset/--split/--revision as it needs)"
            ),
        ) from None
    split = options.split
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            split = (
                "train" if "train" in loaded else (next(iter(loaded)) if len(loaded) == 1 else None)
            )
        if split not in loaded:
            raise DataError(
                f"the dataset has splits {sorted(loaded)}"
                + (f" and no split {split!r}" if split else " and none is called 'train'"),
                file=path,
                fix="choose one with --split",
            )
        loaded = loaded[split]
    elif on_disk and split is not None:
        raise DataError(
            f"--split {split}: this saved dataset has no splits",
            file=path,
            fix="drop --split",
        )
    return loaded, split or "train"


def looks_local(path: str) -> bool:
    """A --data that looks like a path (not a hub dataset name) must exist."""
    return (
        path.startswith((".", "/", "~"))
        or path.endswith((".jsonl", ".json", ".txt"))
        or path.count("/") > 1
    )


def open_source(path: str, options: DatasetOptions = DatasetOptions()):
    """The row source for a --data argument."""
    if os.path.isfile(path):
        if options != DatasetOptions():
            raise DataError(
                "--subset, --split and --revision choose part of a `datasets` dataset, not of a "
                "file",
                file=path,
                fix="drop them, or pass a dataset directory or hub name",
            )
        return LineSource(path, "txt" if path.endswith(".txt") else "jsonl")
    if not os.path.isdir(path) and looks_local(path):
        raise DataError("data file does not exist", file=path, fix="check the --data path")
    return DatasetSource(path, options)


# ---------------------------------------------------------------- which rows a run uses
@dataclass(frozen=True)
class Shard:
    index: int = 0  # 0-based here; the command line says 1..N
    count: int = 1


def select(
    num_rows: int, *, num_examples: Optional[int], seed: int, shuffle: bool, shard: Shard = Shard()
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(source positions, selection indices) of the rows this shard uses, in order."""
    if shuffle:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(num_rows)
    if num_examples is not None:
        order = order[:num_examples]
    indices = torch.arange(len(order))[shard.index :: shard.count]
    return order[indices], indices


GROUP_WINDOW = 64  # batches whose rows are sorted together


def group_by_length(
    positions: torch.Tensor, indices: torch.Tensor, sizes, batch_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The selection reordered so that each batch holds rows of similar size: within every window
    of `GROUP_WINDOW` batches, rows sorted longest first (stable), as HF Trainer's
    `group_by_length` does. Each row keeps its selection index (its sampled labels), so the Fisher
    is the same up to float rounding; only the padding shrinks."""
    window = batch_size * GROUP_WINDOW
    order = []
    for start in range(0, len(positions), window):
        chunk = positions[start : start + window].tolist()
        ranked = sorted(range(len(chunk)), key=lambda k: -sizes[chunk[k]])
        order.extend(start + k for k in ranked)
    order = torch.tensor(order, dtype=torch.long)
    return positions[order], indices[order]


def rows_at(source, positions: List[int]) -> List[Row]:
    return [source.row(int(p)) for p in positions]


def parse_shard(text: str) -> Shard:
    """`--shard I/N` (1-based) -> Shard(I - 1, N)."""
    index, _, count = str(text).partition("/")
    try:
        shard = Shard(int(index) - 1, int(count))
    except ValueError:
        shard = None
    if shard is None or not (shard.count >= 1 and 0 <= shard.index < shard.count):
        raise FisherInputError(
            f"invalid --shard {text!r}",
            fix="write I/N with 1 <= I <= N, e.g. --shard 3/8 for the third of eight shards",
        )
    return shard


class StreamSource:
    """A `datasets` source read as a stream (`--streaming`): `load_dataset(..., streaming=True)`,
    shuffled by datasets' own buffer shuffle (`--shuffle-buffer` rows) and cut with `take`. Nothing
    is downloaded or prepared up front; rows are read in order, once, as the run reaches them."""

    strict = False
    num_rows = None  # unknown until read

    def __init__(self, path: str, options: DatasetOptions, *, seed, shuffle, buffer, limit):
        import datasets

        self.path, self.split = path, options.split or "train"
        try:
            stream = datasets.load_dataset(
                path,
                name=options.subset,
                split=self.split,
                revision=options.revision,
                streaming=True,
            )
        except Exception as error:
            first = str(error).splitlines()[0] if str(error) else ""
            raise DataError(
                f"cannot stream the data ({error.__class__.__name__}: {first})",
                file=path,
                fix="check the dataset name, --subset/--split/--revision, or drop --streaming",
            ) from None
        if shuffle:
            stream = stream.shuffle(seed=seed, buffer_size=buffer)
        self.stream = stream.take(limit)
        # what the rows are cannot be hashed before reading them: the hash names the source
        described = f"stream:{path}:{options.subset}:{self.split}:{options.revision}"
        self.dataset_hash = hashlib.sha256(
            f"{described}:{seed if shuffle else None}:{buffer if shuffle else None}".encode()
        ).hexdigest()
        self._rows = None
        self._next = 0

    def row(self, position: int) -> Optional[Row]:
        """Row `position` of the stream (None past its end); positions only go forwards."""
        if position < self._next:
            raise RuntimeError("a stream is read forwards only")
        if self._rows is None:
            self._rows = iter(self.stream)
        row = None
        while self._next <= position:
            row = next(self._rows, None)
            self._next += 1
            if row is None:  # shorter than --num-examples
                self._next = position + 1
                return None
        return f"{self.path}[{position}]", dict(row)
