"""Model identity in a Fisher file's config, and the one rule for "same model?".

`compute` records, for the model and the adapter, the path as given, its resolved absolute path (or,
for a Hub id, the cached snapshot's revision), and `tools.checkpoint.model_fingerprint` of the
weights. Resume, `combine`, `convert` and the merge (`merge.provenance`) compare identities with
`compare_identity`:

* both sides have a fingerprint: the fingerprints decide (a copied or moved model is the same model;
  another model with the same directory name is not);
* otherwise the resolved paths (or Hub id + revision) decide;
* nothing recorded: unknown.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

from mergekit_fisher.errors import FisherInputError

IDENTITY_KEYS = (
    "model",
    "model_path",
    "model_revision",
    "model_fingerprint",
    "adapter",
    "adapter_path",
    "adapter_fingerprint",
)


def _local_dir(path: str) -> Optional[str]:
    expanded = os.path.expanduser(path)
    return os.path.realpath(expanded) if os.path.exists(expanded) else None


def checkpoint_identity(
    path: Optional[str], revision: Optional[str] = None
) -> Dict[str, Optional[str]]:
    """{path, revision, fingerprint} of a model or adapter as given (a local checkpoint or a Hub
    id).

    A local checkpoint is fingerprinted (one that cannot be -- pickle-only, broken -- gets none); a
    Hub id is fingerprinted from its cached snapshot when there is one, else only its id is
    known."""
    from mergekit_fisher.tools.checkpoint import cached_snapshot, model_fingerprint

    if not path:
        return {"path": None, "revision": None, "fingerprint": None}
    local = _local_dir(path)
    snapshot = None if local is not None else cached_snapshot(path, revision)
    try:
        fingerprint = model_fingerprint(path, local or snapshot) if (local or snapshot) else None
    except FisherInputError:  # pickle-only, broken: whatever loads it next says so; no fingerprint
        fingerprint = None
    if local is not None:
        return {"path": local, "revision": revision, "fingerprint": fingerprint}
    return {
        "path": None,
        "revision": os.path.basename(snapshot) if snapshot else revision,
        "fingerprint": fingerprint,
    }


def model_identity(
    model: str, adapter: Optional[str] = None, revision: Optional[str] = None
) -> Dict[str, Optional[str]]:
    """The identity keys `compute` writes into `fisher_config.json` (None values are dropped
    there)."""
    base = checkpoint_identity(model, revision)
    lora = checkpoint_identity(adapter)
    return {
        "model": model,
        "model_path": base["path"],
        "model_revision": base["revision"],
        "model_fingerprint": base["fingerprint"],
        "adapter": adapter,
        "adapter_path": lora["path"],
        "adapter_fingerprint": lora["fingerprint"],
    }


def identity_of(config) -> Dict[str, Optional[str]]:
    """The identity keys recorded in a `FisherConfig` (or a dict), missing ones as None."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return {key: get(key) for key in IDENTITY_KEYS}


def _path_of(identity: Dict[str, Optional[str]], prefix: str) -> Optional[str]:
    """The resolved path recorded (or, for an older config, the path as given, if it is one)."""
    if identity.get(f"{prefix}_path"):
        return identity[f"{prefix}_path"]
    given = os.path.expanduser(identity[prefix])
    if os.path.exists(given):
        return os.path.realpath(given)
    return os.path.abspath(given) if os.path.isabs(given) or given.startswith(".") else None


def _same_checkpoint(
    recorded: Dict[str, Optional[str]], actual: Dict[str, Optional[str]], prefix: str
) -> bool:
    """Same model (prefix "model") or adapter (prefix "adapter")?"""
    given_a, given_b = recorded.get(prefix), actual.get(prefix)
    if not given_a and not given_b:
        return True
    if not given_a or not given_b:
        return False  # one has an adapter (or model) and the other none
    fp_a, fp_b = recorded.get(f"{prefix}_fingerprint"), actual.get(f"{prefix}_fingerprint")
    if fp_a and fp_b and fp_a.split(":")[0] == fp_b.split(":")[0]:  # same fingerprint version
        return fp_a == fp_b
    path_a, path_b = (_path_of(side, prefix) for side in (recorded, actual))
    if path_a and path_b:
        return os.path.normpath(path_a) == os.path.normpath(path_b)
    if path_a or path_b:
        return False  # a local path against a Hub id
    # two Hub ids: the same id, and the same revision where both are known
    rev_a, rev_b = recorded.get(f"{prefix}_revision"), actual.get(f"{prefix}_revision")
    return given_a == given_b and (not (rev_a and rev_b) or rev_a == rev_b)


def compare_identity(
    recorded: Dict[str, Optional[str]], actual: Dict[str, Optional[str]]
) -> Optional[str]:
    """None when `recorded` and `actual` are the same model and adapter; else what differs, in
    words. `recorded` without any model is "unknown": the caller decides (it is not a mismatch
    here)."""
    if not recorded.get("model"):
        return None
    differences = []
    for prefix in ("model", "adapter"):
        if not _same_checkpoint(recorded, actual, prefix):
            differences.append(prefix)
    if not differences:
        return None
    return " and ".join(differences)


def describe(identity: Dict[str, Optional[str]]) -> str:
    """`/models/a (weights w1:1a2b3c4d…) + adapter /adapters/x` for messages."""

    def one(prefix: str) -> str:
        given = identity.get(prefix)
        if not given:
            return "none"
        path = identity.get(f"{prefix}_path")
        text = (
            given
            if not path or os.path.normpath(path) == os.path.normpath(given)
            else f"{given} ({path})"
        )
        if identity.get(f"{prefix}_revision"):
            text += f"@{identity[f'{prefix}_revision']}"
        if identity.get(f"{prefix}_fingerprint"):
            text += f" [weights {identity[f'{prefix}_fingerprint'][:19]}]"
        return text

    text = f"model {one('model')}"
    if identity.get("adapter"):
        text += f" + adapter {one('adapter')}"
    return text
