"""Data for the estimator: read rows, tokenize, mask, truncate (and count), shuffle, hash, batch.

Causal LM rows: ``{"text"}``, ``{"prompt", "completion"}`` (loss on completion tokens only) or
``{"messages"}`` (chat template; loss on assistant turns only); a ``.txt`` file is one example per
line. Sequence classification rows: ``{"text", "label"}`` or ``{"text", "text_pair", "label"}``.
JSONL, a `datasets` dataset saved with ``save_to_disk``, or a hub dataset name (its ``train``
split).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_fisher.choices import Task
from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.estimator.objectives import IGNORE

# every error raised here is about the --data input
DataError = functools.partial(FisherInputError, kind="data file")

LM_LAYOUTS = ({"text"}, {"prompt", "completion"}, {"messages"})
CLS_FIELDS = {"text", "text_pair", "label"}


@dataclass
class Example:
    index: (
        int  # position in the selected (shuffled) list: seeds the sampled Fisher, picks the process
    )
    input_ids: List[int]
    labels: Optional[List[int]] = None  # causal LM: per token, IGNORE where nothing is predicted
    label: Optional[int] = None  # seq-cls
    # every other per-token input the tokenizer returned (token_type_ids, ...): the engine passes
    # the ones the model's forward accepts
    inputs: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def num_predicted(self) -> int:
        if self.labels is None:
            return 1
        return sum(1 for value in self.labels[1:] if value != IGNORE)


@dataclass
class PreparedData:
    examples: List[Example]
    source: str
    dataset_hash: str
    num_rows: int
    num_truncated: int = 0
    num_skipped: int = 0
    skipped_reasons: Dict[str, int] = field(default_factory=dict)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # (B, T) token labels, or (B,) class labels
    indices: List[int]
    inputs: Dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # (B, T) each: token_type_ids, ...

    def to(self, device) -> "Batch":
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.indices,
            {name: value.to(device) for name, value in self.inputs.items()},
        )

    def model_inputs(self) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.inputs}


# ---------------------------------------------------------------- reading rows
def _hash_file(digest, path: str) -> None:
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            digest.update(chunk)


def read_jsonl(path: str, limit: Optional[int] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """``("path:line", row)`` for each JSON object of a JSONL file (blank lines skipped), at most
    `limit`; a line that is not a JSON object is a DataError naming it. Also `mergekit-fisher
    eval`'s reader."""
    rows: List[Tuple[str, Dict[str, Any]]] = []
    with open_text(path) as fp:
        for number, line in enumerate(fp, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
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
            rows.append((f"{path}:{number}", row))
    return rows


def open_text(path: str) -> io.StringIO:
    """A data file as text, lines read as `open(path, encoding="utf-8")` reads them (universal
    newlines); bytes that are not UTF-8 are a DataError naming the line."""
    with open(path, "rb") as fp:
        raw = fp.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"line {line} is not UTF-8 text (byte {error.start}: {error.reason})",
            file=path,
            fix="re-save the file as UTF-8",
        ) from None
    return io.StringIO(text, newline=None)


