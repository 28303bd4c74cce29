"""`mergekit-fisher convert IN OUT --model MODEL`: Fisher/importance data from other tools -> format
v1.

IN is a ``torch.save``d flat dict of tensors (loaded with ``weights_only=True`` only: no code runs),
a ``.safetensors`` file, or a directory of either. Names are mapped onto MODEL's checkpoint names
(see `names`), shapes checked against the checkpoint headers, values required finite and >= 0.
Every check runs before anything is written; the output is written atomically by `write_fisher`.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import warnings
from typing import Callable, Dict, List, Optional

import click
import torch
from safetensors import safe_open

from mergekit_fisher.choices import FisherType, Space
from mergekit_fisher.cli import EnumChoice, verbosity_options
from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.fisher_file import (
    FisherConfig,
    check_output_free,
    parse_shard_size,
    write_fisher,
)
from mergekit_fisher.fisher_file.config import CONFIG_FILENAME, HEADER_CONFIG_KEY
from mergekit_fisher.fisher_file.paths import check_regular_file
from mergekit_fisher.fisher_file.provenance import (
    compare_identity,
    describe,
    identity_of,
    model_identity,
)
from mergekit_fisher.fisher_file.writer import estimated_size, output_lock
from mergekit_fisher.tools.checkpoint import checkpoint_shapes
from mergekit_fisher.tools.names import match_names

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SHOW = 10  # names listed per category in the report
# provenance kept when IN is a Fisher file of another naming scheme (options override it)
log = logging.getLogger(__name__)
CARRIED = (
    "fisher_type",
    "task",
    "num_examples",
    "num_tokens",
    "dataset",
    "dataset_hash",
    "samples_per_example",
    "seed",
)


def _why_not_loaded(error: Exception) -> str:
    """What made torch.load(weights_only=True) stop, in our words. Its own message advises retrying
    with weights_only=False -- exactly what must not be done with an untrusted file -- so it is
    never repeated."""
    text = str(error)
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if match:
        return f"it holds a pickled Python object ({match.group(1)}), not only tensors"
    match = re.search(r"Unsupported operand (\d+)", text)
    if match:
        return (
            "its pickle uses an instruction a dict of tensors does not need (opcode "
            f"{match.group(1)})"
        )
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "its pickle holds something other than a dict of tensors"
    lines = [
        line.strip()
        for line in text.strip().splitlines()
        if line.strip() and "weights_only" not in line
    ]
    return f"it is not a torch.save file ({error.__class__.__name__}: {lines[0] if lines else ''})"


def _load_torch(path: str) -> Dict[str, torch.Tensor]:
    try:
        with (
            warnings.catch_warnings()
        ):  # torch's "pickle protocol 4" warning: noise above our one line
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except (
        Exception
    ) as error:  # UnpicklingError (disallowed globals), RuntimeError/KeyError (not a torch file)
        raise FisherInputError(
            f"refusing it: {_why_not_loaded(error)}. By design, convert reads a torch.save file "
            "only as a plain dict of tensors (torch.load with weights_only=True) and never "
            "unpickles anything else: unpickling can run arbitrary code",
            file=path,
            kind="input file",
            fix="export the tensors as a .safetensors file, or as a plain dict "
            "(`torch.save({name: tensor}, path)`), with the tool that made it",
        ) from None
    if not isinstance(obj, dict):
        raise FisherInputError(
            f"expected a dict of tensors, found a {type(obj).__name__}",
            file=path,
            fix="save a flat dict {checkpoint name: tensor}",
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            hint = ""
            if isinstance(value, dict):
                hint = f" (a nested dict: save obj[{key!r}] itself)"
            raise FisherInputError(
                f"not a flat dict of tensors: entry {key!r} is a {type(value).__name__}{hint}",
                file=path,
                fix="save a flat dict {checkpoint name: tensor}",
            )
    return obj


class Source:
    """Tensor names of IN, and a loader for one tensor at a time (safetensors stay lazy)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.loaders: Dict[str, Callable[[], torch.Tensor]] = {}
        self.provenance: Dict[
            str, object
        ] = {}  # carried over when IN is itself a mergekit-fisher file
        self.identity: Dict[
            str, object
        ] = {}  # the model IN records, when it is a mergekit-fisher file
        self.formats: Dict[str, str] = {}  # file -> "safetensors" | "torch.save"
        self.recorded_format: Optional[str] = None  # "mergekit-fisher v1" when IN is one
        if not os.path.exists(self.path):
            raise FisherInputError("input does not exist", file=self.path, fix="check the IN path")
        files = (
            [os.path.join(self.path, f) for f in sorted(os.listdir(self.path))]
            if os.path.isdir(self.path)
            else [self.path]
        )
        files = [
            f for f in files if f.endswith(".safetensors") or f.lower().endswith(TORCH_SUFFIXES)
        ]
        if not files:
            raise FisherInputError(
                "no .safetensors or torch.save (.pt/.pth/.bin/.ckpt) file found",
                file=self.path,
                fix="point IN at the file (or directory of files) holding the Fisher tensors",
            )
        for file in files:
            check_regular_file(
                file, kind="input file", fix="point IN at regular files (not a FIFO or device)"
            )
        for file in files:
            self._add(file)
        config_path = os.path.join(self.path, CONFIG_FILENAME)
        if os.path.isdir(self.path) and os.path.lexists(config_path):
            try:
                check_regular_file(config_path, kind="input file", fix="")
                with open(config_path, encoding="utf-8") as fp:
                    self._remember(fp.read())
            except (FisherInputError, OSError, UnicodeDecodeError) as error:
                log.warning(
                    "ignoring %s, which cannot be read (%s): no provenance carried over",
                    config_path,
                    getattr(error, "problem", None) or error.__class__.__name__,
                )

    def _remember(self, text: str) -> None:
        try:
            config = FisherConfig.model_validate_json(text)
        except ValueError:
            return  # provenance is a courtesy here; the tensors are what is converted
        self.provenance = {k: getattr(config, k) for k in CARRIED if getattr(config, k) is not None}
        self.identity = identity_of(config)
        self.recorded_format = f"{config.format} v{config.format_version}"

    def origin(self) -> Dict[str, object]:
        """What `convert` was given: recorded in the output's config (`origin`)."""
        formats = sorted(set(self.formats.values()))
        origin: Dict[str, object] = {
            "path": self.path,
            "format": self.recorded_format or " + ".join(formats),
            "files": [
                os.path.relpath(f, self.path) if f != self.path else os.path.basename(f)
                for f in sorted(self.formats)
            ],
        }
        if self.identity.get("model"):
            origin["model"] = self.identity["model"]
            if self.identity.get("model_fingerprint"):
                origin["model_fingerprint"] = self.identity["model_fingerprint"]
        return origin

    def _add(self, file: str) -> None:
        if file.endswith(".safetensors"):
            try:
                with safe_open(file, framework="pt", device="cpu") as handle:
                    names = list(handle.keys())
                    metadata = handle.metadata() or {}
                if HEADER_CONFIG_KEY in metadata:
                    self._remember(metadata[HEADER_CONFIG_KEY])
            except Exception as error:
                raise FisherInputError(
                    f"not a valid safetensors file ({error})",
                    file=file,
                    kind="input file",
                    fix="re-download or re-export it",
                ) from None
            loaders = {name: (lambda f=file, n=name: _safetensors_tensor(f, n)) for name in names}
            self.formats[file] = "safetensors"
        else:
            tensors = _load_torch(file)
            self.formats[file] = "torch.save"
            loaders = {name: (lambda t=tensor: t) for name, tensor in tensors.items()}
        for name, loader in loaders.items():
            if name in self.loaders:
                raise FisherInputError(
                    "the same tensor name appears in two input files",
                    file=file,
                    kind="input file",
                    tensor=name,
                    fix="convert the files separately, or remove the duplicate",
                )
            self.loaders[name] = loader

    def names(self) -> List[str]:
        return list(self.loaders)

    def get(self, name: str) -> torch.Tensor:
        return self.loaders[name]()


