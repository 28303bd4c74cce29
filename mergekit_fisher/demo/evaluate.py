"""Held-out loss / perplexity of causal LMs on text data; `mergekit-fisher eval`.

The loss is the mean next-token negative log-likelihood (nats) over every predicted token of a
dataset (token-weighted, so long and short examples count by their size); perplexity = exp(loss).

`eval` reads data exactly as `compute` does (`estimator.data.prepare`): JSONL `text`,
`prompt`/`completion` (loss on the completion tokens only), chat `messages` (assistant turns only),
a `datasets` dataset -- so the loss is on the very tokens `compute` differentiates. A `.txt` file is
the exception: one long text cut into `--max-length` windows. Models are directories or
`base+adapter` references (the adapter applied by peft in memory, nothing written). Every model and
every data file is checked, and every data file tokenized, before the first forward pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import click

from mergekit_fisher.cli import show_progress, verbosity_options
from mergekit_fisher.errors import FisherInputError

log = logging.getLogger(__name__)

# results[model][dataset] = {"loss": float, "perplexity": float, "tokens": int}
Results = Dict[str, Dict[str, Dict[str, float]]]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FisherInputError(
            f"--device {device} was asked for but torch sees no CUDA device", fix="use --device cpu"
        )
    return device


def load_tokenizer(model_dir: str, fallback: Optional[str] = None, adapter: Optional[str] = None):
    from transformers import AutoTokenizer

    for source in (model_dir, adapter, fallback):
        if source and os.path.exists(os.path.join(source, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(source)
    raise FisherInputError(
        "no tokenizer found next to the model",
        model=model_dir,
        fix="save the tokenizer with the model or pass --tokenizer DIR",
    )


def check_model_dir(model_dir: str) -> Dict[str, tuple]:
    """A loadable causal LM directory, from its files and headers only: config.json, safetensors
    (a pickle-only checkpoint is refused, never unpickled), every shard present, inside the
    directory and readable. Returns the checkpoint's {tensor: shape}."""
    from mergekit_fisher.tools.checkpoint import checkpoint_shapes

    if not os.path.isdir(model_dir):
        raise FisherInputError(
            "model directory does not exist", model=model_dir, fix="pass a saved model directory"
        )
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FisherInputError(
            "not a model directory (no config.json)",
            model=model_dir,
            fix="pass a saved Hugging Face model directory",
        )
    return checkpoint_shapes(model_dir)


def load_model(model_dir: str, device: str, adapter: Optional[str] = None):
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    import torch

    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=True
        )
    except Exception as error:  # SafetensorError (truncated file), OSError, ValueError (bad config)
        text = str(error).strip()
        raise FisherInputError(
            f"cannot load the model ({error.__class__.__name__}: "
            f"{text.splitlines()[0][:300] if text else ''})",
            model=model_dir,
            fix="re-download or re-save it (a truncated or partial copy?)",
        ) from None
    if adapter is not None:
        from mergekit_fisher.estimator.lora import load_adapter

        # peft's own forward (W0 + s·B·A), in memory: nothing is merged or written
        model = load_adapter(model, adapter, model_name=model_dir)
    return model.to(device).eval()


