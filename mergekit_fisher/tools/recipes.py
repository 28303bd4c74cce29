"""`mergekit-fisher recipes [NAME] [--out DIR]`: the example recipes that ship with the package.

They are package data (`mergekit_fisher/recipes/*.yml`), so a `pip install` user can start from them
without a clone: list them, print one, or write one out to edit its paths.
"""

from __future__ import annotations

import logging
import os
from importlib import resources
from typing import Dict, Optional

import click

from mergekit_fisher.cli import verbosity_options
from mergekit_fisher.errors import FisherInputError

log = logging.getLogger(__name__)


def shipped_recipes() -> Dict[str, str]:
    """name (file stem) -> YAML text, for every recipe in the package."""
    folder = resources.files("mergekit_fisher") / "recipes"
    return {
        entry.name[: -len(".yml")]: entry.read_text(encoding="utf-8")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".yml")
    }


def _summary(text: str) -> str:
    first = next((line for line in text.splitlines() if line.startswith("#")), "")
    return first.lstrip("# ").strip()


@click.command("recipes")
@verbosity_options
@click.argument("name", required=False)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write the recipe (or, without NAME, every recipe) into this directory.",
)
def recipes_command(name: Optional[str], out_dir: Optional[str]) -> None:
    """List the example recipes, print NAME, or write it to --out DIR.

    \b
    Examples:
      mergekit-fisher recipes
      mergekit-fisher recipes fisher_ties > my_recipe.yml
      mergekit-fisher recipes fisher_ties --out ./recipes
    """
    available = shipped_recipes()
    stem = name[: -len(".yml")] if name and name.endswith(".yml") else name
    if stem is not None and stem not in available:
        raise FisherInputError(
            f"no shipped recipe named {name!r}",
            kind="recipe",
            fix=f"choose one of {', '.join(available)}",
        )
    chosen = {stem: available[stem]} if stem else available
    if out_dir is None:
        if stem:
            click.echo(available[stem], nl=False)
        else:
            for key, text in available.items():
                click.echo(f"{key:<28} {_summary(text)}")
        return
    os.makedirs(out_dir, exist_ok=True)
    for key in chosen:
        target = os.path.join(out_dir, f"{key}.yml")
        if os.path.exists(target):
            raise FisherInputError(
                "already exists",
                file=target,
                kind="output",
                fix="choose another --out directory or remove the file",
            )
    for key, text in chosen.items():
        with open(os.path.join(out_dir, f"{key}.yml"), "w", encoding="utf-8") as fp:
            fp.write(text)
        log.info("wrote %s", os.path.join(out_dir, f"{key}.yml"))
