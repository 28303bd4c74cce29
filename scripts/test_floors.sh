#!/usr/bin/env bash
# Check the dependency floors: install every dependency at the lower bound that pyproject.toml declares
# (.ci/floor-constraints.txt, one `==` per floor) into a second venv, .venv-floors, and run the merge
# and compute smoke tests there. About 2 minutes on 2 cores (a fresh venv, pip cache warm; the tests
# themselves take 30-90 s depending on load).
#   bash scripts/test_floors.sh            # the smoke tests below
#   bash scripts/test_floors.sh -x -v      # extra arguments go to pytest
# torch stays at 2.13.0 (the local CPU build; its floor, 2.4, is checked by reading only, see the
# constraints file). Override the interpreter with PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-floors
CONSTRAINTS=.ci/floor-constraints.txt
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
# One resolver run under the constraints. --upgrade-strategy eager moves everything that is not pinned
# (numpy, fsspec, ...) to the newest version allowed, so a reused venv resolves like a fresh one.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade --upgrade-strategy eager \
    -c "$CONSTRAINTS" torch==2.13.0 -e ".[test]" \
    2>&1 | { grep -v "is ignored" || true; }

# Fail loudly if the resolver did not land exactly on the floors (e.g. a stale package in the venv).
"$VENV/bin/python" - "$CONSTRAINTS" <<'EOF'
import sys
from importlib.metadata import version
from packaging.utils import canonicalize_name

wanted = {}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name, _, pinned = line.partition("==")
        wanted[canonicalize_name(name)] = pinned.strip()
bad = []
print("resolved versions (floor venv):")
for name, pinned in sorted(wanted.items()):
    got = version(name)
    ok = got.split("+", 1)[0] == pinned.split("+", 1)[0]
    print(f"  {name:18} {got:14} {'ok' if ok else 'NOT AT FLOOR ' + pinned}")
    if not ok:
        bad.append(name)
for name in ("numpy", "pandas", "pyarrow", "fsspec", "typer-slim", "httpx"):
    try:
        print(f"  ({name:16} {version(name)})")
    except Exception:
        pass
if bad:
    sys.exit(f"error: not at the floor: {', '.join(bad)}")
EOF

# Offline by construction, like scripts/test.sh.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Smoke tests: the stock mergekit-yaml subprocess (the .pth hook, the planner, the model card), the merge
# kernels against their formulas, the exact estimator on a tied LM and a classifier, LoRA (peft), the
# datasets reader (save_to_disk, hub layout) and one plot (matplotlib). Node ids on purpose: a renamed
# test fails here loudly ("not found") instead of silently dropping out; rename it here too.
smoke=(
    "tests/test_recipes_and_hook.py::test_stock_mergekit_yaml_subprocess_and_model_card"
    "tests/test_recipes_and_hook.py::test_hook_registers_methods_when_mergekit_is_imported"
    "tests/test_merge_methods.py::test_fisher_matches_brute_force_formula"
    "tests/test_merge_methods.py::test_fisher_ties_against_hand_computation"
    "tests/test_estimator_exact.py::test_tied_fisher_is_not_sum_of_separate_squares"
    "tests/test_estimator_exact.py::test_seq_cls_equals_brute_force"
    "tests/test_estimator_lora.py::test_adapter_targets_only"
    "tests/test_estimator_data.py::test_txt_saved_dataset_and_dataset_repo_equal_jsonl"
    "tests/test_tools_plotting.py::test_png_size_and_printed_numbers"
    # compute at scale: lazy datasets sources and streaming (datasets), the writer (safetensors),
    # one process failing among two (accelerate, torch.distributed)
    "tests/test_compute_scale.py::test_text_field_split_and_subset_of_datasets_sources"
    "tests/test_compute_scale.py::test_streaming_a_datasets_source"
    "tests/test_compute_scale.py::test_save_dtype_bfloat16_round_trips_through_inspect_and_merge"
    "tests/test_estimator_distributed.py::test_a_failure_on_one_process_stops_both_with_one_error"
)
exec "$VENV/bin/python" -m pytest -q "${smoke[@]}" "$@"
