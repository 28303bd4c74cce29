"""Writing Fisher files (format v1), atomically.

The output is assembled in a temporary sibling directory and renamed into place at the end, so a
killed run never leaves something that looks like a complete Fisher file.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from typing import Mapping, Optional, Union

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

from mergekit_fisher import __version__
from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file.config import (
    CONFIG_FILENAME,
    HEADER_CONFIG_KEY,
    INDEX_FILENAME,
    SHARD_PATTERN,
    FisherConfig,
)

DEFAULT_MAX_SHARD_SIZE = "5GB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: str, mode: int) -> None:
    # mkstemp/mkdtemp create private (0600/0700) entries; give the result ordinary permissions.
    os.chmod(path, mode & ~_umask())


def _finalize_config(tensors: Mapping[str, torch.Tensor], config: FisherConfig) -> FisherConfig:
    total = 0.0
    total_sq = 0.0
    count = 0
    dtypes = set()
    for tensor in tensors.values():
        as64 = tensor.detach().to(torch.float64)
        total += float(as64.sum())
        total_sq += float(as64.square().sum())
        count += tensor.numel()
        dtypes.add(str(tensor.dtype).replace("torch.", ""))
    return config.model_copy(
        update={
            "sum": total,
            "sum_sq": total_sq,
            "num_elements": count,
            "dtype": ",".join(sorted(dtypes)) or None,
            "tool_version": config.tool_version or f"mergekit-fisher {__version__}",
            "created": config.created
            or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
    )


def write_fisher(
    tensors: Mapping[str, torch.Tensor],
    out_path: Union[str, os.PathLike],
    config: Optional[FisherConfig] = None,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> FisherConfig:
    """Write `tensors` (checkpoint names -> Fisher values) and return the final config.

    `out_path` ending in ``.safetensors`` gives a standalone file with the config in its header;
    anything else is a directory (``fisher.safetensors`` or shards + index, and ``fisher_config.json``).
    The global sum / sum of squares are computed here, in float64, from the values as stored.
    """
    out_path = os.path.abspath(os.fspath(out_path))
    if os.path.exists(out_path) and not overwrite:
        raise FisherInputError(
            "output already exists", file=out_path, fix="choose another path or pass --overwrite"
        )
    stored = {}
    for name, tensor in tensors.items():
        stored[name] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
    config = _finalize_config(stored, config or FisherConfig())
    config_json = config.model_dump_json(indent=2, exclude_none=True)

    parent = os.path.dirname(out_path) or "."
    os.makedirs(parent, exist_ok=True)
    if out_path.endswith(".safetensors"):
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=parent)
        os.close(fd)
        try:
            save_file(stored, tmp, metadata={HEADER_CONFIG_KEY: config_json, "format": "pt"})
            _publish_mode(tmp, 0o666)
            os.replace(tmp, out_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return config

    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_path)}.tmp-", dir=parent)
    try:
        split = split_torch_state_dict_into_shards(
            stored, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size
        )
        for filename, names in split.filename_to_tensors.items():
            save_file(
                {name: stored[name] for name in names},
                os.path.join(tmp_dir, filename),
                metadata={"format": "pt"},
            )
        if split.is_sharded:
            index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
            with open(os.path.join(tmp_dir, INDEX_FILENAME), "w", encoding="utf-8") as fp:
                json.dump(index, fp, indent=2, sort_keys=True)
        with open(os.path.join(tmp_dir, CONFIG_FILENAME), "w", encoding="utf-8") as fp:
            fp.write(config_json + "\n")
        if os.path.exists(out_path):  # overwrite=True: swap in only once the new one is complete
            shutil.rmtree(out_path) if os.path.isdir(out_path) else os.remove(out_path)
        _publish_mode(tmp_dir, 0o777)
        os.rename(tmp_dir, out_path)
    finally:
        if os.path.exists(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return config
