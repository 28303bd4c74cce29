"""`mergekit-fisher push FISHER REPO_ID`: publish a Fisher like model weights, card included.

The Fisher is checked first (`inspect`'s checks: readable, finite, >= 0, statistics that match);
a file that fails is never uploaded. Uploads go through `huggingface_hub` (`create_repo`, then one
commit of every file of the Fisher plus its card), so tokens and endpoints work as for transformers.
The user's files are not modified: a missing card is rendered into the commit, not onto disk.
"""

from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

import click

from mergekit_fisher.cli import verbosity_options
from mergekit_fisher.errors import FisherInputError

log = logging.getLogger(__name__)


def _files(path: str) -> List[Tuple[str, str]]:
    """(local path, path relative to the Fisher) of every file to upload."""
    if os.path.isfile(path):
        return [(path, os.path.basename(path))]
    out = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and not name.startswith("."):
            out.append((full, name))
    return out


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fp:
        return fp.read()


def push_fisher(
    fisher: str,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: bool = False,
    path_in_repo: str = "",
    repo_type: str = "model",
) -> str:
    """Check, then upload; returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from mergekit_fisher.fisher_file import open_fisher
    from mergekit_fisher.fisher_file.card import CARD_NAME, render_card
    from mergekit_fisher.tools.inspect import build_report, has_problems

    report = build_report(fisher, None, "module")
    if has_problems(report):
        raise FisherInputError(
            "the Fisher fails `mergekit-fisher inspect --check`; nothing was uploaded",
            file=fisher,
            fix=f"run `mergekit-fisher inspect {fisher} --check` to see why, then recompute it",
        )
    sub = path_in_repo.strip("/")
    files = _files(fisher)
    operations = [
        CommitOperationAdd(path_in_repo=f"{sub}/{rel}" if sub else rel, path_or_fileobj=local)
        for local, rel in files
    ]
    if os.path.isdir(fisher):
        # The card `compute` wrote names the local path; the uploaded one names the Hub reference.
        # A card the user edited (it differs from the one we would write) is uploaded as it is.
        config = open_fisher(fisher).config
        on_disk = os.path.join(fisher, CARD_NAME)
        ours = not os.path.exists(on_disk) or _read(on_disk) == render_card(
            config, os.path.abspath(fisher)
        )
        if ours:
            reference = f"{repo_id}/{sub}" if sub else repo_id
            if revision:
                reference += f"@{revision}"
            card = render_card(config, reference).encode("utf-8")
            target = f"{sub}/{CARD_NAME}" if sub else CARD_NAME
            operations = [op for op in operations if op.path_in_repo != target]
            operations.append(CommitOperationAdd(path_in_repo=target, path_or_fileobj=card))
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=(
            f"Upload Fisher {os.path.basename(os.path.normpath(fisher))} with mergekit-fisher"
        ),
        revision=revision,
        repo_type=repo_type,
    )
    return getattr(info, "commit_url", str(info))


@click.command("push")
@verbosity_options
@click.argument("fisher", type=click.Path(exists=True))
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch to commit to (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option(
    "--path-in-repo", default="", help="Subfolder, for several Fishers in one repository."
)
@click.option(
    "--repo-type", type=click.Choice(["model", "dataset"]), default="model", show_default=True
)
def push_command(fisher, repo_id, revision, private, path_in_repo, repo_type) -> None:
    """Upload the Fisher file or directory FISHER to the Hub repository REPO_ID, with its card.

    \b
    Example:
      mergekit-fisher push /fisher/math my-org/llama-math-fisher
      # then, in anyone's recipe:  fisher: my-org/llama-math-fisher
    """
    url = push_fisher(
        fisher,
        repo_id,
        revision=revision,
        private=private,
        path_in_repo=path_in_repo,
        repo_type=repo_type,
    )
    log.info("uploaded %s to %s", fisher, url)
    click.echo(url)
