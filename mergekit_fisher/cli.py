"""`mergekit-fisher`: a thin command line over the three rooms.

Subcommands are imported only when invoked, so `mergekit-fisher --help` stays fast and a broken
optional dependency of one command cannot break the others.
"""

from __future__ import annotations

import importlib

import click

from mergekit_fisher import __version__

# name -> "module:attribute" of a click command; one visible place for the whole CLI
COMMANDS = {
    "compute": ("mergekit_fisher.estimator.cli:compute", "Estimate the diagonal Fisher of a model or LoRA adapter."),
    "merge": ("mergekit_fisher.merge.cli:merge", "Run a mergekit YAML recipe with the Fisher methods registered."),
    "inspect": ("mergekit_fisher.tools.inspect:inspect_command", "Summarise a Fisher file (and its coverage of a model)."),
    "explain": ("mergekit_fisher.tools.explain:explain_command", "Dry-run a recipe: validate it and show each model's Fisher share."),
    "combine": ("mergekit_fisher.tools.combine:combine_command", "Combine Fisher files computed on different data shards."),
    "convert": ("mergekit_fisher.tools.convert:convert_command", "Convert Fisher/importance data from other tools to format v1."),
    "eval": ("mergekit_fisher.demo.evaluate:eval_command", "Held-out loss / perplexity of models on text data."),
    "demo": ("mergekit_fisher.demo.cli:demo_command", "Build, compute Fisher, merge, evaluate and plot, end to end."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        target, _help = COMMANDS[name]
        module_name, attribute = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and error.name.startswith("mergekit_fisher"):
                return None  # command not available in this build
            raise
        return getattr(module, attribute)

    def format_commands(self, ctx, formatter):
        # Help text without importing every command module (torch, transformers, ...).
        rows = [(name, help_text) for name, (_target, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-fisher")
def main():
    """Fisher-weighted model merging for mergekit."""


if __name__ == "__main__":
    main()
