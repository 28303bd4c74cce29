"""The demo, stage by stage, everything under one WORKDIR:

    data/        <domain>.train.jsonl, <domain>.heldout.jsonl
    tokenizer/   byte-level BPE trained on the mixture's training text
    models/      base (pre-trained on the mixture), one specialist per domain
    fisher/      each specialist's Fisher, from `mergekit-fisher compute` on its own training text
    gram/        each specialist's Gram file (`compute --statistic gram`, same text), for `regmean`
    recipes/     <method>.yml, rerunnable with `mergekit-yaml recipes/<method>.yml OUT`
    merges/      <method>/ written by the stock `mergekit-yaml`
    results.json, results.md, chart.png

Stages 2 and 3 call the real command lines in subprocesses, exactly as a user would; with
`in_process` (what `--tiny` uses) through the same entry points inside this process, which saves
each command's start-up.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import click

from mergekit_fisher.choices import Domain, FisherType
from mergekit_fisher.demo.evaluate import format_table
from mergekit_fisher.errors import FisherInputError

log = logging.getLogger(__name__)

OUTPUTS = (
    "data",
    "tokenizer",
    "models",
    "fisher",
    "recipes",
    "merges",
    "results.json",
    "results.md",
    "chart.png",
)


@dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo; the defaults take about a minute and a half on two CPU cores."""

    seed: int = 0
    domains: Tuple[Domain, ...] = (Domain.DOCS, Domain.ASYNCIO)
    # data
    chunk_chars: int = 400
    train_examples: int = 800
    heldout_examples: int = 64
    # model and training
    vocab_size: int = 1024
    hidden: int = 64
    layers: int = 2
    max_length: int = 128
    batch_size: int = 16
    pretrain_steps: int = 500
    finetune_steps: int = 200
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    # Fisher and merging
    fisher_examples: int = 128
    fisher_type: FisherType = FisherType.SAMPLED
    density: float = 0.7
    fisher_normalize: str = "mean"  # a mergekit_fisher.math.Normalization value
    fisher_floor: float = 1e-6
    # execution
    device: str = "cpu"
    jobs: int = 2
    # torch threads per process: models this small gain nothing from intra-op parallelism, and
    # threads oversubscribing a busy 2-core machine made training 4x slower in our measurements
    threads: int = 1
    plot: bool = True
    # run compute and mergekit-yaml through their own entry points inside this process instead of
    # as subprocesses: the same code, without paying each command's start-up (mergekit's import
    # alone took ~20 s per command on a loaded 2-core machine)
    in_process: bool = False


TINY = dict(
    chunk_chars=120,
    train_examples=24,
    heldout_examples=8,
    vocab_size=300,
    hidden=16,
    layers=1,
    max_length=32,
    batch_size=8,
    pretrain_steps=40,
    finetune_steps=40,
    fisher_examples=8,
    in_process=True,
)


def tiny_settings(**overrides) -> DemoSettings:
    """Seconds instead of minutes: for tests and a first look."""
    return replace(DemoSettings(**TINY), **overrides)


@dataclass
class StageLog:
    """Stage and progress lines: log messages (stderr; -q hides them) unless `echo` is given."""

    echo: Callable[[str], None] = log.info
    timings: Dict[str, float] = field(default_factory=dict)

    def stage(self, number: int, total: int, title: str) -> "_Stage":
        return _Stage(self, f"[{number}/{total}] {title}")


class _Stage:
    def __init__(self, log: StageLog, title: str):
        self.log, self.title = log, title

    def __enter__(self):
        self.start = time.perf_counter()
        self.log.echo(f"{self.title} ...")
        return self

    def __exit__(self, *exc):
        elapsed = time.perf_counter() - self.start
        self.log.timings[self.title] = round(elapsed, 2)
        if exc[0] is None:
            self.log.echo(f"{self.title}: done in {elapsed:.1f}s")


# --- checks before any work: bad input fails fast and leaves nothing behind ---------------------


def mergekit_yaml_executable() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mergekit-yaml")
    if not found:
        raise FisherInputError(
            "the mergekit-yaml command was not found next to this Python or on PATH",
            fix="install mergekit (pip install 'mergekit>=0.1.5,<0.2') in this environment",
        )
    return found


