#!/usr/bin/env bash
# mergekit's own test suite, unchanged, with mergekit-fisher installed (its start-up hook on):
# registering our methods must not break anything mergekit promises, including its state-dict API
# run over every registered method. The suite comes from mergekit's sdist on PyPI; the sdist lacks
# the suite's tests/common.py helpers, so ci/mergekit_tests_common.py (ours) stands in for them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('mergekit'))")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "mergekit==$VERSION" -d "$WORK" 2>&1 | { grep -v "is ignored" || true; }
tar -xzf "$WORK"/mergekit-"$VERSION".tar.gz -C "$WORK"
SUITE="$WORK/suite"
mkdir -p "$SUITE"
cp -r "$WORK/mergekit-$VERSION/tests" "$SUITE/tests"
cp ci/mergekit_tests_common.py "$SUITE/tests/common.py"
touch "$SUITE/tests/__init__.py"
unset MERGEKIT_FISHER_NO_HOOK
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$SUITE"  # the installed mergekit, not the sdist's copy, is what runs
# the suite must see our methods: it parametrizes one test over every registered method
collected=$("$OLDPWD/$PY" -m pytest -p no:cacheprovider tests --collect-only -q -k "fisher_ties" 2>/dev/null || true)
case "$collected" in
    *"[fisher_ties]"*) ;;
    *) echo "mergekit's suite did not see the Fisher methods: is the start-up hook installed?"; exit 1 ;;
esac
exec "$OLDPWD/$PY" -m pytest -q -p no:cacheprovider tests
