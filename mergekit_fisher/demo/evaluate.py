"""Held-out loss / perplexity of causal LMs on text data; `mergekit-fisher eval`.

The loss is the mean next-token negative log-likelihood (nats) over every predicted token of a
dataset (token-weighted, so long and short examples count by their size); perplexity = exp(loss).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence

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


def load_texts(path: str, max_examples: Optional[int] = None) -> List[str]:
    """Examples of a data file: JSONL rows' `text`, or a `.txt` file as one text (cut into windows
    later).

    JSONL is read by the estimator's reader (`estimator.data.read_jsonl`), so both commands refuse
    the same bad lines with the same errors."""
    from mergekit_fisher.estimator.data import DataError, read_jsonl

    if not os.path.isfile(path):
        raise DataError(
            "data file does not exist",
            file=path,
            fix="pass an existing .jsonl or .txt file to --data",
        )
    if path.endswith(".txt"):
        from mergekit_fisher.estimator.data import open_text

        with open_text(path) as fp:  # bytes that are not UTF-8: a DataError naming the line
            return [fp.read()]
    texts = []
    for where, row in read_jsonl(path, limit=max_examples):
        if not isinstance(row.get("text"), str):
            line = where.rsplit(":", 1)[1]
            raise DataError(
                f'line {line} has no string "text" field',
                file=path,
                fix='write one JSON object per line, like {"text": "..."}',
            )
        texts.append(row["text"])
    if not texts:
        raise DataError("the data has no examples", file=path, fix='add rows like {"text": "..."}')
    return texts


def load_tokenizer(model_dir: str, fallback: Optional[str] = None):
    from transformers import AutoTokenizer

    for source in (model_dir, fallback):
        if source and os.path.exists(os.path.join(source, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(source)
    raise FisherInputError(
        "no tokenizer found next to the model",
        model=model_dir,
        fix="save the tokenizer with the model or pass --tokenizer DIR",
    )


def load_model(model_dir: str, device: str):
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FisherInputError(
            "not a model directory (no config.json)",
            model=model_dir,
            fix="pass a saved Hugging Face model directory",
        )
    import torch

    from mergekit_fisher.tools.checkpoint import checkpoint_index

    # safetensors only (a pickle-only checkpoint is refused, never unpickled), every shard present
    # and inside the directory: checked from the headers before transformers opens anything
    checkpoint_index(model_dir)
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
    return model.to(device).eval()


def token_loss(model, batches, device: str) -> Dict[str, float]:
    """Token-weighted mean next-token NLL of `model` over already-collated batches."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, attention_mask, labels in batches:
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits
            shifted_logits = logits[:, :-1].float()
            shifted_labels = labels[:, 1:].to(device)
            total += F.cross_entropy(
                shifted_logits.reshape(-1, shifted_logits.shape[-1]),
                shifted_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            ).item()
            count += int((shifted_labels != -100).sum().item())
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
    label = os.path.splitext(os.path.basename(path))[0]
    return label if label not in taken else path


@click.command("eval")
@verbosity_options
@click.argument("models", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option(
    "--data",
    "data_paths",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help=(
        "JSONL with a `text` field per row (one example each), or .txt (cut into windows). "
        "Repeatable."
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
    help="use only the first N rows of each JSONL file",
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
    "--json", "as_json", is_flag=True, help="print the results as JSON instead of a table"
)
def eval_command(
    models, data_paths, max_length, max_examples, batch_size, device, tokenizer_dir, as_json
):
    """Held-out loss and perplexity of each MODEL directory on each --data file.

    Prints one row per model: loss (perplexity) per data file and the mean over files.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for model_dir in models:
        if not os.path.isdir(model_dir):
            raise FisherInputError(
                "model directory does not exist",
                model=model_dir,
                fix="pass a saved model directory",
            )
    datasets: Dict[str, List[str]] = {}
    stream = []
    for path in data_paths:
        label = _dataset_label(path, datasets)
        datasets[label] = load_texts(path, max_examples)
        if path.endswith(".txt"):
            stream.append(label)
    labels: Dict[str, str] = {}
    for model_dir in models:
        labels[model_dir if model_dir not in labels else f"{model_dir} ({len(labels)})"] = model_dir
    results = evaluate_models(
        labels,
        datasets,
        max_length=max_length,
        batch_size=batch_size,
        device=device,
        tokenizer_dir=tokenizer_dir,
        stream=stream,
        progress=not as_json and show_progress(),
    )
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        click.echo(format_table(results))
