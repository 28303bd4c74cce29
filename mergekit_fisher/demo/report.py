"""What the demo writes at the end: the verdict lines, results.md and the bar chart."""

from __future__ import annotations

import os
from typing import List

from mergekit_fisher.demo.evaluate import format_table, mean_loss
from mergekit_fisher.demo.recipes import FISHER_TWIN


def plot_chart(results: dict, path: str, title: str) -> str:
    # a bare Figure (no pyplot): no global backend switch in the caller's process
    from matplotlib.figure import Figure

    models = list(results)
    columns = list(next(iter(results.values()))) + ["mean"]
    values = {
        column: [
            results[m][column]["loss"] if column != "mean" else mean_loss(results[m])
            for m in models
        ]
        for column in columns
    }
    width = 0.8 / len(columns)
    figure = Figure(figsize=(max(8, 1.3 * len(models)), 4.5))
    axes = figure.subplots()
    for index, column in enumerate(columns):
        positions = [m + (index - (len(columns) - 1) / 2) * width for m in range(len(models))]
        bars = axes.bar(positions, values[column], width, label=column)
        if column == "mean":
            axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    low = min(min(v) for v in values.values())
    high = max(max(v) for v in values.values())
    axes.set_ylim(max(0.0, low - 0.15 * (high - low) - 0.05), high + 0.1 * (high - low) + 0.05)
    axes.set_xticks(range(len(models)))
    axes.set_xticklabels(models, rotation=20, ha="right")
    axes.set_ylabel("held-out loss (nats/token, lower is better)")
    axes.set_title(title)
    axes.legend(title="domain")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def fisher_verdict(results: dict) -> List[str]:
    """One line per Fisher method: its mean loss against its plain twin's (lower is better)."""
    lines = []
    for method, twin in FISHER_TWIN.items():
        if method in results and twin in results:
            ours, theirs = mean_loss(results[method]), mean_loss(results[twin])
            word = "beats" if ours < theirs else "does not beat"
            lines.append(
                f"{method} {word} {twin}: mean loss {ours:.3f} vs {theirs:.3f} "
                f"({ours - theirs:+.3f})"
            )
    return lines


def results_markdown(workdir: str, settings, results: dict, verdict: List[str]) -> str:
    domains = list(settings.domains)
    heldout = " ".join(
        f"--data {os.path.join(workdir, 'data', f'{name}.heldout.jsonl')}" for name in domains
    )
    return "\n".join(
        [
            "Held-out loss in nats/token (perplexity), lower is better; "
            f"{settings.heldout_examples} held-out "
            f"examples per domain, seed {settings.seed}.",
            "",
            format_table(results, markdown=True),
            "",
            *[f"- {line}" for line in verdict],
            "",
            "Rerun one step by hand:",
            "",
            "```",
            f"mergekit-yaml {os.path.join(workdir, 'recipes', 'fisher.yml')} OUT_DIR",
            f"mergekit-fisher eval OUT_DIR {heldout} --max-length {settings.max_length}",
            "```",
            "",
        ]
    )