def token_loss(model, batches, device: str) -> Dict[str, float]:
    """Token-weighted mean next-token NLL of `model` over already-collated batches: each is
    (model inputs, labels) with labels IGNORE (-100) where nothing is predicted, or the demo's
    (input_ids, attention_mask, labels)."""
    import torch
    import torch.nn.functional as F

    from mergekit_fisher.estimator.objectives import IGNORE

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            if len(batch) == 3:
                input_ids, attention_mask, labels = batch
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            else:
                inputs, labels = batch
            logits = model(**{name: value.to(device) for name, value in inputs.items()}).logits
            shifted_logits = logits[:, :-1].float()
            shifted_labels = labels[:, 1:].to(device)
            total += F.cross_entropy(
                shifted_logits.reshape(-1, shifted_logits.shape[-1]),
                shifted_labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            ).item()
            count += int((shifted_labels != IGNORE).sum().item())
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def evaluate_models(
    models: Dict[str, str],
    datasets: Dict[str, Sequence[str]],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    device: str = "cpu",
    tokenizer_dir: Optional[str] = None,
    stream: Sequence[str] = (),
    progress: Optional[bool] = None,
) -> Results:
    """Loss / perplexity of every model (label -> directory) on every dataset (label -> texts).

    JSONL-style datasets are one example per text, truncated to `max_length` tokens; datasets named
    in `stream` are single long texts cut into consecutive `max_length`-token windows.
    `progress`: a bar per model; by default unless -q.
    """
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    from mergekit_fisher.demo.tokenizer import collate, encode_examples, encode_stream

    transformers_logging.disable_progress_bar()  # one bar per model, not one per weight file

    device = resolve_device(device)
    if progress is None:
        progress = show_progress()
    results: Results = {}
    for label, model_dir in tqdm(
        list(models.items()), desc="evaluate", unit="model", disable=not progress
    ):
        log.debug("evaluating %s (%s) on %s", label, model_dir, ", ".join(datasets))
        tokenizer = load_tokenizer(model_dir, tokenizer_dir)
        model = load_model(model_dir, device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        results[label] = {}
        for name, texts in datasets.items():
            if name in stream:
                examples = [
                    window
                    for text in texts
                    for window in encode_stream(tokenizer, text, max_length)
                ]
            else:
                examples = encode_examples(tokenizer, texts, max_length)
            batches = [
                collate(examples[i : i + batch_size], pad_id)
                for i in range(0, len(examples), batch_size)
            ]
            results[label][name] = token_loss(model, batches, device)
        del model
    return results


def mean_loss(row: Dict[str, Dict[str, float]]) -> float:
    """Unweighted mean over datasets: each domain counts the same, whatever its token count."""
    return sum(cell["loss"] for cell in row.values()) / len(row)


def format_table(results: Results, *, markdown: bool = False) -> str:
    """Rows: models; columns: each dataset and the mean; cells: loss (perplexity)."""
    datasets = list(next(iter(results.values())).keys())
    header = ["model", *datasets, "mean"]
    rows = []
    for label, row in results.items():
        cells = [f"{row[name]['loss']:.3f} ({row[name]['perplexity']:.1f})" for name in datasets]
        mean = mean_loss(row)
        cells.append(f"{mean:.3f} ({math.exp(min(mean, 700.0)):.1f})")
        rows.append([label, *cells])
    if markdown:
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))
        )
    ]
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
        )
    return "\n".join(lines)


def _dataset_label(path: str, taken: Dict[str, object]) -> str:
    label = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    # "mean" is the --json key of the mean over files
    return label if label not in taken and label != "mean" else path


@dataclass(frozen=True)
class ModelSpec:
    """One MODEL argument: a directory, or mergekit's `base+adapter` reference."""

    label: str
    path: str
    adapter: Optional[str] = None


def parse_model(argument: str, label: str) -> ModelSpec:
    if "+" in argument and not os.path.exists(argument):
        parts = argument.split("+")
        if len(parts) != 2:
            raise FisherInputError(
                "a base+adapter reference has exactly one '+'",
                model=argument,
                fix="write BASE_DIR+ADAPTER_DIR",
            )
        return ModelSpec(label, parts[0], parts[1])
    return ModelSpec(label, argument)


def check_model(spec: ModelSpec, tokenizer_dir: Optional[str]):
    """Everything about one model that can be checked without loading it; returns its tokenizer."""
    shapes = check_model_dir(spec.path)
    if spec.adapter is not None:
        from mergekit_fisher.tools.checkpoint import checkpoint_index
        from mergekit_fisher.tools.lazy_adapter import AdapterDeltas

        if not os.path.isfile(os.path.join(spec.adapter, "adapter_config.json")):
            raise FisherInputError(
                "adapter not found (expected a directory with adapter_config.json)",
                model=spec.adapter,
                fix="pass the PEFT adapter directory saved with `save_pretrained`",
            )
        checkpoint_index(spec.adapter)  # safetensors only, never unpickled
        AdapterDeltas(spec.adapter).check_fits(shapes)  # names and shapes against the base
    return load_tokenizer(spec.path, tokenizer_dir, adapter=spec.adapter)


def prepare_data(path: str, tokenizer, max_length: int, max_examples: Optional[int]) -> list:
    """(model inputs, labels) per example, read and masked by compute's own `prepare`; a `.txt`
    file is one text in `max_length` windows."""
    from mergekit_fisher.choices import Task
    from mergekit_fisher.estimator.data import DataError, open_text, prepare

    if path.endswith(".txt") and os.path.isfile(path):
        from mergekit_fisher.demo.tokenizer import encode_stream

        with open_text(path) as fp:  # bytes that are not UTF-8: a DataError naming the line
            windows = encode_stream(tokenizer, fp.read(), max_length)
        if not windows:
            raise DataError("the data has no examples", file=path, fix="add text to the file")
        return [("stream", window) for window in windows]
    if path.endswith(".txt") and not os.path.exists(path):
        raise DataError("data file does not exist", file=path, fix="check the --data path")
    data = prepare(
        path,
        tokenizer,
        task=Task.CAUSAL_LM,
        num_examples=max_examples,
        max_length=max_length,
        seed=0,
        shuffle=False,
    )
    return data.examples


