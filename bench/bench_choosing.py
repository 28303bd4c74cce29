"""Held-out loss of `fisher` and `fisher_ties` as each merge parameter varies, on the demo's models.

For each seed it builds the demo's models (the demo's stage 1: a tiny Llama pre-trained on two
domains, one fine-tuned specialist per domain), then varies one parameter at a time around
the defaults (sampled Fisher, 128 examples, `fisher_normalize: mean`, `fisher_floor: 1e-6`, density
0.7 for `fisher_ties`):

* the number of Fisher examples (`compute --num-examples`),
* the Fisher type (`compute --fisher-type sampled | empirical`),
* `fisher_normalize`, `fisher_floor`,
* `density` (`fisher_ties`, and plain `ties` beside it).

Fishers come from `mergekit-fisher compute` and merges from `mergekit-yaml`, both run through their
own entry points in this process (the demo's `--in-process`); each merge is scored with the demo's
held-out evaluation (mean over domains of the token-weighted loss, nats/token) and deleted. Writes
WORKDIR/choosing.json, choosing.md (the tables) and choosing.png.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_choosing.py [--workdir bench/out/choosing]
        [--seeds 0,1] [--examples 8,32,128,512] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mergekit_fisher.demo.evaluate import evaluate_models, mean_loss  # noqa: E402
from mergekit_fisher.demo.pipeline import (  # noqa: E402
    DemoSettings,
    StageLog,
    build_models,
    compute_fishers,
    run_in_process,
    tiny_settings,
)
from mergekit_fisher.demo.recipes import recipe_for  # noqa: E402

DEFAULTS = {"examples": 128, "fisher_type": "sampled", "normalize": "mean", "floor": 1e-6}
DENSITY = 0.7
NORMALIZATIONS = ("mean", "l2", "tensor", "none")
FLOORS = (0.0, 1e-6, 1e-3, 1e-1, 1.0)
DENSITIES = (0.3, 0.5, 0.7, 0.9, 1.0)
TYPES = ("sampled", "empirical")


class Seed:
    """One seed's models, Fishers (cached by type and count) and scored merges."""

    def __init__(self, workdir: str, settings: DemoSettings):
        self.workdir, self.settings = workdir, settings
        self.log = StageLog(echo=lambda line: None)
        built = build_models(workdir, settings, self.log)
        self.models, self.heldout = built["paths"], built["heldout"]
        self.fishers = {}

    def fisher(self, fisher_type: str, examples: int) -> dict:
        key = (fisher_type, examples)
        if key not in self.fishers:
            folder = os.path.join(self.workdir, f"fisher-{fisher_type}-{examples}")
            settings = replace(self.settings, fisher_type=fisher_type, fisher_examples=examples)
            paths = compute_fishers(self.workdir, settings, self.models, self.log, folder)
            self.fishers[key] = paths
        return self.fishers[key]

    def score(self, method: str, fishers=None, density=DENSITY, normalize="mean", floor=1e-6):
        specialists = {name: self.models[name] for name in self.settings.domains}
        recipe = recipe_for(
            method,
            base=self.models["base"],
            specialists=specialists,
            fishers=fishers or {},
            density=density,
            fisher_normalize=normalize,
            fisher_floor=floor,
        )
        path = os.path.join(self.workdir, "recipe.yml")
        with open(path, "w", encoding="utf-8") as fp:
            yaml.safe_dump(recipe, fp, sort_keys=False)
        out = os.path.join(self.workdir, "merged")
        shutil.rmtree(out, ignore_errors=True)
        seed = str(self.settings.seed)
        run_in_process(method, ["mergekit-yaml", path, out, "--random-seed", seed, "--quiet"])
        results = evaluate_models(
            {method: out},
            self.heldout,
            max_length=self.settings.max_length,
            batch_size=self.settings.batch_size,
            progress=False,
        )
        shutil.rmtree(out)
        return mean_loss(results[method])

    def singles(self) -> dict:
        labelled = {name: self.models[name] for name in ("base", *self.settings.domains)}
        results = evaluate_models(
            labelled,
            self.heldout,
            max_length=self.settings.max_length,
            batch_size=self.settings.batch_size,
            progress=False,
        )
        return {label: mean_loss(row) for label, row in results.items()}


