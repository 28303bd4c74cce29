"""Data for the estimator: plan which rows a run uses, check them, tokenize, mask, truncate (and
count), batch -- per batch, so nothing but the current batch is held (rows: `sources.py`).

Causal LM rows: ``{"text"}``, ``{"prompt", "completion"}`` (loss on completion tokens only) or
``{"messages"}`` (chat template; loss on assistant turns only); a ``.txt`` file is one example per
line. Sequence classification rows: ``{"text", "label"}`` or ``{"text", "text_pair", "label"}``.
`--text-field NAME` reads another column as "text".
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_fisher.choices import Task
from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.estimator.objectives import IGNORE
from mergekit_fisher.estimator.sources import (
    DatasetOptions,
    Shard,
    StreamSource,
    group_by_length,
    looks_local,
    open_source,
    parse_json_line,
    select,
)

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
def read_jsonl(path: str, limit: Optional[int] = None) -> List[Tuple[str, Dict[str, Any]]]:
    """``("path:line", row)`` for each JSON object of a JSONL file (blank lines skipped), at most
    `limit`; a line that is not a JSON object is a DataError naming it. Also `mergekit-fisher
    eval`'s reader."""
    rows: List[Tuple[str, Dict[str, Any]]] = []
    with open_text(path) as fp:
        for number, line in enumerate(fp, 1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append((f"{path}:{number}", parse_json_line(line, number, path)))
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


def check_data_path(path: str) -> None:
    """A --data path that looks local (not a hub dataset name) must exist; checked before the model
    loads."""
    if looks_local(path) and not os.path.exists(path):
        raise DataError("data file does not exist", file=path, fix="check the --data path")


def with_text_field(where: str, row: Dict[str, Any], text_field: Optional[str]) -> Dict[str, Any]:
    """`--text-field NAME`: the row's NAME column is its "text"."""
    if not text_field or text_field == "text":
        return row
    if text_field not in row:
        raise DataError(
            f"{where}: no field {text_field!r} (has {sorted(row)})",
            file=where.rsplit(":", 1)[0].split("[", 1)[0],
            fix="check --text-field",
        )
    rest = {key: value for key, value in row.items() if key not in (text_field, "text")}
    return {**rest, "text": row[text_field]}


# ---------------------------------------------------------------- tokenizing
def _check_label(label, where: str, num_labels: Optional[int]) -> int:
    if (
        isinstance(label, bool)
        or not isinstance(label, int)
        or not (0 <= label < (num_labels or 0))
    ):
        raise DataError(
            f"{where}: label {label!r} is out of range for a classifier with {num_labels} classes",
            file=where.rsplit(":", 1)[0],
            fix=f"use integer labels 0..{(num_labels or 1) - 1}, or a model with more labels",
        )
    return label


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
        label = _check_label(fields["label"], where, num_labels)
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


@dataclass
class DataPlan:
    """The rows a run uses, by position in the source, not yet read: batch `g` is rows
    ``g * batch_size ...`` of this shard's selection (`sources.select`)."""

    source: Any
    positions: torch.Tensor  # source row positions, in the order used
    indices: torch.Tensor  # each row's index in the whole selection: seeds its sampled labels
    path: str
    checks_rows_up_front = True

    @property
    def dataset_hash(self) -> str:
        return self.source.dataset_hash

    @property
    def num_rows(self) -> int:
        return self.source.num_rows

    @property
    def num_selected(self) -> int:
        return len(self.positions)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(self.num_selected / batch_size)

    def batch_rows(self, g: int, batch_size: int):
        """The rows of batch `g`, read now, with their selection indices."""
        cut = slice(g * batch_size, (g + 1) * batch_size)
        positions, indices = self.positions[cut].tolist(), self.indices[cut].tolist()
        return [self.source.row(p) for p in positions], indices


@dataclass
class StreamPlan:
    """`--streaming`: at most `limit` rows of a stream; this shard's rows are every `count`-th
    (from `index`), batches asked in increasing order (each process skips the others' rows)."""

    source: Any
    limit: int
    shard: Shard
    path: str
    checks_rows_up_front = False  # that would read the whole stream before the first step

    @property
    def dataset_hash(self) -> str:
        return self.source.dataset_hash

    num_rows = None

    @property
    def num_selected(self) -> int:
        return len(range(self.shard.index, self.limit, self.shard.count))

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(self.num_selected / batch_size)

    def batch_rows(self, g: int, batch_size: int):
        local = range(g * batch_size, min(self.num_selected, (g + 1) * batch_size))
        indices = [self.shard.index + k * self.shard.count for k in local]
        rows = [self.source.row(i) for i in indices]
        kept = [(row, i) for row, i in zip(rows, indices) if row is not None]  # a short stream
        return [row for row, _ in kept], [i for _, i in kept]


def plan_data(
    path: str,
    *,
    num_examples: Optional[int],
    seed: int,
    shuffle: bool,
    shard: Shard = Shard(),
    options: DatasetOptions = DatasetOptions(),
    streaming: bool = False,
    shuffle_buffer: int = 10_000,
    group_batch_size: Optional[int] = None,
):
    """Which rows a run reads, in which order; `group_batch_size`: batches of that size get rows
    of similar length (files only: their row sizes are known from the scan)."""
    if streaming:
        if num_examples is None:
            raise DataError(
                "--streaming needs --num-examples (a stream's length is unknown until read)",
                file=path,
                fix="pass --num-examples N",
            )
        if os.path.isfile(path):
            raise DataError(
                "--streaming reads `datasets` datasets; files are read lazily already",
                file=path,
                fix="drop --streaming",
            )
        source = StreamSource(
            path, options, seed=seed, shuffle=shuffle, buffer=shuffle_buffer, limit=num_examples
        )
        return StreamPlan(source, num_examples, shard, path)
    source = open_source(path, options)
    if source.num_rows == 0:
        raise DataError(
            "the data has no examples", file=path, fix="point --data at a non-empty file"
        )
    positions, indices = select(
        source.num_rows, num_examples=num_examples, seed=seed, shuffle=shuffle, shard=shard
    )
    if len(positions) == 0:
        raise DataError(
            f"shard {shard.index + 1}/{shard.count} of {source.num_rows} rows is empty",
            file=path,
            fix="use fewer shards than rows",
        )
    sizes = getattr(source, "sizes", None)
    if group_batch_size and group_batch_size > 1 and sizes is not None:
        positions, indices = group_by_length(positions, indices, sizes, group_batch_size)
    return DataPlan(source, positions, indices, path)


@dataclass
class Encoded:
    """A batch's rows, tokenized: the examples to use and what was cut or dropped."""

    examples: List[Example]
    num_truncated: int = 0
    num_skipped: int = 0


def check_rows(plan: DataPlan, *, task: str, num_labels: Optional[int], text_field=None) -> None:
    """Every selected row parsed and checked (fields, types, labels) before the first step, without
    tokenizing or keeping any: a bad row fails the run now, not hours in."""
    if not plan.checks_rows_up_front:
        return
    for g in range(plan.num_batches(1024)):
        rows, _ = plan.batch_rows(g, 1024)
        for where, row in rows:
            check_row(where, row, task, plan.source.strict, num_labels, text_field)


def check_row(where, row, task, strict, num_labels, text_field=None) -> Dict[str, Any]:
    fields = _check_fields(where, with_text_field(where, row, text_field), task, strict)
    for key in ("text", "prompt", "completion", "text_pair"):
        if key in fields and not (key == "text_pair" and fields[key] is None):
            _string(fields, key, where)
    if task == Task.SEQ_CLS:
        _check_label(fields["label"], where, num_labels)
    return fields


def encode_rows(
    rows: Sequence[Tuple[str, Dict[str, Any]]],
    indices: Sequence[int],
    tokenizer,
    *,
    task: str,
    max_length: int,
    strict: bool,
    num_labels: Optional[int] = None,
    text_field: Optional[str] = None,
) -> Encoded:
    """Tokenize, mask and truncate rows; rows with no token to predict are dropped (counted)."""
    encoded = Encoded([])
    for (where, row), index in zip(rows, indices):
        fields = check_row(where, row, task, strict, num_labels, text_field)
        inputs: Dict[str, List[int]] = {}
        ids, labels, label = tokenize_row(tokenizer, fields, task, where, num_labels, inputs)
        # one value per token (an appended eos takes its neighbour's), cut like the ids
        inputs = {
            name: (value + value[-1:] * (len(ids) - len(value)))[:max_length]
            for name, value in inputs.items()
            if value
        }
        if len(ids) > max_length:
            encoded.num_truncated += 1
            ids = ids[:max_length]
            labels = labels[:max_length] if labels is not None else None
        example = Example(index, ids, labels, label, inputs)
        if not ids or example.num_predicted == 0:
            encoded.num_skipped += 1
            continue
        encoded.examples.append(example)
    return encoded


def no_examples_error(path: str, num_skipped: int) -> FisherInputError:
    return DataError(
        f"none of the {num_skipped} examples read has a token to predict "
        "(empty text, or the prompt fills --max-length)",
        file=path,
        fix="raise --max-length, or check that rows have completion/assistant text",
    )


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
    text_field: Optional[str] = None,
    options: DatasetOptions = DatasetOptions(),
) -> PreparedData:
    """Every selected example tokenized at once (for eval and tests; `compute` reads per batch)."""
    plan = plan_data(path, num_examples=num_examples, seed=seed, shuffle=shuffle, options=options)
    rows, indices = plan.batch_rows(0, len(plan.positions))
    encoded = encode_rows(
        rows,
        indices,
        tokenizer,
        task=task,
        max_length=max_length,
        strict=plan.source.strict,
        num_labels=num_labels,
        text_field=text_field,
    )
    if not encoded.examples:
        raise no_examples_error(path, encoded.num_skipped)
    return PreparedData(
        encoded.examples,
        path,
        plan.dataset_hash,
        plan.num_rows,
        encoded.num_truncated,
        encoded.num_skipped,
    )


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