def _read_dataset(path: str, *, on_disk: bool) -> Tuple[List[Tuple[str, Dict[str, Any]]], str]:
    import datasets

    try:
        loaded = (
            datasets.load_from_disk(path) if on_disk else datasets.load_dataset(path, split="train")
        )
    except Exception as error:  # FileNotFoundError, ConnectionError, DatasetNotFoundError, ...
        raise DataError(
            f"cannot load the data ({error.__class__.__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})",
            file=path,
            fix=(
                "pass a .jsonl/.txt file, a dataset saved with `save_to_disk`, or a reachable hub "
                "dataset name"
            ),
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else (next(iter(loaded)) if len(loaded) == 1 else None)
        if split is None:
            raise DataError(
                f"the dataset has splits {sorted(loaded)} and none is called 'train'",
                file=path,
                fix="save the split you want on its own, or name it 'train'",
            )
        loaded = loaded[split]
    rows = [(f"{path}[{i}]", dict(row)) for i, row in enumerate(loaded)]
    return rows, getattr(loaded, "_fingerprint", "") or ""


def check_data_path(path: str) -> None:
    """A --data path that looks local (not a hub dataset name) must exist; checked before the model
    loads."""
    looks_local = (
        path.startswith((".", "/", "~"))
        or path.endswith((".jsonl", ".json", ".txt"))
        or path.count("/") > 1
    )
    if looks_local and not os.path.exists(path):
        raise DataError("data file does not exist", file=path, fix="check the --data path")


def read_rows(path: str) -> Tuple[List[Tuple[str, Dict[str, Any]]], str, bool]:
    """(where, row) pairs, a content hash, and whether unknown fields must be refused (our own
    files)."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        _hash_file(digest, path)
        if path.endswith(".txt"):
            with open_text(path) as fp:
                rows = [
                    (f"{path}:{n}", {"text": line.rstrip("\n")})
                    for n, line in enumerate(fp, 1)
                    if line.strip()
                ]
            return rows, digest.hexdigest(), True
        return read_jsonl(path), digest.hexdigest(), True
    if os.path.isdir(path):
        for root, _dirs, files in sorted(os.walk(path)):
            for name in sorted(files):
                digest.update(name.encode())
                _hash_file(digest, os.path.join(root, name))
        # `save_to_disk` writes state.json (Dataset) or dataset_dict.json; anything else is a
        # dataset repository checked out locally (parquet/json/csv files), read the way
        # `load_dataset` reads the hub
        saved = any(
            os.path.exists(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")
        )
        rows, _fingerprint = _read_dataset(path, on_disk=saved)
        return rows, digest.hexdigest(), False
    check_data_path(path)
    rows, fingerprint = _read_dataset(path, on_disk=False)
    digest.update(f"{path}:{fingerprint}".encode())
    return rows, digest.hexdigest(), False


# ---------------------------------------------------------------- tokenizing
def _check_fields(where: str, row: Dict[str, Any], task: str, strict: bool) -> Dict[str, Any]:
    keys = set(row)
    if task == Task.SEQ_CLS:
        allowed = CLS_FIELDS
        missing = {"text", "label"} - keys
        if missing:
            raise DataError(
                f"{where}: missing field(s) {sorted(missing)} for --task seq-cls",
                file=where.rsplit(":", 1)[0],
                fix='give every row "text" (and optionally "text_pair") and an integer "label"',
            )
    else:
        layouts = [layout for layout in LM_LAYOUTS if layout <= keys]
        if not layouts:
            raise DataError(
                f"{where}: no usable fields (has {sorted(keys)})",
                file=where.rsplit(":", 1)[0],
                fix='give every row "text", or "prompt" and "completion", or chat "messages"',
            )
        allowed = layouts[0]
    unknown = keys - allowed
    if unknown and strict:
        raise DataError(
            f"{where}: unknown field(s) {sorted(unknown)} (expected {sorted(allowed)})",
            file=where.rsplit(":", 1)[0],
            fix="remove the extra fields, or check --task (causal-lm reads text | "
            "prompt+completion | messages; "
            "seq-cls reads text[/text_pair]+label)",
        )
    return {key: row[key] for key in allowed if key in row}


def _string(fields: Dict[str, Any], key: str, where: str) -> str:
    """A text field must be a JSON string: null, a number or a list is not text (and must not become
    "None")."""
    value = fields[key]
    if not isinstance(value, str):
        kind = {
            type(None): "null",
            bool: "a boolean",
            int: "a number",
            float: "a number",
            list: "a list",
            dict: "an object",
        }.get(type(value), type(value).__name__)
        raise DataError(
            f'{where}: "{key}" is {kind}, not a string',
            file=where.rsplit(":", 1)[0],
            fix=f'write "{key}" as a JSON string (or drop the row)',
        )
    return value


# what a tokenizer returns that is not a model input of its own (or that collate builds itself)
_NOT_MODEL_INPUTS = {
    "input_ids",
    "attention_mask",
    "offset_mapping",
    "special_tokens_mask",
    "length",
    "overflowing_tokens",
    "num_truncated_tokens",
    "overflow_to_sample_mapping",
}


def _extend_inputs(inputs: Optional[Dict[str, List[int]]], encoded) -> None:
    """Append the encoding's other per-token inputs (token_type_ids, ...) to `inputs`."""
    if inputs is None:
        return
    length = len(encoded["input_ids"])
    for name, value in encoded.items():
        if (
            name in _NOT_MODEL_INPUTS
            or not isinstance(value, (list, tuple))
            or len(value) != length
        ):
            continue
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            inputs.setdefault(name, []).extend(value)


def _ids(
    tokenizer, text: str, *, special: bool, inputs: Optional[Dict[str, List[int]]] = None
) -> List[int]:
    encoded = tokenizer(text, add_special_tokens=special)
    _extend_inputs(inputs, encoded)
    return list(encoded["input_ids"])


def _chat_example(tokenizer, messages, where: str, inputs=None) -> Tuple[List[int], List[int]]:
    """Render with the chat template; label the tokens that overlap an assistant turn's characters.

    Character spans (not token prefixes) make this robust to BPE merges across the turn boundary.
    """
    file = where.rsplit(":", 1)[0]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: chat `messages` need a tokenizer with a chat template",
            file=file,
            fix=(
                "use a tokenizer that defines chat_template, or convert the rows to "
                "prompt/completion"
            ),
        )
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m for m in messages
    ):
        raise DataError(
            f"{where}: `messages` must be a list of {{role, content}} objects",
            file=file,
            fix='write messages as [{"role": "user", "content": "..."}, ...]',
        )
    for number, message in enumerate(messages, 1):
        # text, or content parts (a list) for templates that take them; null only beside tool_calls
        content = message.get("content")
        if not (
            isinstance(content, (str, list)) or (content is None and message.get("tool_calls"))
        ):
            kind = "null" if content is None else type(content).__name__
            raise DataError(
                f'{where}: message {number} "content" is {kind}, not a string',
                file=file,
                fix='write each message\'s "content" as a JSON string',
            )

    def render(turns, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else 0
        upto = render(messages[: i + 1], False)
        if not text.startswith(upto) or (i and not text.startswith(render(messages[:i], True))):
            raise DataError(
                f"{where}: the chat template does not render conversation prefixes consistently",
                file=file,
                fix="convert the rows to prompt/completion",
            )
        spans.append((start, len(upto)))
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{where}: chat masking needs a fast tokenizer (character offsets)",
            file=file,
            fix="use the model's tokenizer.json (fast tokenizer), or prompt/completion rows",
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    _extend_inputs(inputs, encoded)
    ids = list(encoded["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (begin, end) in enumerate(encoded["offset_mapping"]):
        if any(begin < stop and end > start for start, stop in spans):
            labels[t] = ids[t]
    return ids, labels


def tokenize_row(
    tokenizer,
    fields: Dict[str, Any],
    task: str,
    where: str,
    num_labels: Optional[int],
    inputs: Optional[Dict[str, List[int]]] = None,
):
    """(input_ids, token labels or None, class label or None); the tokenizer's other per-token
    outputs (token_type_ids, ...) are appended to `inputs` when given."""
    if task == Task.SEQ_CLS:
        label = fields["label"]
        if (
            isinstance(label, bool)
            or not isinstance(label, int)
            or not (0 <= label < (num_labels or 0))
        ):
            raise DataError(
                f"{where}: label {label!r} is out of range for a classifier with {num_labels} "
                "classes",
                file=where.rsplit(":", 1)[0],
                fix=f"use integer labels 0..{(num_labels or 1) - 1}, or a model with more labels",
            )
        pair = _string(fields, "text_pair", where) if fields.get("text_pair") is not None else None
        encoded = tokenizer(_string(fields, "text", where), pair)
        _extend_inputs(inputs, encoded)
        ids = list(encoded["input_ids"])
        return ids, None, label
    if "messages" in fields:
        ids, labels = _chat_example(tokenizer, fields["messages"], where, inputs)
        return ids, labels, None
    if "prompt" in fields:
        prompt = _ids(tokenizer, _string(fields, "prompt", where), special=True, inputs=inputs)
        completion = _ids(
            tokenizer, _string(fields, "completion", where), special=False, inputs=inputs
        )
        if tokenizer.eos_token_id is not None:
            completion.append(tokenizer.eos_token_id)
        return prompt + completion, [IGNORE] * len(prompt) + completion, None
    ids = _ids(tokenizer, _string(fields, "text", where), special=True, inputs=inputs)
    return ids, list(ids), None


def prepare(
    path: str,
    tokenizer,
    *,
    task: str,
    num_examples: Optional[int],
    max_length: int,
    seed: int,
    shuffle: bool,
    num_labels: Optional[int] = None,
) -> PreparedData:
    rows, dataset_hash, strict = read_rows(path)
    if not rows:
        raise DataError(
            "the data has no examples", file=path, fix="point --data at a non-empty file"
        )
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    data = PreparedData([], path, dataset_hash, len(rows))
    for position in order:
        if num_examples is not None and len(data.examples) >= num_examples:
            break
        where, row = rows[position]
        fields = _check_fields(where, row, task, strict)
        inputs: Dict[str, List[int]] = {}
        ids, labels, label = tokenize_row(tokenizer, fields, task, where, num_labels, inputs)
        # one value per token (an appended eos takes its neighbour's), cut like the ids
        inputs = {
            name: (value + value[-1:] * (len(ids) - len(value)))[:max_length]
            for name, value in inputs.items()
            if value
        }
        if len(ids) > max_length:
            data.num_truncated += 1
            ids = ids[:max_length]
            labels = labels[:max_length] if labels is not None else None
        example = Example(len(data.examples), ids, labels, label, inputs)
        if not ids or example.num_predicted == 0:
            data.num_skipped += 1
            continue
        data.examples.append(example)
    if not data.examples:
        raise DataError(
            f"none of the {data.num_skipped} examples read has a token to predict "
            "(empty text, or the prompt fills --max-length)",
            file=path,
            fix="raise --max-length, or check that rows have completion/assistant text",
        )
    return data


def collate(examples: Sequence[Example], pad_id: int, task: str) -> Batch:
    """Right padding; pads get attention 0 and label IGNORE so they never reach the loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    names = sorted({name for e in examples for name in e.inputs})
    inputs = {name: torch.zeros((len(examples), width), dtype=torch.long) for name in names}
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        for name, value in example.inputs.items():
            inputs[name][row, :n] = torch.tensor(value)
        if example.labels is not None:
            token_labels[row, :n] = torch.tensor(example.labels)
    if task == Task.SEQ_CLS:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        labels = token_labels
    return Batch(input_ids, attention, labels, [e.index for e in examples], inputs)
