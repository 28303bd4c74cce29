"""The merged model's card: which Fisher method, which papers, which Fisher files.

mergekit's card names the method through its spec's one reference URL, so a `fisher_ties` merge
would cite TIES only. `with_fisher_section` (installed around mergekit's `generate_card` by
`registry.patch_merge_entry`) appends a section that cites Matena & Raffel for every Fisher method,
plus the base method's paper, and lists each model's Fisher file (path or Hub id with the commit it
resolved to, Fisher type, examples) and the Fisher parameters.
"""

from __future__ import annotations

from typing import Iterator, List, Tuple

from mergekit.config import MergeConfiguration
from mergekit.merge_methods import registry as mergekit_registry
from mergekit.merge_methods.base import ParameterScope

from mergekit_fisher.hub import origin_of, resolve_fisher_path
from mergekit_fisher.merge.methods import PAPER_URL, FisherTaskArithmeticMerge, is_fisher_method
from mergekit_fisher.merge.parameters import FISHER, fisher_parameter_specs

PAPER = (
    f"[Merging Models with Fisher-Weighted Averaging]({PAPER_URL}) (Matena & Raffel, NeurIPS 2022)"
)
TOOL = "[mergekit-fisher](https://github.com/mergekit-fisher/mergekit-fisher)"


def _fisher_entries(config: MergeConfiguration) -> Iterator[Tuple[str, str]]:
    """(model, `fisher:` value) for every input that names a Fisher, in recipe order."""
    inputs = list(config.models or [])
    slices = list(config.slices or [])
    for module in (config.modules or {}).values():
        inputs.extend(module.models or [])
        slices.extend(module.slices or [])
    for output_slice in slices:
        inputs.extend(output_slice.sources)
    seen = set()
    for item in inputs:
        value = (item.parameters or {}).get(FISHER)
        key = (str(item.model), value)
        if isinstance(value, str) and key not in seen:
            seen.add(key)
            yield str(item.model), value


def _fisher_row(model: str, value: str) -> str:
    from mergekit_fisher.fisher_file import open_fisher

    path = resolve_fisher_path(value)
    origin = origin_of(path)
    where = (
        f"[{origin.reference}](https://huggingface.co/{origin.reference.repo_id}) "
        f"@ `{origin.commit[:12]}`"
        if origin
        else f"`{value}`"
    )
    config = open_fisher(path).config
    kind = getattr(config, "fisher_type", None) or "?"
    examples = getattr(config, "num_examples", None)
    dataset = getattr(config, "dataset", None)
    return (
        f"| {model} | {where} | {kind} | {examples if examples is not None else '?'} "
        f"| {dataset or '?'} |"
    )


def fisher_section(config: MergeConfiguration) -> str:
    method = mergekit_registry.get(config.merge_method)
    cites = [PAPER]
    if isinstance(method, FisherTaskArithmeticMerge):
        namesake = method.namesake.spec
        name = namesake.pretty_name or namesake.name
        cites.append(f"[{name}]({namesake.reference_url})" if namesake.reference_url else name)
    shared = {
        spec.name: spec.default
        for spec in fisher_parameter_specs(ParameterScope.INPUT)
        if spec.name != FISHER
    }
    shared.update({k: v for k, v in (config.parameters or {}).items() if k in shared})
    lines: List[str] = [
        "",
        "### Fisher weighting",
        "",
        f"Each parameter was weighted by each model's diagonal Fisher information, as in {cites[0]}"
        + (f", applied to {cites[1]}" if len(cites) > 1 else "")
        + f". Merged with {TOOL}.",
        "",
        "| model | Fisher | type | examples | data |",
        "|---|---|---|---|---|",
        *(_fisher_row(model, value) for model, value in _fisher_entries(config)),
        "",
        "Fisher parameters: " + ", ".join(f"`{k}: {v}`" for k, v in shared.items()),
        "",
    ]
    return "\n".join(lines)


def with_fisher_section(original):
    """mergekit's `generate_card`, plus the Fisher section for Fisher methods."""

    def generate_card(config: MergeConfiguration, config_yaml: str, name=None, *args, **kwargs):
        card = original(config, config_yaml, name, *args, **kwargs)
        if is_fisher_method(config.merge_method):
            card = card.rstrip("\n") + "\n" + fisher_section(config)
        return card

    generate_card.adds_fisher_section = True
    return generate_card