def batches_of(examples: list, pad_id: int, batch_size: int) -> list:
    from mergekit_fisher.choices import Task
    from mergekit_fisher.demo.tokenizer import collate as collate_windows
    from mergekit_fisher.estimator.data import collate

    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if chunk and isinstance(chunk[0], tuple):  # .txt windows
            out.append(collate_windows([window for _kind, window in chunk], pad_id))
        else:
            batch = collate(chunk, pad_id, Task.CAUSAL_LM)
            out.append((batch.model_inputs(), batch.labels))
    return out


def evaluate_files(
    specs: Sequence[ModelSpec],
    data_paths: Sequence[str],
    *,
    max_length: int = 256,
    max_examples: Optional[int] = None,
    batch_size: int = 8,
    device: str = "cpu",
    tokenizer_dir: Optional[str] = None,
    progress: bool = False,
) -> Results:
    """`eval`: every model and data file checked (and tokenized, once per distinct tokenizer)
    first, then one model in memory at a time."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    device = resolve_device(device)
    tokenizers = {spec: check_model(spec, tokenizer_dir) for spec in specs}
    labels: Dict[str, str] = {}
    for path in data_paths:
        labels[_dataset_label(path, labels)] = path
    prepared: Dict[tuple, list] = {}  # (tokenizer source, data label) -> examples
    for tokenizer in tokenizers.values():
        source = tokenizer.name_or_path
        for label, path in labels.items():
            if (source, label) not in prepared:
                prepared[(source, label)] = prepare_data(path, tokenizer, max_length, max_examples)
    results: Results = {}
    for spec in tqdm(specs, desc="evaluate", unit="model", disable=not progress):
        tokenizer = tokenizers[spec]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model = load_model(spec.path, device, adapter=spec.adapter)
        results[spec.label] = {
            label: token_loss(
                model,
                batches_of(prepared[(tokenizer.name_or_path, label)], pad_id, batch_size),
                device,
            )
            for label in labels
        }
        del model
    return results


def with_means(results: Results) -> dict:
    """--json: each model's cells plus "mean" (the unweighted mean loss over files, as in the
    table)."""
    out = {}
    for label, row in results.items():
        mean = mean_loss(row)
        out[label] = {**row, "mean": {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}}
    return out


@click.command("eval")
@verbosity_options
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--data",
    "data_paths",
    multiple=True,
    required=True,
    help=(
        "What compute reads: JSONL (text | prompt+completion | messages), a dataset saved with "
        "save_to_disk or a dataset repository; or .txt (one text, cut into windows). Repeatable."
    ),
)
@click.option(
    "--max-length",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="tokens per example / window",
)
@click.option(
    "--max-examples",
    type=click.IntRange(min=1),
    default=None,
    help="use only the first N examples of each JSONL file or dataset",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="tokenizer for models saved without one",
)
@click.option(
    "--json", "as_json", is_flag=True, help="print the results (and each model's mean) as JSON"
)
def eval_command(
    models, data_paths, max_length, max_examples, batch_size, device, tokenizer_dir, as_json
):
    """Held-out loss and perplexity of each MODEL (a directory, or BASE+ADAPTER) on each --data.

    Prints one row per model: loss (perplexity) per data file and the mean over files. The loss is
    on the tokens compute differentiates (completions, assistant turns). Every model and file is
    checked before the first forward pass.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    specs, taken = [], set()
    for argument in models:
        label = argument if argument not in taken else f"{argument} ({len(taken)})"
        taken.add(label)
        specs.append(parse_model(argument, label))
    results = evaluate_files(
        specs,
        data_paths,
        max_length=max_length,
        max_examples=max_examples,
        batch_size=batch_size,
        device=device,
        tokenizer_dir=tokenizer_dir,
        progress=not as_json and show_progress(),
    )
    if as_json:
        click.echo(json.dumps(with_means(results), indent=2))
    else:
        click.echo(format_table(results))
