"""`mergekit-fisher demo [WORKDIR]`: the whole story in one command (see `demo.pipeline`)."""

from __future__ import annotations

import os
from dataclasses import fields, replace

import click

from mergekit_fisher.choices import Domain, FisherType
from mergekit_fisher.cli import CommaList, EnumChoice, FiniteFloatRange, flatten, verbosity_options
from mergekit_fisher.demo.pipeline import TINY, DemoSettings
from mergekit_fisher.math import Normalization

DEFAULTS = DemoSettings()
POSITIVE_INT, POSITIVE_FLOAT = click.IntRange(min=1), FiniteFloatRange(min=0, min_open=True)


def _option(name: str, help_text: str, **extra):
    """A size or rate of the demo: default None, so --tiny's value applies unless the option is
    given."""
    default = getattr(DEFAULTS, name)
    kind = POSITIVE_INT if isinstance(default, int) else POSITIVE_FLOAT
    return click.option(
        f"--{name.replace('_', '-')}",
        name,
        type=kind,
        default=None,
        help=f"{help_text} [default: {default}; --tiny: {TINY.get(name, default)}]",
        **extra,
    )


@click.command("demo")
@verbosity_options
@click.argument("workdir", default="fisher-demo", type=click.Path(file_okay=False))
@click.option(
    "--seed",
    type=int,
    default=DEFAULTS.seed,
    show_default=True,
    help="one seed for data split, training, Fisher and DARE",
)
@click.option(
    "--domains",
    type=CommaList(EnumChoice(Domain)),
    multiple=True,
    callback=flatten,
    default=[str(name) for name in DEFAULTS.domains],
    show_default=True,
    help="two or more of: docs (Python reference manual prose), asyncio, email (stdlib source); "
    "comma-separated or repeated",
)
@_option("train_examples", "training examples per domain")
@_option("heldout_examples", "held-out examples per domain")
@_option("chunk_chars", "characters per example")
@_option("vocab_size", "BPE vocabulary size")
@_option("hidden", "hidden size (multiple of 16)")
@_option("layers", "transformer layers")
@_option("max_length", "tokens per example")
@_option("batch_size", "training batch size")
@_option("pretrain_steps", "pre-training steps on the mixture")
@_option("finetune_steps", "fine-tuning steps per specialist")
@_option("pretrain_lr", "pre-training learning rate")
@_option("finetune_lr", "fine-tuning learning rate")
@_option("fisher_examples", "examples per Fisher (compute --num-examples)")
@click.option(
    "--fisher-type",
    type=EnumChoice(FisherType, [FisherType.SAMPLED, FisherType.EMPIRICAL]),
    default=str(DEFAULTS.fisher_type),
    show_default=True,
    help="compute --fisher-type",
)
@click.option(
    "--density",
    type=FiniteFloatRange(0.0, 1.0, min_open=True),
    default=DEFAULTS.density,
    show_default=True,
    help="density of the TIES-family merges",
)
@click.option(
    "--fisher-normalize",
    type=EnumChoice(Normalization),
    default=str(DEFAULTS.fisher_normalize),
    show_default=True,
)
@click.option(
    "--fisher-floor",
    type=FiniteFloatRange(min=0.0),
    default=DEFAULTS.fisher_floor,
    show_default=True,
)
@click.option(
    "--device",
    default=DEFAULTS.device,
    show_default=True,
    help="cpu | cuda | auto (training, merging, evaluation)",
)
@click.option(
    "--jobs",
    type=POSITIVE_INT,
    default=DEFAULTS.jobs,
    show_default=True,
    help="subprocesses (compute, mergekit-yaml) run at once",
)
@click.option(
    "--threads",
    type=POSITIVE_INT,
    default=DEFAULTS.threads,
    show_default=True,
    help="torch threads per process (training, compute, merges)",
)
@click.option(
    "--tiny",
    is_flag=True,
    help="a seconds-long run at toy sizes, in one process: it shows the pipeline works, not that "
    "Fisher merging helps",
)
@click.option(
    "--in-process/--subprocesses",
    "in_process",
    default=None,
    help="run compute and mergekit-yaml inside this process (saves their start-up) or as the "
    "command lines a user types [default: --in-process with --tiny, else --subprocesses]",
)
@click.option(
    "--plot/--no-plot",
    default=True,
    show_default=True,
    help="write chart.png (needs matplotlib: the `plot` extra)",
)
@click.option("--overwrite", is_flag=True, help="rebuild every demo output already in WORKDIR")
def demo_command(workdir, domains, tiny, overwrite, **options):
    """Pre-train a tiny Llama on text that ships with Python, fine-tune one specialist per domain,
    compute each one's Fisher (`mergekit-fisher compute`), merge them with `mergekit-yaml` (linear,
    ties, dare_ties, fisher, fisher_ties, fisher_dare_ties), and print / write held-out loss per
    domain and a chart.

    Everything goes under WORKDIR (default ./fisher-demo): data, tokenizer, models, fisher, recipes,
    merges, results.json, results.md, chart.png.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mergekit_fisher.demo.pipeline import run_demo, tiny_settings

    settings = tiny_settings() if tiny else DemoSettings()
    given = {key: value for key, value in options.items() if value is not None}
    given["domains"] = domains
    known = {f.name for f in fields(DemoSettings)}
    settings = replace(settings, **{key: value for key, value in given.items() if key in known})
    run_demo(workdir, settings, overwrite=overwrite)