def check_settings(workdir: str, settings: DemoSettings, overwrite: bool) -> None:
    from mergekit_fisher.demo.corpus import DOMAINS
    from mergekit_fisher.demo.evaluate import resolve_device

    unknown = [name for name in settings.domains if name not in DOMAINS]
    if unknown or len(settings.domains) < 2 or len(set(settings.domains)) != len(settings.domains):
        raise FisherInputError(
            f"--domains needs two or more different domains, got {','.join(settings.domains)}",
            fix=f"choose from {', '.join(sorted(DOMAINS))}",
        )
    # sizes, counts and --density: ranges checked by the command line (click.IntRange / FloatRange)
    if settings.hidden % 16 and settings.hidden > 16:
        raise FisherInputError(
            f"--hidden must be a multiple of 16 (heads of 16 dims), got {settings.hidden}",
            fix="use e.g. --hidden 64",
        )
    resolve_device(settings.device)
    if settings.plot and importlib.util.find_spec("matplotlib") is None:
        raise FisherInputError(
            "the chart needs matplotlib, which is not installed",
            fix="pip install 'mergekit-fisher[plot]', or pass --no-plot to skip the chart",
        )
    existing = [name for name in OUTPUTS if os.path.exists(os.path.join(workdir, name))]
    if existing and not overwrite:
        raise FisherInputError(
            f"{workdir} already holds demo outputs ({', '.join(existing)})",
            fix="pass --overwrite to rebuild everything there, or choose a fresh WORKDIR",
        )


def clear_outputs(workdir: str) -> None:
    """Remove only what the demo writes, never anything else a user keeps in WORKDIR."""
    for name in OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


# --- subprocesses: the real command lines ------------------------------------------------------


def child_env(settings: DemoSettings) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = str(settings.threads)  # torch's intra-op threads in each child
    if settings.device == "cpu":
        # `compute` takes a GPU whenever it sees one; --device cpu means every stage on the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_in_process(name: str, command: List[str]) -> None:
    """One of the demo's commands through its own click entry point, in this process:
    `python -m mergekit_fisher ...` is `mergekit-fisher ...`, `mergekit-yaml ...` is mergekit's
    `main` (with the Fisher methods registered, as the .pth hook does in a fresh process)."""
    import contextlib
    import io

    output = io.StringIO()
    package_log = logging.getLogger("mergekit_fisher")
    level = package_log.level  # `-q` below sets it for the command; the demo's lines stay shown
    try:
        with contextlib.redirect_stdout(output):
            if command[1:3] == ["-m", "mergekit_fisher"]:
                from mergekit_fisher.cli import main

                main.main(
                    args=["-q", *command[3:]], prog_name="mergekit-fisher", standalone_mode=False
                )
            else:
                from mergekit.scripts.run_yaml import main as mergekit_yaml

                from mergekit_fisher.merge.registry import ensure_registered

                ensure_registered()
                mergekit_yaml.main(
                    args=command[1:], prog_name="mergekit-yaml", standalone_mode=False
                )
    except Exception as error:
        tail = "\n".join(output.getvalue().strip().splitlines()[-25:])
        raise click.ClickException(
            f"{name} failed ({error.__class__.__name__}: {error}): {' '.join(command)}\n{tail}"
        ) from error
    finally:
        package_log.setLevel(level)


def in_process_ok(settings: DemoSettings) -> bool:
    """In-process runs share this process's devices: `compute` would take a visible GPU even with
    --device cpu, which only a subprocess (CUDA_VISIBLE_DEVICES="") can hide."""
    import torch

    return settings.in_process and not (settings.device == "cpu" and torch.cuda.is_available())


def run_commands(commands: Dict[str, List[str]], settings: DemoSettings, log: StageLog) -> None:
    """Run named commands, `settings.jobs` at a time (or one after another in this process, with
    `in_process`); on a failure show its output's tail and stop."""
    if in_process_ok(settings):
        for name, command in commands.items():
            start = time.perf_counter()
            run_in_process(name, command)
            log.echo(f"  {name}: {time.perf_counter() - start:.1f}s (in process)")
        return
    env = child_env(settings)
    jobs = settings.jobs

    def run_one(item):
        name, command = item
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        return name, command, done, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, command, done, elapsed in pool.map(run_one, commands.items()):
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
                raise click.ClickException(
                    f"{name} failed (exit {done.returncode}): {' '.join(command)}\n{tail}"
                )
            log.echo(f"  {name}: {elapsed:.1f}s")


# --- the stages -------------------------------------------------------------------------------


def write_jsonl(path: str, texts: Sequence[str]) -> str:
    with open(path, "w", encoding="utf-8") as fp:
        for text in texts:
            fp.write(json.dumps({"text": text}) + "\n")
    return path


