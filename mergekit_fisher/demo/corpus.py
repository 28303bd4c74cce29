"""The demo's data: "domains" made of text that ships with Python itself (no download).

* ``docs``: the Python reference manual's prose, as embedded in ``pydoc_data.topics`` (English
  text);
* ``asyncio`` / ``email``: the source code of those standard-library packages.

Prose and code differ clearly, so a specialist fine-tuned on one loses the other -- the setting of
Matena & Raffel's merging experiments. Each domain is cut into examples of about ``chunk_chars``
characters at line boundaries and split into train / held-out sets deterministically by seed.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from mergekit_fisher.choices import Domain
from mergekit_fisher.errors import FisherInputError


def _package_dir(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FisherInputError(
            f"the standard-library package {package!r} is not installed with this Python",
            fix="pick another domain with --domains",
        )
    return list(spec.submodule_search_locations)[0]


def _package_sources(package: str) -> List[str]:
    """Every `.py` file of a stdlib package (sub-packages included, tests excluded), in a fixed
    order."""
    root = _package_dir(package)
    texts = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("test", "tests", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as fp:
                    texts.append(fp.read())
    return texts


def _reference_manual() -> List[str]:
    """The language reference's prose; some distributions strip `pydoc_data`, then docstrings stand
    in."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = None
    if topics:
        return [topics[key] for key in sorted(topics)]
    texts = []
    for package in ("email", "json", "asyncio", "unittest", "collections"):
        for source in _package_sources(package):
            for node in ast.walk(ast.parse(source)):
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    docstring = ast.get_docstring(node)
                    if docstring and len(docstring) > 200:
                        texts.append(docstring)
    return texts


DOMAINS: Dict[str, Callable[[], List[str]]] = {
    Domain.DOCS: _reference_manual,
    Domain.ASYNCIO: lambda: _package_sources("asyncio"),
    Domain.EMAIL: lambda: _package_sources("email"),
}
DEFAULT_DOMAINS = (Domain.DOCS, Domain.ASYNCIO)


def chunk_texts(texts: Sequence[str], chunk_chars: int) -> List[str]:
    """Consecutive lines of each text, joined until a chunk reaches `chunk_chars` characters.

    Chunks never span two texts; leftovers shorter than a quarter chunk are dropped (a chunk made of
    one closing line teaches nothing and would dilute the loss).
    """
    chunks = []
    for text in texts:
        current: List[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if not line.strip() and not current:
                continue
            current.append(line)
            size += len(line)
            if size >= chunk_chars:
                chunks.append("".join(current).rstrip())
                current, size = [], 0
        if size >= chunk_chars // 4:
            chunks.append("".join(current).rstrip())
    return chunks


@dataclass(frozen=True)
class DomainData:
    name: str
    train: List[str]
    heldout: List[str]


def load_domain(
    name: str, *, num_train: int, num_heldout: int, chunk_chars: int, seed: int
) -> DomainData:
    """`num_train` + `num_heldout` disjoint examples of one domain, chosen by `seed`."""
    if name not in DOMAINS:
        raise FisherInputError(
            f"unknown demo domain {name!r}", fix=f"choose from {', '.join(sorted(DOMAINS))}"
        )
    chunks = chunk_texts(DOMAINS[name](), chunk_chars)
    needed = num_train + num_heldout
    if len(chunks) < needed:
        raise FisherInputError(
            f"domain {name!r} has only {len(chunks)} examples of {chunk_chars} characters, "
            f"{needed} requested ({num_train} train + {num_heldout} held out)",
            fix="lower --train-examples / --heldout-examples or --chunk-chars",
        )
    order = list(range(len(chunks)))
    # the domain name is part of the seed, so two domains never share a shuffle pattern
    random.Random(f"{seed}:{name}").shuffle(order)
    picked = [chunks[i] for i in order[:needed]]
    return DomainData(name=name, train=picked[:num_train], heldout=picked[num_train:])