def _safetensors_tensor(file: str, name: str) -> torch.Tensor:
    with safe_open(file, framework="pt", device="cpu") as handle:
        return handle.get_tensor(name)


def _checked(
    values: torch.Tensor, source: str, target: str, shape: tuple, path: str
) -> torch.Tensor:
    where = source if source == target else f"{source} (-> {target})"
    if not values.is_floating_point():
        raise FisherInputError(
            f"dtype {values.dtype} is not floating point",
            file=path,
            tensor=where,
            fix=(
                "Fisher values are floats (mean squared gradients); convert only importance tensors"
            ),
        )
    if tuple(values.shape) != tuple(shape):
        transposed = tuple(values.shape) == tuple(reversed(shape)) and len(shape) == 2
        raise FisherInputError(
            f"shape {tuple(values.shape)} does not match the model's {tuple(shape)}"
            + (" (transposed?)" if transposed else ""),
            file=path,
            tensor=where,
            fix="convert a Fisher computed for this very model"
            + (", transposing it first" if transposed else ""),
        )
    values = values.to(torch.float32)
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        raise FisherInputError(
            f"{int((~finite).sum())} non-finite (NaN/Inf) value(s)",
            file=path,
            tensor=where,
            fix="recompute the Fisher; NaN/Inf usually come from diverged gradients",
        )
    if values.numel() and float(values.min()) < 0:
        raise FisherInputError(
            f"{int((values < 0).sum())} negative value(s)",
            file=path,
            tensor=where,
            fix=(
                "these are not squared gradients: a diagonal Fisher is a mean of squares and "
                "cannot be negative"
            ),
        )
    return values