def build_models(workdir: str, settings: DemoSettings, log: StageLog) -> dict:
    """Data, tokenizer, base model and one specialist per domain; returns paths and training
    losses."""
    import copy

    from mergekit_fisher.demo.corpus import load_domain
    from mergekit_fisher.demo.tokenizer import encode_examples, train_tokenizer
    from mergekit_fisher.demo.train import TrainSettings, build_model, save_model, train

    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    domains = {}
    for name in settings.domains:
        domains[name] = load_domain(
            name,
            num_train=settings.train_examples,
            num_heldout=settings.heldout_examples,
            chunk_chars=settings.chunk_chars,
            seed=settings.seed,
        )
        write_jsonl(os.path.join(workdir, "data", f"{name}.train.jsonl"), domains[name].train)
        write_jsonl(os.path.join(workdir, "data", f"{name}.heldout.jsonl"), domains[name].heldout)
    mixture = [text for data in domains.values() for text in data.train]
    tokenizer = train_tokenizer(
        mixture, os.path.join(workdir, "tokenizer"), vocab_size=settings.vocab_size
    )
    encoded = {
        name: encode_examples(tokenizer, data.train, settings.max_length)
        for name, data in domains.items()
    }

    base = build_model(
        vocab_size=len(tokenizer),
        hidden=settings.hidden,
        layers=settings.layers,
        max_length=settings.max_length,
        seed=settings.seed,
    )
    pretrain = TrainSettings(settings.pretrain_steps, settings.batch_size, settings.pretrain_lr)
    losses = {
        "base": train(
            base,
            [ids for ids in encoded.values() for ids in ids],
            pretrain,
            seed=settings.seed,
            device=settings.device,
            desc="pre-train base",
        )
    }
    paths = {"base": save_model(base, tokenizer, os.path.join(workdir, "models", "base"))}
    log.echo(
        f"  base: pre-trained {settings.pretrain_steps} steps, last loss {losses['base'][-1]:.3f}"
    )
    finetune = TrainSettings(settings.finetune_steps, settings.batch_size, settings.finetune_lr)
    for index, name in enumerate(settings.domains, start=1):
        specialist = copy.deepcopy(base)
        losses[name] = train(
            specialist,
            encoded[name],
            finetune,
            seed=settings.seed + index,
            device=settings.device,
            desc=f"fine-tune {name}",
        )
        paths[name] = save_model(specialist, tokenizer, os.path.join(workdir, "models", name))
        log.echo(
            f"  {name} specialist: fine-tuned {settings.finetune_steps} steps, "
            f"last loss {losses[name][-1]:.3f}"
        )
        del specialist
    return {
        "paths": paths,
        "losses": losses,
        "heldout": {name: d.heldout for name, d in domains.items()},
    }


def compute_fishers(
    workdir: str,
    settings: DemoSettings,
    models: Dict[str, str],
    log: StageLog,
    folder: Optional[str] = None,
) -> Dict[str, str]:
    """Each specialist's Fisher, into `folder` (default WORKDIR/fisher)."""
    folder = folder or os.path.join(workdir, "fisher")
    fishers, commands = {}, {}
    for name in settings.domains:
        fishers[name] = os.path.join(folder, name)
        commands[f"compute {name}"] = [
            sys.executable,
            "-m",
            "mergekit_fisher",
            "compute",
            models[name],
            fishers[name],
            "--data",
            os.path.join(workdir, "data", f"{name}.train.jsonl"),
            "--fisher-type",
            FisherType(settings.fisher_type).value,
            "--num-examples",
            str(settings.fisher_examples),
            "--max-length",
            str(settings.max_length),
            "--batch-size",
            str(min(settings.batch_size, 8)),
            "--seed",
            str(settings.seed),
            "--no-progress",
        ]
    os.makedirs(folder, exist_ok=True)
    run_commands(commands, settings, log)
    return fishers


def compute_grams(
    workdir: str, settings: DemoSettings, models: Dict[str, str], log: StageLog
) -> Dict[str, str]:
    """Each specialist's Gram file (for `regmean`), on the same training text as its Fisher."""
    grams, commands = {}, {}
    for name in settings.domains:
        grams[name] = os.path.join(workdir, "gram", name)
        commands[f"compute --statistic gram {name}"] = [
            sys.executable,
            *("-m", "mergekit_fisher", "compute", models[name], grams[name]),
            *("--data", os.path.join(workdir, "data", f"{name}.train.jsonl")),
            *("--statistic", "gram", "--num-examples", str(settings.fisher_examples)),
            *("--max-length", str(settings.max_length)),
            *("--batch-size", str(min(settings.batch_size, 8)), "--seed", str(settings.seed)),
            "--no-progress",
        ]
    os.makedirs(os.path.join(workdir, "gram"), exist_ok=True)
    run_commands(commands, settings, log)
    return grams


def write_recipes(
    workdir: str,
    settings: DemoSettings,
    models: Dict[str, str],
    fishers: Dict[str, str],
    grams: Optional[Dict[str, str]] = None,
) -> Dict[str, str]:
    import yaml

    from mergekit_fisher.demo.recipes import MERGE_METHODS, recipe_for

    folder = os.path.join(workdir, "recipes")
    os.makedirs(folder, exist_ok=True)
    specialists = {name: models[name] for name in settings.domains}
    paths = {}
    for method in MERGE_METHODS:
        recipe = recipe_for(
            method,
            base=models["base"],
            specialists=specialists,
            fishers=fishers,
            density=settings.density,
            fisher_normalize=settings.fisher_normalize,
            fisher_floor=settings.fisher_floor,
            grams=grams,
        )
        paths[method] = os.path.join(folder, f"{method}.yml")
        with open(paths[method], "w", encoding="utf-8") as fp:
            yaml.safe_dump(recipe, fp, sort_keys=False)
    return paths


