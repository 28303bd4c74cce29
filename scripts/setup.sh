#!/usr/bin/env bash
# Create .venv and install mergekit-fisher (editable) with its test and plot extras.
# torch is pinned to 2.13.0 on purpose: these machines serve a local CPU build of exactly that
# version, while an unpinned `torch` would pull several GB of CUDA packages.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.5.1" on a GPU box) or PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
# One resolver run: the torch pin is honoured for every dependency that asks for torch.
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" -e ".[test,plot]" 2>&1 | { grep -v "is ignored" || true; }
.venv/bin/python -c "import torch, mergekit, mergekit_fisher; print('mergekit-fisher', mergekit_fisher.__version__, '| torch', torch.__version__)"