def sweep(run: Seed, examples) -> dict:
    """{factor: {value: {method: mean loss}}}, one factor varied at a time."""
    default = run.fisher(DEFAULTS["fisher_type"], DEFAULTS["examples"])
    out = {"examples": {}, "fisher_type": {}, "normalize": {}, "floor": {}, "density": {}}
    for count in examples:
        fishers = run.fisher("sampled", count)
        out["examples"][count] = {m: run.score(m, fishers) for m in ("fisher", "fisher_ties")}
    for fisher_type in TYPES:
        fishers = run.fisher(fisher_type, DEFAULTS["examples"])
        out["fisher_type"][fisher_type] = {
            m: run.score(m, fishers) for m in ("fisher", "fisher_ties")
        }
    for normalize in NORMALIZATIONS:
        out["normalize"][normalize] = {
            m: run.score(m, default, normalize=normalize) for m in ("fisher", "fisher_ties")
        }
    for floor in FLOORS:
        out["floor"][floor] = {
            m: run.score(m, default, floor=floor) for m in ("fisher", "fisher_ties")
        }
    for density in DENSITIES:
        out["density"][density] = {
            "fisher_ties": run.score("fisher_ties", default, density=density),
            "ties": run.score("ties", density=density),
        }
    out["baselines"] = {
        **run.singles(),
        "linear": run.score("linear"),
        "ties (density 0.7)": run.score("ties"),
    }
    return out


def combine(per_seed: list) -> dict:
    """Mean and (max - min) over seeds, cell by cell."""

    def merge(values):
        if isinstance(values[0], dict):
            return {key: merge([v[key] for v in values]) for key in values[0]}
        return {"mean": statistics.fmean(values), "range": max(values) - min(values)}

    return merge(per_seed)


def markdown(summary: dict, seeds) -> str:
    def cell(stat):
        return f"{stat['mean']:.3f} ± {stat['range'] / 2:.3f}"

    lines = [
        f"Held-out loss (nats/token, mean over the two domains; mean ± half-range over seeds "
        f"{', '.join(map(str, seeds))}); lower is better.",
        "",
        "| baseline | loss |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {cell(stat)} |" for name, stat in summary["baselines"].items()]
    titles = {
        "examples": "Fisher examples (sampled)",
        "fisher_type": "Fisher type (128 examples)",
        "normalize": "fisher_normalize",
        "floor": "fisher_floor",
        "density": "density",
    }
    for factor, title in titles.items():
        rows = summary[factor]
        methods = list(next(iter(rows.values())))
        lines += ["", f"| {title} | " + " | ".join(methods) + " |"]
        lines.append("|---|" + "---:|" * len(methods))
        for value, cells in rows.items():
            lines.append(f"| {value} | " + " | ".join(cell(cells[m]) for m in methods) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = ["examples", "fisher_type", "normalize", "floor", "density"]
    colours = {"fisher": "C0", "fisher_ties": "C1", "ties": "C2"}
    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.6), sharey=True)
    baselines = summary["baselines"]
    for ax, factor in zip(axes, factors):
        rows = summary[factor]
        labels = [str(v) for v in rows]
        for method in next(iter(rows.values())):
            means = [rows[v][method]["mean"] for v in rows]
            errors = [rows[v][method]["range"] / 2 for v in rows]
            ax.errorbar(
                range(len(labels)),
                means,
                yerr=errors,
                marker="o",
                label=method,
                color=colours[method],
            )
        for name, style in (("linear", ":"), ("ties (density 0.7)", "--")):
            ax.axhline(baselines[name]["mean"], color="grey", linestyle=style, label=name)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_title(factor, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats/token)")
    axes[0].legend(fontsize=7)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "choosing"))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--examples", default="8,32,128,512")
    parser.add_argument("--tiny", action="store_true", help="the demo's --tiny sizes (a smoke run)")
    parser.add_argument("--replot", action="store_true", help="redraw WORKDIR/choosing.png only")
    args = parser.parse_args()
    if args.replot:
        with open(os.path.join(args.workdir, "choosing.json"), encoding="utf-8") as fp:
            plot(json.load(fp)["summary"], os.path.join(args.workdir, "choosing.png"))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    examples = [int(n) for n in args.examples.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # as the demo: tiny models gain nothing from intra-op threads
    per_seed = []
    started = time.perf_counter()
    for seed in seeds:
        base = tiny_settings(seed=seed) if args.tiny else DemoSettings(seed=seed)
        settings = replace(base, in_process=True)
        folder = os.path.join(args.workdir, f"seed{seed}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        seed_started = time.perf_counter()
        per_seed.append(sweep(Seed(folder, settings), examples))
        print(f"seed {seed}: {time.perf_counter() - seed_started:.0f}s", file=sys.stderr)
    summary = combine(per_seed)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "choosing.json"), "w", encoding="utf-8") as fp:
        json.dump({"seeds": seeds, "per_seed": per_seed, "summary": summary}, fp, indent=2)
    table = markdown(summary, seeds)
    with open(os.path.join(args.workdir, "choosing.md"), "w", encoding="utf-8") as fp:
        fp.write(table)
    plot(summary, os.path.join(args.workdir, "choosing.png"))
    print(table)
    print(f"total {time.perf_counter() - started:.0f}s; outputs in {args.workdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
