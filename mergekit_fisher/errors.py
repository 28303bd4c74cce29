"""User-facing errors.

`FisherInputError` is a `click.ClickException`: raised anywhere under a click command -- ours, or
the stock ``mergekit-yaml`` -- it prints one ``Error: ...`` line and exits non-zero, no traceback.
Each message names what is wrong (model, file, tensor) and how to fix it.
"""

from __future__ import annotations

import logging
import threading
from typing import Hashable, Optional

import click

_WARNED: set = set()
_WARNED_LOCK = threading.Lock()


def warn_once(logger: logging.Logger, key: Hashable, message: str, *args) -> None:
    """Log a warning once per key and process (a merge plans each tensor; say it once)."""
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    logger.warning(message, *args)


class FisherInputError(click.ClickException):
    exit_code = 2

    def __init__(
        self,
        problem: str,
        *,
        fix: Optional[str] = None,
        model: Optional[str] = None,
        file: Optional[str] = None,
        tensor: Optional[str] = None,
        kind: str = "Fisher file",
    ):
        """`kind` says what `file` is: "Fisher file" (default), "data file", "output", "recipe",
        ..."""
        self.problem = problem
        self.fix = fix
        self.model = model
        self.file = file
        self.tensor = tensor
        where = []
        if model:
            where.append(f"model {model}")
        if file:
            where.append(f"{kind} {file}")
        if tensor:
            where.append(f"tensor {tensor}")
        message = problem
        if where:
            message = f"{problem} [{', '.join(where)}]"
        if fix:
            message = f"{message}. Fix: {fix}"
        super().__init__(message)

    def __str__(self) -> str:
        return self.message
