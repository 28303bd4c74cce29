"""`mergekit-fisher compute MODEL OUT_DIR --data PATH [options]`: a thin click layer over `runner`.

Also runs data parallel as ``accelerate launch [--num_processes K] -m mergekit_fisher compute ...``.
"""

from __future__ import annotations

import logging

import click

from mergekit_fisher.choices import (
    AccumulatorDtype,
    Dtype,
    FisherType,
    Params,
    SaveDtype,
    Space,
    Statistic,
    Task,
)
from mergekit_fisher.cli import EnumChoice, show_progress, verbosity_options

log = logging.getLogger(__name__)
POSITIVE = click.IntRange(min=1)


@click.command("compute")
@verbosity_options
@click.argument("model", type=click.Path())
@click.argument("out_dir", type=click.Path(dir_okay=True, file_okay=False))
@click.option(
    "--data",
    required=True,
    type=click.Path(),
    help="JSONL (text | prompt+completion | messages; seq-cls: text[/text_pair]+label), "
    ".txt (one example per line), a dataset saved with save_to_disk, or a hub dataset name.",
)
@click.option(
    "--text-field",
    default=None,
    metavar="NAME",
    help="read this column as the text (datasets whose text column is not called `text`)",
)
@click.option("--subset", default=None, help="`datasets` config name of a hub dataset")
@click.option("--split", default=None, help="`datasets` split (default: train, or the only split)")
@click.option("--revision", default=None, help="Hub revision (branch, tag, commit) of the dataset")
@click.option(
    "--streaming",
    is_flag=True,
    help=(
        "read a `datasets` dataset as a stream (nothing downloaded up front; needs --num-examples; "
        "shuffled in datasets' buffer of --shuffle-buffer rows)"
    ),
)
@click.option("--shuffle-buffer", type=POSITIVE, default=10_000, show_default=True)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help=(
        "compute the I-th of N disjoint shards of the selected examples (a SLURM array, separate "
        "machines); `mergekit-fisher combine` of the N outputs equals one run over all of them"
    ),
)
@click.option("--task", type=EnumChoice(Task), default=Task.CAUSAL_LM.value, show_default=True)
@click.option(
    "--statistic",
    type=EnumChoice(Statistic),
    default=Statistic.FISHER.value,
    show_default=True,
    help="fisher: the diagonal Fisher (for the Fisher methods); gram: Σ xᵀx of every linear "
    "layer's inputs over non-padding tokens (for merge_method: regmean; forward passes only)",
)
@click.option(
    "--fisher-type",
    type=EnumChoice(FisherType),
    default=None,
    help=(
        "empirical: the data's labels; sampled: labels drawn from the model (true Fisher, "
        "Monte Carlo); exact: sum over classes (seq-cls only). Default: sampled for causal-lm, "
        "exact for seq-cls."
    ),
)
@click.option(
    "--samples",
    type=POSITIVE,
    default=1,
    show_default=True,
    help="draws per example for --fisher-type sampled",
)
@click.option(
    "--num-examples",
    type=POSITIVE,
    default=None,
    help="use at most this many examples (after shuffling)",
)
@click.option(
    "--max-length",
    type=POSITIVE,
    default=512,
    show_default=True,
    help="truncate longer examples (counted)",
)
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="shuffling and sampled labels")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True)
@click.option(
    "--group-by-length/--no-group-by-length",
    default=True,
    show_default=True,
    help=(
        "JSONL/txt: batch rows of similar length together (within windows of 64 batches), so "
        "less padding is computed; the Fisher is the same up to float rounding"
    ),
)
@click.option(
    "--lora",
    type=click.Path(file_okay=False),
    default=None,
    help="PEFT LoRA adapter directory applied on top of MODEL",
)
@click.option(
    "--params",
    type=EnumChoice(Params),
    default=Params.ALL.value,
    show_default=True,
    help="with --lora: every base tensor, or only the weights the adapter changes",
)
@click.option(
    "--space",
    type=EnumChoice(Space),
    default=Space.DENSE.value,
    show_default=True,
    help="with --lora: Fisher of W0+BA under base names (dense) or of lora_A/lora_B (adapter)",
)
@click.option(
    "--accumulator-dtype",
    type=EnumChoice(AccumulatorDtype),
    default=AccumulatorDtype.FLOAT32.value,
    show_default=True,
)
@click.option(
    "--dtype",
    type=EnumChoice(Dtype),
    default=Dtype.FLOAT32.value,
    show_default=True,
    help="model dtype during the computation (accumulation stays float32/64)",
)
@click.option(
    "--save-dtype",
    type=EnumChoice(SaveDtype),
    default=SaveDtype.FLOAT32.value,
    show_default=True,
    help="dtype of the stored Fisher (bfloat16: half the size; its statistics are of the stored "
    "values)",
)
@click.option(
    "--device-map",
    default=None,
    help=(
        "`auto`: spread one model over this node's GPUs, leaving room on each for the "
        "accumulators of its weights"
    ),
)
@click.option(
    "--max-memory",
    default=None,
    metavar="DEV=SIZE,...",
    help="capacity per device for --device-map auto, e.g. 0=70GiB,1=70GiB",
)
@click.option(
    "--checkpoint-every",
    type=POSITIVE,
    default=None,
    help="save accumulators every N examples next to OUT_DIR; rerun the same command to resume",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="e.g. 5GB, 500MB, 2GiB")
