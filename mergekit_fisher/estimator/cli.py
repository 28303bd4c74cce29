"""`mergekit-fisher compute MODEL OUT_DIR --data PATH [options]`: a thin click layer over `runner`.

Also runs data parallel as ``accelerate launch [--num_processes K] -m mergekit_fisher compute ...``.
"""

from __future__ import annotations

import click


@click.command("compute")
@click.argument("model")
@click.argument("out_dir")
@click.option("--data", required=True, help="JSONL (text | prompt+completion | messages; seq-cls: text[/text_pair]+label), "
              ".txt (one example per line), a dataset saved with save_to_disk, or a hub dataset name.")
@click.option("--task", type=click.Choice(["causal-lm", "seq-cls"]), default="causal-lm", show_default=True)
@click.option("--fisher-type", type=click.Choice(["empirical", "sampled", "exact"]), default=None,
              help="empirical: the data's labels; sampled: labels drawn from the model (true Fisher, Monte Carlo); "
              "exact: sum over classes (seq-cls only). Default: sampled for causal-lm, exact for seq-cls.")
@click.option("--samples", type=int, default=1, show_default=True, help="draws per example for --fisher-type sampled")
@click.option("--num-examples", type=int, default=None, help="use at most this many examples (after shuffling)")
@click.option("--max-length", type=int, default=512, show_default=True, help="truncate longer examples (counted)")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="shuffling and sampled labels")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True)
@click.option("--lora", default=None, help="PEFT LoRA adapter directory applied on top of MODEL")
@click.option("--params", type=click.Choice(["all", "adapter-targets"]), default="all", show_default=True,
              help="with --lora: every base tensor, or only the weights the adapter changes")
@click.option("--space", type=click.Choice(["dense", "adapter"]), default="dense", show_default=True,
              help="with --lora: Fisher of W0+BA under base names (dense) or of lora_A/lora_B (adapter)")
@click.option("--accumulator-dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "float64"]), default="float32",
              show_default=True, help="model dtype during the computation (accumulation stays float32/64)")
@click.option("--device-map", default=None, help="e.g. `auto`: spread one model over this node's GPUs")
@click.option("--checkpoint-every", type=int, default=None,
              help="save accumulators every N examples next to OUT_DIR; rerun the same command to resume")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace an existing OUT_DIR")
@click.option("--trust-remote-code", is_flag=True, help="allow custom model code from the model repo (off by default)")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def compute(model, out_dir, data, task, fisher_type, samples, num_examples, max_length, batch_size, seed, shuffle,
            lora, params, space, accumulator_dtype, dtype, device_map, checkpoint_every, max_shard_size, overwrite,
            trust_remote_code, no_progress):
    """Estimate the diagonal Fisher of MODEL (or MODEL + --lora ADAPTER) and write it to OUT_DIR (format v1).

    F = mean over examples of (d log p(example) / d theta)^2, with log p the example's summed
    log-likelihood; per-example gradients come from one backward pass per batch.
    """
    import os

    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

    # `~/x` in a quoted or `--opt=~/x` argument is not expanded by the shell
    model, out_dir, data = (os.path.expanduser(p) for p in (model, out_dir, data))
    lora = os.path.expanduser(lora) if lora else lora
    options = ComputeOptions(
        model=model, out_dir=out_dir, data=data, task=task, fisher_type=fisher_type, samples=samples,
        num_examples=num_examples, max_length=max_length, batch_size=batch_size, seed=seed, shuffle=shuffle,
        lora=lora, params=params, space=space, accumulator_dtype=accumulator_dtype, dtype=dtype,
        device_map=device_map, checkpoint_every=checkpoint_every, max_shard_size=max_shard_size,
        overwrite=overwrite, trust_remote_code=trust_remote_code, progress=not no_progress,
    )
    config = run_compute(options)
    if config is not None:
        click.echo(
            f"wrote {out_dir}: {config.num_examples} examples, {config.num_tokens} tokens, "
            f"{config.fisher_type} Fisher, mean {config.sum / max(1, config.num_elements):.3e}"
        )
