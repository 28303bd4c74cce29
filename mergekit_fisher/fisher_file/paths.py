"""Paths that files name, and paths we are about to open: contained, regular, checked before any
open.

An index (`fisher.safetensors.index.json`, `model.safetensors.index.json`) names its shards relative
to its own directory. A shard name that leaves the directory (``../../other/fisher.safetensors``, an
absolute path, a symlink pointing out) would make a merge read *another* file without a word; a FIFO
or device would hang the reader or read something that is not a file. `contained_shard` refuses all
of these with `os.stat` only -- nothing is opened -- so callers check every entry before they open
any.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from mergekit_fisher.errors import FisherInputError

_JSON_TYPES = {
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
    list: "a list",
    dict: "an object",
    str: "an empty string",
}


def file_kind(mode: int) -> str:
    """What a non-regular `st_mode` is, in words."""
    for test, word in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return word
    return "not a regular file"


def is_inside(path: str, directory: str) -> bool:
    """Does `path` (already a realpath) lie in `directory` (already a realpath), or is it
    `directory`?"""
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # different drives (Windows), or a mix of absolute and relative
        return False


def check_regular_file(
    path: str, *, kind: str = "Fisher file", fix: str, model: Optional[str] = None
) -> None:
    """`path` must be a regular file (after symlinks): never open a FIFO (it blocks) or a device."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise FisherInputError(
            f"cannot read it ({error.strerror or error})",
            file=path,
            kind=kind,
            fix=fix,
            model=model,
        ) from None
    if not stat.S_ISREG(mode):
        raise FisherInputError(
            f"it is {file_kind(mode)}, not a regular file",
            file=path,
            kind=kind,
            fix=fix,
            model=model,
        )


def contained_shard(
    directory: str,
    entry,
    *,
    index_name: str,
    tensor: Optional[str] = None,
    kind: str = "Fisher file",
    model: Optional[str] = None,
    fix: str,
) -> str:
    """The absolute path of shard `entry` that `directory`'s index names, after checking -- without
    opening anything -- that it is a plain relative file name, resolves (after symlinks) inside
    `directory`, and is a regular file. Anything else is one error naming the index entry."""
    index_path = os.path.join(directory, index_name)

    def refuse(problem: str) -> FisherInputError:
        what = f"index entry {entry!r}" + (f" of tensor {tensor}" if tensor else "")
        where = index_path if model is None else None
        return FisherInputError(
            f"{what} {problem}" + ("" if where else f" (in {index_name})"),
            file=where,
            kind=kind,
            model=model,
            fix=fix,
        )

    if not isinstance(entry, str) or not entry:
        raise refuse(f"is {_JSON_TYPES.get(type(entry), 'not a string')}, not a shard file name")
    if os.path.isabs(entry) or "\0" in entry:
        raise refuse("is an absolute path; shards must be files inside the directory")
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(directory, entry))
    if not is_inside(target, root) or target == root:
        raise refuse(f"points outside the directory (to {target})")
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        raise refuse("names a shard that is missing") from None
    except OSError as error:
        raise refuse(f"cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        raise refuse(f"is {file_kind(mode)}, not a regular file")
    return os.path.join(directory, entry)
