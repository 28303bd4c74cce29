"""Interpreter start-up hook, loaded from ``mergekit_fisher.pth`` in site-packages.

It lets the stock ``mergekit-yaml`` know the Fisher methods without the user importing anything.
Rules, because this runs in *every* Python process of the environment:

* standard library only, and nothing heavy: torch and mergekit are not imported here;
* it never raises (the ``.pth`` line swallows errors too);
* ``MERGEKIT_FISHER_NO_HOOK=1`` turns it off (checked by the ``.pth`` line itself, before this
  module is imported, so a disabled hook costs nothing).

It installs a meta-path finder that waits for mergekit's method package (and its planner) to be
imported, then registers our methods / patches the planner right after that module has executed.
Waiting for the whole ``mergekit.merge_methods`` package (not its ``registry`` submodule) matters:
our methods module imports from that package, so registering any earlier could find it half-built.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

DISABLE_ENV = "MERGEKIT_FISHER_NO_HOOK"

# module name -> dotted path of the callback run once that module has executed
_WATCHED = {
    "mergekit.merge_methods": "mergekit_fisher.merge.registry:register_methods",
    "mergekit.plan": "mergekit_fisher.merge.registry:patch_planner",
    "mergekit.merge": "mergekit_fisher.merge.registry:patch_merge_entry",
    "mergekit.scripts.merge_raw_pytorch": "mergekit_fisher.merge.registry:patch_raw_pytorch",
}


def _run_callback(module_name: str) -> None:
    target = _WATCHED[module_name]
    module_path, func_name = target.split(":")
    try:
        module = __import__(module_path, fromlist=[func_name])
        getattr(module, func_name)()
    except Exception as error:  # never break the user's interpreter
        sys.stderr.write(
            f"mergekit-fisher: could not hook into {module_name} ({error!r}); "
            "the Fisher merge methods are unavailable in this process. "
            "Use `mergekit-fisher merge` instead, or report this issue.\n"
        )


class _AfterExecLoader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader, module_name: str):
        self._wrapped = wrapped
        self._module_name = module_name

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        _run_callback(self._module_name)

    def __getattr__(self, name):  # get_source, get_code, is_package, ... for tracebacks and tools
        return getattr(self._wrapped, name)


class _MergekitWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _AfterExecLoader(spec.loader, fullname)
        return spec


def install() -> None:
    if os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if any(isinstance(finder, _MergekitWatcher) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _MergekitWatcher())
    # Modules imported before the hook (only possible when called late, e.g. from tests).
    for name in _WATCHED:
        if name in sys.modules:
            _run_callback(name)