def run_merges(
    workdir: str, settings: DemoSettings, recipes: Dict[str, str], log: StageLog
) -> Dict[str, str]:
    executable = mergekit_yaml_executable()
    merges, commands = {}, {}
    for method, recipe in recipes.items():
        merges[method] = os.path.join(workdir, "merges", method)
        command = [
            executable,
            recipe,
            merges[method],
            "--random-seed",
            str(settings.seed),
            "--quiet",
        ]
        if settings.device.startswith("cuda"):
            command.append("--cuda")
        commands[f"mergekit-yaml {method}"] = command
    run_commands(commands, settings, log)
    return merges


def run_demo(
    workdir: str,
    settings: DemoSettings,
    *,
    overwrite: bool = False,
    echo: Optional[Callable[[str], None]] = None,
) -> dict:
    """All five stages; returns what results.json holds.

    The held-out table and the verdict are the command's output (stdout); stage lines are log
    messages. `echo`, when given, receives both (tests, notebooks)."""
    import torch

    from mergekit_fisher.demo.evaluate import resolve_device

    workdir = os.path.abspath(workdir)
    check_settings(workdir, settings, overwrite)
    settings = replace(settings, device=resolve_device(settings.device))  # "auto" -> cpu | cuda
    mergekit_yaml_executable()
    if overwrite:
        clear_outputs(workdir)
    os.makedirs(workdir, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        report = _run_stages(workdir, settings, StageLog(echo=echo or log.info))
    finally:
        # a calling process (tests, notebooks) keeps its own setting
        torch.set_num_threads(threads_before)
    results = report["results"]
    output = echo or click.echo
    output("")
    output(format_table(results))
    output("")
    for line in report["fisher_vs_plain"]:
        output(line)
    output("")
    (echo or log.info)(f"all outputs in {workdir} ({report['timings_s']['total']:.0f}s)")
    if not all(math.isfinite(cell["loss"]) for row in results.values() for cell in row.values()):
        raise click.ClickException("some held-out losses are not finite; see results.json")
    return report


def _run_stages(workdir: str, settings: DemoSettings, log: StageLog) -> dict:
    from mergekit_fisher.demo.evaluate import evaluate_models
    from mergekit_fisher.demo.recipes import MERGE_METHODS
    from mergekit_fisher.demo.report import fisher_verdict, plot_chart, results_markdown

    started = time.perf_counter()
    with log.stage(
        1,
        5,
        f"pre-train a tiny Llama on {' + '.join(settings.domains)}, fine-tune one specialist each",
    ):
        built = build_models(workdir, settings, log)
    models = built["paths"]
    with log.stage(
        2,
        5,
        "mergekit-fisher compute: each specialist's Fisher and Gram on its own training text",
    ):
        fishers = compute_fishers(workdir, settings, models, log)
        grams = compute_grams(workdir, settings, models, log)
    with log.stage(3, 5, "mergekit-yaml: " + ", ".join(MERGE_METHODS)):
        recipes = write_recipes(workdir, settings, models, fishers, grams)
        merges = run_merges(workdir, settings, recipes, log)
    with log.stage(4, 5, "evaluate every model on every domain's held-out text"):
        labelled = {"base": models["base"]}
        labelled.update({f"{name} specialist": models[name] for name in settings.domains})
        labelled.update(merges)
        results = evaluate_models(
            labelled,
            built["heldout"],
            max_length=settings.max_length,
            batch_size=settings.batch_size,
            device=settings.device,
        )
    with log.stage(
        5, 5, "write results.json, results.md" + (", chart.png" if settings.plot else "")
    ):
        verdict = fisher_verdict(results)
        if settings.plot:
            plot_chart(
                results,
                os.path.join(workdir, "chart.png"),
                f"held-out loss per domain (seed {settings.seed})",
            )
        with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as fp:
            fp.write(results_markdown(workdir, settings, results, verdict))
    report = {
        "settings": asdict(settings),
        "results": results,
        "fisher_vs_plain": verdict,
        "train_loss_last": {name: values[-1] for name, values in built["losses"].items()},
        "models": models,
        "fishers": fishers,
        "grams": grams,
        "recipes": recipes,
        "merges": merges,
        "timings_s": dict(log.timings, total=round(time.perf_counter() - started, 2)),
    }
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as fp:
        json.dump(report, fp, indent=2)
    return report
