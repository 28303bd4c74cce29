#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Default: the fast suite (a few minutes on 2 cores).
#   bash scripts/test.sh          # fast suite
#   bash scripts/test.sh --all    # also the tests marked slow
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
args=()
for arg in "$@"; do
    if [ "$arg" = "--all" ]; then args+=(-m "slow or not slow"); else args+=("$arg"); fi
done
# Offline by construction: no test may touch the Hugging Face Hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "${args[@]}"