def _listing(title: str, items: List[str]) -> List[str]:
    lines = [f"  {title}: {len(items)}"]
    lines += [f"    {item}" for item in items[:SHOW]]
    if len(items) > SHOW:
        lines.append(f"    ... and {len(items) - SHOW} more")
    return lines


def convert(
    source_path: str,
    out: str,
    model: str,
    *,
    overwrite: bool = False,
    num_examples: Optional[int] = None,
    fisher_type: Optional[str] = None,
    max_shard_size="5GB",
) -> List[str]:
    """Convert; returns the report lines. Raises FisherInputError (nothing written) on any
    problem."""
    out_abs = os.path.abspath(out)
    parse_shard_size(max_shard_size)  # a bad --max-shard-size fails before any work
    check_output_free(
        out_abs, overwrite, inputs=(source_path, model)
    )  # never IN or MODEL: before any read
    model_shapes = checkpoint_shapes(model)
    source = Source(source_path)
    match = match_names(source.names(), model_shapes)
    collision = match.collision()
    if collision:
        first, second, target = collision
        raise FisherInputError(
            f"both {first!r} and {second!r} map onto this model tensor",
            file=source.path,
            tensor=target,
            fix="keep one of them in the input",
        )
    if not match.mapping:
        examples = ", ".join(source.names()[:3]) or "(no tensors)"
        raise FisherInputError(
            f"none of the {len(source.names())} input tensors matches a tensor of the model (e.g. "
            f"{examples})",
            file=source.path,
            model=model,
            fix=(
                "check that IN was computed for this model; names must be the checkpoint's "
                "(wrappers such as `module.`, `base_model.model.`, `_orig_mod.` are stripped "
                "automatically)"
            ),
        )
    identity = model_identity(model)
    if source.identity.get("model"):
        differs = compare_identity(source.identity, identity)
        if differs is not None:
            log.warning(
                "%s records %s, but is converted for %s (the %s differ); check that --model is the "
                "model it was computed for",
                source.path,
                describe(source.identity),
                describe(identity),
                differs,
            )
    needed = estimated_size(
        sum(math.prod(model_shapes[target]) for target in match.mapping.values())
    )
    with output_lock(out_abs):
        check_output_free(out_abs, overwrite, inputs=(source_path, model), needed_bytes=needed)
        tensors = {}
        for name, target in match.mapping.items():
            tensors[target] = _checked(
                source.get(name), name, target, model_shapes[target], source.path
            )
        overrides = {"fisher_type": fisher_type, "num_examples": num_examples}
        config = FisherConfig(
            **{**source.provenance, **{k: v for k, v in overrides.items() if v is not None}},
            **{key: value for key, value in identity.items() if value is not None},
            space=Space.DENSE,
            converted_from=source.path,
            origin=source.origin(),
            renamed=match.renamed or None,
        )
        write_fisher(tensors, out_abs, config, max_shard_size=max_shard_size, overwrite=overwrite)
    uncovered = [name for name in model_shapes if name not in tensors]
    lines = [
        f"converted {source.path} -> {out_abs}",
        f"  matched: {len(match.mapping)} of {len(source.names())} input tensors "
        f"({len(match.renamed)} renamed); model tensors covered: {len(tensors)} of "
        f"{len(model_shapes)}",
    ]
    lines += _listing("renamed", [f"{s} -> {t}" for s, t in match.renamed.items()])
    lines += _listing(
        "unmatched input tensors (not written)",
        [
            name
            + (
                f" (ambiguous: {', '.join(match.ambiguous[name])})"
                if name in match.ambiguous
                else ""
            )
            for name in match.unmatched
        ],
    )
    lines += _listing("model tensors without a Fisher", uncovered)
    return lines


@click.command("convert")
@verbosity_options
@click.argument("source", metavar="IN", type=click.Path())
@click.argument("out", type=click.Path())
@click.option(
    "--model",
    required=True,
    type=click.Path(),
    help="Model checkpoint (directory or .safetensors) the Fisher belongs to.",
)
@click.option(
    "--num-examples",
    type=click.IntRange(min=1),
    default=None,
    help="Examples the Fisher was computed on (for combine).",
)
@click.option(
    "--fisher-type",
    type=EnumChoice(FisherType),
    default=None,
    help="How the source tool computed it, recorded in the provenance.",
)
@click.option(
    "--max-shard-size", default="5GB", show_default=True, help="Shard size of a directory output."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (never IN or MODEL).")
def convert_command(
    source, out, model, num_examples, fisher_type, max_shard_size, overwrite
) -> None:
    """Convert Fisher/importance tensors IN (torch.save dict, .safetensors, or a directory) to
    format v1 at OUT."""
    lines = convert(
        source,
        out,
        model,
        overwrite=overwrite,
        num_examples=num_examples,
        fisher_type=fisher_type,
        max_shard_size=max_shard_size,
    )
    click.echo("\n".join(lines))
