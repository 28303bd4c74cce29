"""`mergekit-fisher`: a thin command line over the three rooms.

Subcommands are imported only when invoked, so `mergekit-fisher --help` stays fast and a broken
optional dependency of one command cannot break the others.

Also the pieces every command shares: the logging setup (`configure_logging`, ``-v/--verbose`` and
``-q/--quiet`` through `verbosity_options`), `show_progress` for progress bars, and the click types
`EnumChoice` (a ``click.Choice`` over a `mergekit_fisher.choices` enum) and `CommaList`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from typing import Iterable, Optional, Type

import click

from mergekit_fisher import __version__

LOGGER_NAME = "mergekit_fisher"
log = logging.getLogger(LOGGER_NAME)

# name -> "module:attribute" of a click command; one visible place for the whole CLI
COMMANDS = {
    "compute": (
        "mergekit_fisher.estimator.cli:compute",
        "Estimate the diagonal Fisher of a model or LoRA adapter.",
    ),
    "merge": (
        "mergekit_fisher.merge.cli:merge",
        "Run a mergekit YAML recipe with the Fisher methods registered.",
    ),
    "inspect": (
        "mergekit_fisher.tools.inspect:inspect_command",
        "Summarise a Fisher file (and its coverage of a model).",
    ),
    "explain": (
        "mergekit_fisher.tools.explain:explain_command",
        "Dry-run a recipe: validate it and show each model's Fisher share.",
    ),
    "combine": (
        "mergekit_fisher.tools.combine:combine_command",
        "Combine Fisher files computed on different data shards.",
    ),
    "convert": (
        "mergekit_fisher.tools.convert:convert_command",
        "Convert Fisher/importance data from other tools to format v1.",
    ),
    "push": (
        "mergekit_fisher.tools.push:push_command",
        "Upload a Fisher (checked, with its model card) to the Hugging Face Hub.",
    ),
    "recipes": (
        "mergekit_fisher.tools.recipes:recipes_command",
        "List, print or write out the example recipes that ship with the package.",
    ),
    "eval": (
        "mergekit_fisher.demo.evaluate:eval_command",
        "Held-out loss / perplexity of models on text data.",
    ),
    "demo": (
        "mergekit_fisher.demo.cli:demo_command",
        "Build, compute Fisher, merge, evaluate and plot, end to end.",
    ),
}


# name -> the example shown at the end of that command's --help (kept here, beside COMMANDS, so
# every command has one and the README's commands can be checked against them in one place)
EXAMPLES = {
    "compute": "mergekit-fisher compute /models/llama-math /fisher/math --data math_train.jsonl",
    "inspect": "mergekit-fisher inspect /fisher/math --model /models/llama-math --by layer",
    "explain": "mergekit-fisher explain recipes/fisher_two_finetunes.yml --plot share.png",
    "combine": "mergekit-fisher combine /fisher/part0 /fisher/part1 /fisher/all",
    "convert": "mergekit-fisher convert scores.safetensors /fisher/math --model /models/llama-math",
    "push": "mergekit-fisher push /fisher/math my-org/llama-math-fisher",
    "recipes": "mergekit-fisher recipes fisher_two_finetunes --out recipes",
    "eval": "mergekit-fisher eval ./merged /models/llama-math --data math_test.jsonl --json",
    "demo": "mergekit-fisher demo fisher-demo --tiny",
}


def with_example(name: str, command: click.Command) -> click.Command:
    """`command` with its EXAMPLES line as the --help epilog (unless it shows one already)."""
    if name in EXAMPLES and not command.epilog and "Example" not in (command.help or ""):
        # \b: click keeps the block's line breaks instead of rewrapping it
        command.epilog = f"\b\nExample:\n  {EXAMPLES[name]}"
    return command


# ---------------------------------------------------------------- logging
class _ClickHandler(logging.Handler):
    """Records to stderr through `click.echo`, which looks the stream up at each call (so it follows
    click's test runner and any redirection made after the setup)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # never let a log line break the command
            self.handleError(record)


class _Formatter(logging.Formatter):
    """Info lines as they are (they are the commands' status lines); others prefixed by their
    level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


def configure_logging(level: int = logging.INFO) -> None:
    """The one logging setup of the command line: the package's logger ("mergekit_fisher") at
    `level` (DEBUG with -v, WARNING with -q, INFO by default), to stderr. Idempotent; the root
    logger and other libraries' loggers are left alone (mergekit-yaml configures its own under
    `merge`)."""
    handler = next((h for h in log.handlers if isinstance(h, _ClickHandler)), None)
    if handler is None:
        handler = _ClickHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def show_progress() -> bool:
    """Progress bars are shown unless -q asked for warnings only."""
    return log.getEffectiveLevel() <= logging.INFO


_FLAGS_KEY = "mergekit_fisher.verbosity"


def _remember_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.meta.setdefault(_FLAGS_KEY, {})[param.name] = value


def _level(verbose: bool, quiet: bool) -> int:
    if verbose and quiet:
        raise click.UsageError("-v/--verbose and -q/--quiet exclude each other")
    return logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO


def verbosity_options(command):
    """``-v/--verbose`` (debug messages, and the traceback of an error) and ``-q/--quiet`` (warnings
    only, no progress bars) on a command, so that they work after the subcommand name too.

    Given here they override the group's; not given, the group's setting stands (a command invoked
    on its own, without `main`, gets the default). Applied once all options are parsed, so a bad
    option value is refused before anything else happens.
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        ctx = click.get_current_context()
        given = ctx.meta.get(_FLAGS_KEY, {})
        verbose, quiet = given.get("verbose", False), given.get("quiet", False)
        if verbose or quiet or ctx.parent is None or not log.handlers:
            configure_logging(_level(verbose, quiet))
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            log_traceback()
            raise

    flags = [
        click.Option(
            ["-v", "--verbose"],
            is_flag=True,
            expose_value=False,
            callback=_remember_flag,
            help="Debug messages, and the traceback of an error.",
        ),
        click.Option(
            ["-q", "--quiet"],
            is_flag=True,
            expose_value=False,
            callback=_remember_flag,
            help="Only warnings and errors; no progress bars.",
        ),
    ]
    # click reverses the decorators' list: put first, they are listed last in --help
    run.__click_params__ = flags[::-1] + list(getattr(command, "__click_params__", []))
    return run


