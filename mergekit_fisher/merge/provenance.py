"""Provenance: does a Fisher file belong to the model the recipe merges it with?"""

from __future__ import annotations

import logging
import os

from mergekit.common import ModelReference

from mergekit_fisher.errors import warn_once
from mergekit_fisher.fisher_file import FisherFile

LOG = logging.getLogger(__name__)



def check_provenance(fisher_file: FisherFile, model: ModelReference, policy: str) -> None:
    """Warn (or, with `fisher_provenance: error`, refuse) a Fisher recorded for another model."""
    config = fisher_file.config
    if config is None or not config.model:
        return
    recorded = os.path.basename(os.path.normpath(config.model))
    actual = os.path.basename(os.path.normpath(str(model.model.path)))
    if recorded != actual and os.path.abspath(config.model) != os.path.abspath(str(model.model.path)):
        warn_once(
            LOG,
            ("provenance", fisher_file.path, str(model)),
            "Fisher file %s was computed for model %r, but is used for %s; "
            "check that the `fisher:` path belongs to this model",
            fisher_file.path, config.model, model,
        )