@click.option("--overwrite", is_flag=True, help="replace an existing OUT_DIR")
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="allow custom model code from the model repo (off by default)",
)
@click.option("--no-progress", is_flag=True, help="no progress bar (-q hides it too)")
@click.option(
    "--push-to-hub",
    "push_to_hub",
    default=None,
    metavar="REPO_ID",
    help=(
        "at the end, upload OUT_DIR with its card to this Hub repository (as `mergekit-fisher "
        "push`)"
    ),
)
def compute(
    model,
    out_dir,
    data,
    text_field,
    subset,
    split,
    revision,
    streaming,
    shuffle_buffer,
    shard,
    task,
    statistic,
    fisher_type,
    samples,
    num_examples,
    max_length,
    batch_size,
    seed,
    shuffle,
    group_by_length,
    lora,
    params,
    space,
    accumulator_dtype,
    dtype,
    save_dtype,
    device_map,
    max_memory,
    checkpoint_every,
    max_shard_size,
    overwrite,
    trust_remote_code,
    no_progress,
    push_to_hub,
):
    """Estimate the diagonal Fisher of MODEL (or MODEL + --lora ADAPTER) and write it to OUT_DIR
    (format v1).

    F = mean over examples of (d log p(example) / d theta)^2, with log p the example's summed
    log-likelihood; per-example gradients come from one backward pass per batch.
    """
    import os

    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

    # `~/x` in a quoted or `--opt=~/x` argument is not expanded by the shell
    model, out_dir, data = (os.path.expanduser(p) for p in (model, out_dir, data))
    lora = os.path.expanduser(lora) if lora else lora
    options = ComputeOptions(
        model=model,
        out_dir=out_dir,
        data=data,
        task=task,
        statistic=statistic,
        fisher_type=fisher_type,
        samples=samples,
        num_examples=num_examples,
        max_length=max_length,
        batch_size=batch_size,
        seed=seed,
        shuffle=shuffle,
        group_by_length=group_by_length,
        lora=lora,
        params=params,
        space=space,
        accumulator_dtype=accumulator_dtype,
        dtype=dtype,
        save_dtype=save_dtype,
        device_map=device_map,
        max_memory=max_memory,
        text_field=text_field,
        subset=subset,
        split=split,
        revision=revision,
        shard=shard,
        streaming=streaming,
        shuffle_buffer=shuffle_buffer,
        checkpoint_every=checkpoint_every,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
        progress=not no_progress and show_progress(),
    )
    config = run_compute(options)
    if config is not None:
        log.info(
            "wrote %s: %s examples, %s tokens, %s Fisher, mean %.3e",
            out_dir,
            config.num_examples,
            config.num_tokens,
            config.fisher_type,
            config.sum / max(1, config.num_elements),
        )
        if push_to_hub:  # the main process only (run_compute returns None on the others)
            from mergekit_fisher.tools.push import push_fisher

            log.info("uploaded to %s", push_fisher(out_dir, push_to_hub))
