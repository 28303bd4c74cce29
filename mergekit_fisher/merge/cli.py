"""`mergekit-fisher merge RECIPE OUT [mergekit options]`: mergekit-yaml with the Fisher methods
registered.

For environments that skip `.pth` start-up files (some embedded or frozen Pythons, `python -S`);
every option after RECIPE and OUT is mergekit-yaml's own.
"""

from __future__ import annotations

import click

EXAMPLE = "mergekit-fisher merge recipes/fisher_two_finetunes.yml ./merged --cuda"


@click.command(
    "merge",
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
@click.pass_context
def merge(ctx: click.Context) -> None:
    """Run a mergekit YAML recipe (mergekit-yaml's arguments and options)."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_fisher.merge.registry import ensure_registered

    ensure_registered()
    args = list(ctx.args)
    # mergekit-yaml knows only --help; -h is every other mergekit-fisher command's help flag
    if "-h" in args or "--help" in args:
        args = [arg for arg in args if arg not in ("-h", "--help")] + ["--help"]
        click.echo(
            "mergekit-fisher merge: mergekit-yaml with the Fisher methods registered.\n\n"
            f"Example:\n  {EXAMPLE}\n\nmergekit-yaml's arguments and options:\n"
        )
    mergekit_yaml.main(args=args, prog_name="mergekit-fisher merge", standalone_mode=True)
