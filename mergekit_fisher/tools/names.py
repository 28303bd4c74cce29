"""Map tensor names from other tools onto a model checkpoint's own names.

Training wrappers rename parameters: DDP/DeepSpeed add ``module.``, ``torch.compile`` adds
``_orig_mod.``, FSDP adds ``_fsdp_wrapped_module.``, PEFT adds ``base_model.model.`` and
``.base_layer``, and some tools drop the leading ``model.``. `match_names` undoes these and, as a
last resort, matches by a unique dotted suffix. Pure string work: no torch, no files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

# `model.module.`: DDP inside a training wrapper whose attribute was `model`
LEADING_WRAPPERS = (
    "module.",
    "_orig_mod.",
    "base_model.model.",
    "_fsdp_wrapped_module.",
    "model.module.",
)
# wrapper segments that can sit anywhere in a name
INNER_WRAPPERS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "base_layer"}


def normalize(name: str) -> str:
    """``module.base_model.model.model.layers.0.q_proj.base_layer.weight`` ->
    ``model.layers.0.q_proj.weight``."""
    changed = True
    while changed:
        changed = False
        for prefix in LEADING_WRAPPERS:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return ".".join(part for part in name.split(".") if part not in INNER_WRAPPERS)


def candidates(name: str) -> List[str]:
    """Names to try, most literal first."""
    base = normalize(name)
    out = [name, base]
    out.append(base[len("model.") :] if base.startswith("model.") else "model." + base)
    return list(dict.fromkeys(out))


def _suffix_match(base: str, targets: Iterable[str]) -> List[str]:
    return [t for t in targets if t.endswith("." + base) or base.endswith("." + t)]


@dataclass
class NameMatch:
    mapping: Dict[str, str] = field(default_factory=dict)  # source name -> checkpoint name
    unmatched: List[str] = field(default_factory=list)
    ambiguous: Dict[str, List[str]] = field(
        default_factory=dict
    )  # source -> candidate checkpoint names

    @property
    def renamed(self) -> Dict[str, str]:
        return {s: t for s, t in self.mapping.items() if s != t}

    def collision(self) -> Optional[Tuple[str, str, str]]:
        """Two source names mapped onto one checkpoint name: (first, second, target)."""
        seen: Dict[str, str] = {}
        for source, target in self.mapping.items():
            if target in seen:
                return seen[target], source, target
            seen[target] = source
        return None


def match_names(sources: Iterable[str], targets: Iterable[str]) -> NameMatch:
    targets = list(targets)
    target_set = set(targets)
    result = NameMatch()
    for source in sources:
        found = next((c for c in candidates(source) if c in target_set), None)
        if found is None:
            hits = _suffix_match(normalize(source), targets)
            if len(hits) == 1:
                found = hits[0]
            elif len(hits) > 1:
                result.ambiguous[source] = sorted(hits)
        if found is None:
            result.unmatched.append(source)
        else:
            result.mapping[source] = found
    return result
