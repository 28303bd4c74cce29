#!/usr/bin/env bash
# ruff: the project's one formatter and linter (settings in pyproject.toml, line length 100).
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF_SPEC=${RUFF_SPEC:-ruff==0.17.6}
[ -x .venv/bin/ruff ] || .venv/bin/python -m pip install -q --disable-pip-version-check "$RUFF_SPEC"
.venv/bin/ruff format --check .
.venv/bin/ruff check .
