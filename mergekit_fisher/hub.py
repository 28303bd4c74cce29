"""Fisher files on the Hugging Face Hub: recipe references resolved with `huggingface_hub`.

A recipe's `fisher:` is a local path or a Hub reference:

    fisher: org/repo                  # the repository's root holds the Fisher
    fisher: org/repo/math             # a subfolder (several Fishers in one repository) or a file
    fisher: org/repo@v1               # a branch, tag or commit; also org/repo/math@<sha>
    fisher: datasets/org/repo/math    # a dataset repository (`spaces/...` likewise)

A local path that exists always wins. Downloads fetch only the Fisher's own files, through
huggingface_hub's cache, so `HF_HUB_OFFLINE`, `HF_HOME` / `HF_HUB_CACHE` and tokens (`HF_TOKEN`,
`huggingface-cli login`) behave exactly as they do for transformers. The commit each reference
resolved to is kept (`origin_of`) for the merged model's card.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Dict, Optional

from mergekit_fisher.errors import FisherInputError

_REPO_TYPES = {"datasets": "dataset", "spaces": "space"}
_SEGMENT = r"[A-Za-z0-9][\w.-]*"
_REFERENCE = re.compile(
    rf"^(?:(?P<kind>datasets|spaces)/)?(?P<repo>{_SEGMENT}/{_SEGMENT})(?P<sub>(?:/{_SEGMENT})*)$"
)


@dataclass(frozen=True)
class HubReference:
    repo_id: str
    repo_type: str = "model"
    subfolder: str = ""
    revision: Optional[str] = None

    def __str__(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{prefix}{self.repo_id}{sub}{rev}"


@dataclass(frozen=True)
class HubOrigin:
    reference: HubReference
    commit: str  # the commit the reference resolved to


def parse_reference(value: str) -> Optional[HubReference]:
    """The Hub reference `value` spells, or None if it cannot be one."""
    ref, _, revision = value.partition("@")
    match = _REFERENCE.match(ref)
    if match is None or (revision == "" and "@" in value):
        return None
    return HubReference(
        repo_id=match["repo"],
        repo_type=_REPO_TYPES.get(match["kind"] or "", "model"),
        subfolder=match["sub"].lstrip("/"),
        revision=revision or None,
    )


_ORIGINS: Dict[str, HubOrigin] = {}
_LOCK = threading.Lock()


def origin_of(path: str) -> Optional[HubOrigin]:
    """Where a resolved local path came from, if it came from the Hub."""
    with _LOCK:
        return _ORIGINS.get(os.path.abspath(path))


def resolve_fisher_path(value: str, *, kind: str = "Fisher file") -> str:
    """A local path for a recipe's `fisher:` value (downloading / reading the Hub cache if
    needed)."""
    local = os.path.expanduser(value)
    if os.path.exists(local):
        return local
    reference = parse_reference(value)
    if reference is None:
        return local  # not a Hub id: the caller reports the missing local file
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    sub = reference.subfolder
    patterns = [sub, f"{sub}/*"] if sub else None
    try:
        snapshot = snapshot_download(
            reference.repo_id,
            repo_type=reference.repo_type,
            revision=reference.revision,
            allow_patterns=patterns,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FisherInputError(
            f"{value!r} is neither a local path (no such file or directory) nor a Fisher on the "
            f"Hugging Face Hub ({reference.repo_type} repository {reference.repo_id}"
            f"{', revision ' + reference.revision if reference.revision else ''}: {reason})",
            file=value,
            kind=kind,
            fix="check the path, or the repository id, subfolder and revision; with "
            "HF_HUB_OFFLINE=1 only the local Hugging Face cache is used",
        ) from None
    path = os.path.join(snapshot, sub) if sub else snapshot
    if not os.path.exists(path):
        raise FisherInputError(
            f"the Hub repository {reference.repo_id} (commit {os.path.basename(snapshot)}) has no "
            f"{sub!r}",
            file=value,
            kind=kind,
            fix="check the subfolder name (the part after org/repo/)",
        )
    with _LOCK:
        _ORIGINS[os.path.abspath(path)] = HubOrigin(reference, os.path.basename(snapshot))
    return path
