"""Tensor names and shapes of a model checkpoint, read from safetensors headers only.

No tensor data is loaded and nothing is unpickled: a checkpoint saved only as ``.bin``/``.pt``
is refused with a fix (re-save it with ``safe_serialization=True``). `model` may be a checkpoint
directory (``model.safetensors`` or shards with ``model.safetensors.index.json``), a single
``.safetensors`` file, or a Hugging Face repo id found in the local cache (or, when online,
read remotely through the Hub's header-only API). Local layouts are read by `checkpoint_index`,
through mergekit's own `ShardedTensorIndex` (the index the merge itself uses) and safetensors'
`safe_open`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Dict, Iterable, Optional, Tuple

from safetensors import safe_open

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file.paths import check_regular_file, contained_shard
from mergekit_fisher.fisher_file.reader import PICKLE_SUFFIXES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RESAVE_FIX = (
    "re-save the model with safetensors: "
    "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)`"
)


def _header_error(path: str, model: str, error: Exception) -> FisherInputError:
    return FisherInputError(
        f"cannot read the safetensors header of {os.path.basename(path)} ({error})",
        model=model,
        fix="re-download or re-save the checkpoint",
    )


def _file_index(path: str, model: str):
    from mergekit.io import ShardedTensorIndex

    check_regular_file(
        path, kind="checkpoint file", model=model, fix="re-download or re-save the checkpoint"
    )
    try:
        return ShardedTensorIndex.from_file(path)
    except Exception as error:  # SafetensorError, OSError: truncated or not safetensors
        raise _header_error(path, model, error) from None


def checkpoint_index(model: str, path: Optional[str] = None):
    """mergekit's `ShardedTensorIndex` of a local checkpoint: a ``.safetensors`` file, a directory
    with ``model.safetensors`` or shards and ``model.safetensors.index.json`` (read by mergekit), or
    a directory of other ``*.safetensors`` files (a PEFT adapter's ``adapter_model.safetensors``).

    Safetensors only: a pickle-only checkpoint is refused with a fix, never unpickled (mergekit's
    own fallback would ``torch.load`` a ``pytorch_model.bin``). Every listed shard must exist.
    """
    from mergekit.io import ShardedTensorIndex, ShardInfo

    path = path or os.path.abspath(os.path.expanduser(str(model)))
    if os.path.isfile(path):
        return _file_index(path, model)
    if any(os.path.exists(os.path.join(path, name)) for name in (SINGLE_NAME, INDEX_NAME)):
        for name in (
            INDEX_NAME,
            SINGLE_NAME,
        ):  # what mergekit opens first: never a FIFO or a directory
            if os.path.lexists(os.path.join(path, name)):
                check_regular_file(
                    os.path.join(path, name),
                    kind="checkpoint file",
                    model=model,
                    fix="re-download or re-save the checkpoint",
                )
                break
        try:
            index = ShardedTensorIndex.from_disk(path)
        except FisherInputError:
            raise
        except Exception as error:  # broken JSON, no weight_map, a weight_map that is not a mapping
            if not os.path.lexists(
                os.path.join(path, INDEX_NAME)
            ):  # model.safetensors alone: its header
                raise _header_error(os.path.join(path, SINGLE_NAME), model, error) from None
            raise FisherInputError(
                f"broken {INDEX_NAME} ({error!r})",
                model=model,
                fix="re-download or re-save the checkpoint",
            ) from None
        if not isinstance(index.tensor_paths, dict):
            raise FisherInputError(
                f"broken {INDEX_NAME} (weight_map is not a mapping)",
                model=model,
                fix="re-download or re-save the checkpoint",
            )
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            pickles = sorted(f for f in os.listdir(path) if f.lower().endswith(PICKLE_SUFFIXES))
            if pickles:
                raise FisherInputError(
                    f"the checkpoint is pickle-only ({pickles[0]}); refusing to unpickle it",
                    model=model,
                    fix=RESAVE_FIX,
                )
            raise FisherInputError(
                "no .safetensors files in the model directory",
                model=model,
                fix=(
                    "point --model at a Hugging Face checkpoint directory (with config.json and "
                    "*.safetensors)"
                ),
            )
        parts = [_file_index(os.path.join(path, name), model) for name in files]
        tensor_paths = {name: shard for part in parts for name, shard in part.tensor_paths.items()}
        index = ShardedTensorIndex(
            base_path=path,
            is_safetensors=True,
            tensor_paths=tensor_paths,
            shards=[
                ShardInfo(part.shards[0].filename, part.shards[0].contained_keys) for part in parts
            ],
        )
    for shard in index.shards:  # contained, regular files: checked before any shard is opened
        contained_shard(
            index.base_path,
            shard.filename,
            index_name=INDEX_NAME,
            model=model,
            fix="copy the complete checkpoint (its index names only its own shard files)",
        )
    return index


def _index_shapes(path: str, model: str) -> Dict[str, Tuple[int, ...]]:
    index = checkpoint_index(model, path)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for shard in index.shards:
        shard_path = os.path.join(index.base_path, shard.filename)
        try:
            with safe_open(shard_path, framework="pt", device="cpu") as handle:
                for name in shard.contained_keys:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (
            Exception
        ) as error:  # SafetensorError (also: a name the index lists but the shard lacks), OSError
            raise _header_error(shard_path, model, error) from None
    return shapes


def _hub_shapes(repo_id: str) -> Dict[str, Tuple[int, ...]]:
    import huggingface_hub

    try:  # a cached snapshot first: works offline
        local = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["*.safetensors", "*.json"], local_files_only=True
        )
        return _index_shapes(local, repo_id)
    except FisherInputError:
        raise
    except Exception:
        pass
    try:
        metadata = huggingface_hub.get_safetensors_metadata(repo_id)
    except Exception as error:
        raise FisherInputError(
            "model not found: not a local path, and the Hub could not be asked "
            f"({error.__class__.__name__})",
            model=repo_id,
            fix="pass the local checkpoint directory (absolute path)",
        ) from None
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file_metadata in metadata.files_metadata.values():
        for name, info in file_metadata.tensors.items():
            shapes[name] = tuple(info.shape)
    return shapes


def tied_aliases(model: str, stored: Iterable[str]) -> Dict[str, str]:
    """Names the checkpoint does not store but that mergekit reads from a stored tensor -> that
    tensor.

    A tied model stores ``model.embed_tokens.weight`` only; mergekit's architecture lists
    ``lm_head.weight`` with it as a tied name. Local checkpoint directories only (config.json); {}
    when unknown.
    """
    path = os.path.abspath(os.path.expanduser(str(model)))
    if not os.path.isfile(os.path.join(path, "config.json")):
        return {}
    try:
        from mergekit.architecture import arch_info_for_config
        from transformers import AutoConfig

        from mergekit_fisher.naming import load_candidates

        config = AutoConfig.from_pretrained(path)
        arch = arch_info_for_config(config)
        weights = arch.all_weights(config) if arch is not None else []
    except Exception:  # an architecture mergekit does not know: nothing to say about ties
        return {}
    stored = set(stored)
    aliases: Dict[str, str] = {}
    for weight in weights:
        names = load_candidates(weight)
        present = next((name for name in names if name in stored), None)
        if present is not None:
            aliases.update({name: present for name in names if name not in stored})
    return aliases


def checkpoint_shapes(model: str) -> Dict[str, Tuple[int, ...]]:
    """Checkpoint tensor name -> shape, from the safetensors headers of `model` (see module doc)."""
    path = os.path.abspath(os.path.expanduser(str(model)))
    if os.path.isdir(path):
        return _index_shapes(path, str(model))
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return _index_shapes(path, str(model))
        if path.lower().endswith(PICKLE_SUFFIXES):
            raise FisherInputError(
                "refusing to unpickle a pickle checkpoint", model=str(model), fix=RESAVE_FIX
            )
        raise FisherInputError(
            "unrecognised model file: expected a checkpoint directory or a .safetensors file",
            model=str(model),
            fix="point --model at the model's checkpoint directory",
        )
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        return _hub_shapes(str(model))
    raise FisherInputError(
        "model path does not exist",
        model=str(model),
        fix="pass the checkpoint directory (absolute path)",
    )


# ---------------------------------------------------------------- fingerprint
FINGERPRINT_VERSION = "w2"
_SAMPLE_BYTES = 64  # per sample of a large tensor's data
_SAMPLES = 16  # evenly spaced samples of a large tensor (first and last included)
_FULL_BYTES = 1 << 20  # tensors up to 1 MiB (every LoRA factor, norms, biases) are read whole


def _read_header(fd: int, shard_path: str, model: str) -> Tuple[dict, int]:
    """A safetensors file's JSON header and where its data starts (u64 little-endian size, JSON,
    data)."""
    try:
        (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        if size > 100_000_000:
            raise ValueError(f"header of {size} bytes")
        header = json.loads(os.pread(fd, size, 8))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, ValueError) as error:
        raise _header_error(shard_path, model, error) from None
    return header, 8 + size


def _sample_spans(begin: int, end: int):
    """(offset, size) of what the fingerprint reads of one tensor's data: all of a small tensor
    (a LoRA factor changes little in few bytes), evenly spaced samples of a large one."""
    length = end - begin
    if length <= _FULL_BYTES:
        return [(begin, length)]
    step = (length - _SAMPLE_BYTES) // (_SAMPLES - 1)
    return [(begin + i * step, _SAMPLE_BYTES) for i in range(_SAMPLES)]


def model_fingerprint(model: str, path: Optional[str] = None) -> str:
    """The identity of a local checkpoint's weights, cheap enough to take before every compute,
    resume and merge: sha256 over the sorted (tensor name, dtype, shape) of its safetensors headers
    plus every byte of each tensor up to 1 MiB (adapters are hashed whole) and sixteen evenly spaced
    64-byte samples of each larger one -- a few MB read at most, no tensor loaded.

    The same weights give the same fingerprint wherever they are copied and however they are
    sharded; a replaced, fine-tuned or LoRA-merged model of the same architecture gives another (its
    weights differ everywhere). It is not a hash of every byte of a large tensor: a change confined
    to a few rows of one can go unseen. The one fingerprint function: `compute` records it, resume,
    `combine` and the merge compare it.
    """
    index = checkpoint_index(model, path)
    entries = []
    for shard in sorted(index.shards, key=lambda s: s.filename):
        shard_path = os.path.join(index.base_path, shard.filename)
        fd = os.open(shard_path, os.O_RDONLY)
        try:
            header, start = _read_header(fd, shard_path, model)
            for name in shard.contained_keys:
                info = header.get(name)
                if not isinstance(info, dict):
                    raise _header_error(
                        shard_path, model, ValueError(f"no header entry for {name}")
                    )
                try:
                    begin, end = (start + int(offset) for offset in info["data_offsets"])
                    record = [name, str(info["dtype"]), [int(n) for n in info["shape"]]]
                except (KeyError, TypeError, ValueError) as error:
                    raise _header_error(shard_path, model, error) from None
                samples = b"".join(
                    os.pread(fd, size, offset) for offset, size in _sample_spans(begin, end)
                )
                entries.append((name, json.dumps(record).encode(), samples))
        finally:
            os.close(fd)
    digest = hashlib.sha256(f"mergekit-fisher weights {FINGERPRINT_VERSION}\n".encode())
    for _name, record, samples in sorted(entries):
        digest.update(len(record).to_bytes(8, "little") + record)
        digest.update(len(samples).to_bytes(8, "little") + samples)
    return f"{FINGERPRINT_VERSION}:{digest.hexdigest()}"


def cached_snapshot(repo_id: str, revision: Optional[str] = None) -> Optional[str]:
    """The local snapshot directory of a Hub model in the cache (its name is the commit), or
    None."""
    if (
        os.path.exists(os.path.expanduser(repo_id))
        or repo_id.count("/") != 1
        or repo_id.startswith((".", "/", "~"))
    ):
        return None
    try:
        import huggingface_hub

        return huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.safetensors", "*.json"],
            local_files_only=True,
        )
    except Exception:  # not cached, not a valid id, no huggingface_hub
        return None
