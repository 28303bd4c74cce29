"""Provenance: does a Fisher file belong to the model the recipe merges it with?

`fisher_config.json` records the model (and adapter) a Fisher was computed for, resolved and
fingerprinted (`fisher_file.provenance`). The recipe's model is identified the same way and
compared: another model (the weights' fingerprint differs, or -- without fingerprints -- the
resolved path) or another adapter (a Fisher of base+A used for base+B) warns, naming both;
`fisher_provenance: error` refuses it instead. A Fisher that records no model warns: it cannot be
checked.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Dict, Optional, Tuple

from mergekit.common import ModelReference

from mergekit_fisher.errors import FisherInputError, warn_once
from mergekit_fisher.fisher_file import FisherFile
from mergekit_fisher.fisher_file.provenance import (
    compare_identity,
    describe,
    identity_of,
    model_identity,
)

LOG = logging.getLogger(__name__)
_LOCK = threading.Lock()
# Fisher file -> {recipe model: (what differs or None, recorded identity, actual identity)}: the
# planner asks once per output tensor; the fingerprint is taken once per model and Fisher file
_VERDICTS: "weakref.WeakKeyDictionary[FisherFile, Dict[str, Tuple[Optional[str], dict, dict]]]" = (
    weakref.WeakKeyDictionary()
)


def recipe_identity(model: ModelReference) -> dict:
    lora = model.lora.path if model.lora is not None else None
    return model_identity(str(model.model.path), lora, revision=model.model.revision)


def _verdict(fisher_file: FisherFile, model: ModelReference) -> Tuple[Optional[str], dict, dict]:
    with _LOCK:
        cached = _VERDICTS.get(fisher_file, {}).get(str(model))
    if cached is None:
        recorded = identity_of(fisher_file.config)
        actual = recipe_identity(model)
        cached = (compare_identity(recorded, actual), recorded, actual)
        with _LOCK:
            _VERDICTS.setdefault(fisher_file, {})[str(model)] = cached
    return cached


def check_provenance(fisher_file: FisherFile, model: ModelReference, policy: str) -> None:
    """Warn (or, with `fisher_provenance: error`, refuse) a Fisher recorded for another model or
    adapter."""
    config = fisher_file.config
    if config is None or not config.model:
        warn_once(
            LOG,
            ("provenance-unknown", fisher_file.path),
            "Fisher file %s records no model (no fisher_config, or no `model` in it): cannot "
            "check that it "
            "belongs to %s",
            fisher_file.path,
            model,
        )
        return
    differs, recorded, actual = _verdict(fisher_file, model)
    if differs is None:
        return
    problem = (
        f"the Fisher was computed for {describe(recorded)}, but is used for {describe(actual)} "
        f"(the {differs} differ{'s' if ' and ' not in differs else ''})"
    )
    if policy == "error":
        raise FisherInputError(
            problem,
            model=str(model),
            file=fisher_file.path,
            fix="point `fisher:` at the Fisher computed for this model (`mergekit-fisher "
            "compute`), "
            "or set `fisher_provenance: warn` to merge anyway",
        )
    warn_once(
        LOG,
        ("provenance", fisher_file.path, str(model)),
        "Fisher file %s was computed for model %s, but is used for %s; check that the `fisher:` "
        "path "
        "belongs to this model (`fisher_provenance: error` refuses this)",
        fisher_file.path,
        describe(recorded),
        describe(actual),
    )