def log_traceback() -> None:
    """With -v, the traceback of the error being handled (click itself prints only its one `Error:`
    line)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("traceback of the error below:", exc_info=True)


# ---------------------------------------------------------------- click types
class EnumChoice(click.Choice):
    """``click.Choice`` over a `StrChoice` enum, matched on the members' values (click's own enum
    support matches names: ``CAUSAL_LM`` instead of ``causal-lm``); converts to the member."""

    def __init__(
        self, enum_type: Type, members: Optional[Iterable] = None, case_sensitive: bool = True
    ):
        self.enum_type = enum_type
        super().__init__(
            [enum_type(m).value for m in (members if members is not None else enum_type)],
            case_sensitive=case_sensitive,
        )

    def convert(self, value, param, ctx):
        if isinstance(value, self.enum_type) and value.value in self.choices:
            return value
        return self.enum_type(super().convert(value, param, ctx))


class CommaList(click.ParamType):
    """One or more `item_type` values separated by commas. Used with ``multiple=True`` and
    ``callback=flatten``: ``--x a,b --x c`` and ``--x a --x b --x c`` both give ``(a, b, c)``."""

    def __init__(self, item_type):
        self.item_type = click.types.convert_type(item_type)
        self.name = f"{self.item_type.name}[,...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",")]
        if not all(parts):
            self.fail(f"{value!r} has an empty item", param, ctx)
        return tuple(self.item_type.convert(part, param, ctx) for part in parts)

    def get_metavar(self, param, ctx=None):
        inner = self.item_type.get_metavar(param, ctx) if ctx is not None else None
        return f"{inner or self.item_type.name.upper()}[,...]"


def flatten(_ctx, _param, value):
    """The `callback` of a ``multiple=True`` `CommaList` option."""
    return tuple(item for group in value for item in group)


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN (which compares false with every bound) and
    +-inf."""

    def convert(self, value, param, ctx):
        converted = super().convert(value, param, ctx)
        if not math.isfinite(converted):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return converted


# ---------------------------------------------------------------- the group
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
        return with_example(name, getattr(module, attribute))

    def format_commands(self, ctx, formatter):
        # Help text without importing every command module (torch, transformers, ...).
        rows = [(name, help_text) for name, (_target, help_text) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mergekit-fisher")
@click.option(
    "-v", "--verbose", is_flag=True, help="Debug messages, and the traceback of an error."
)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors; no progress bars.")
def main(verbose: bool, quiet: bool):
    """Fisher-weighted model merging for mergekit.

    -v/-q work before or after the command name (`merge` passes its own options to mergekit-yaml:
    there, give them before `merge`).
    """
    configure_logging(_level(verbose, quiet))


if __name__ == "__main__":
    main()
