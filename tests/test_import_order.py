"""Registration does not depend on import order, and the package has no import cycle.

Each check runs in a fresh interpreter with the `.pth` start-up hook on, as a user's script would.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

from merge_world import World, write_recipe

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, "mergekit_fisher")
ENV = {k: v for k, v in os.environ.items() if k != "MERGEKIT_FISHER_NO_HOOK"}

ALL_MODULES = """
import importlib, pkgutil
import mergekit_fisher
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(mergekit_fisher.__path__, "mergekit_fisher.")
)
"""


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )


def test_any_module_imported_first_leaves_the_methods_registered():
    """For every module of the package: a fresh mergekit, that module imported first, then
    mergekit's registry and planner must know the Fisher methods."""
    result = _python(
        ALL_MODULES
        + """
import sys
def purge():
    for name in list(sys.modules):
        ours = name.startswith("mergekit_fisher") and not name.startswith("mergekit_fisher._hook")
        if name == "mergekit" or name.startswith("mergekit.") or ours:
            del sys.modules[name]
bad = []
for name in MODULES:
    purge()
    importlib.import_module(name)
    methods = importlib.import_module("mergekit.merge_methods")
    plan = importlib.import_module("mergekit.plan")
    known = {method.spec.name for method in methods.registered_methods()}
    patched = plan.ExecuteMergeMethodTask.__module__ == "mergekit_fisher.merge.tasks"
    if not ({"fisher", "fisher_ties", "fisher_della_linear"} <= known and patched):
        bad.append(name)
print("checked", len(MODULES), "bad", bad)
"""
    )
    assert result.returncode == 0, result.stderr
    assert "could not hook" not in result.stderr, result.stderr
    assert "bad []" in result.stdout and "checked" in result.stdout, result.stdout
    assert int(result.stdout.split()[1]) > 40  # the walk really found the package's modules


def test_every_module_imported_then_a_stock_merge(tmp_path):
    world = World(str(tmp_path / "world"), n_models=2)
    recipe = write_recipe(
        world.recipe("fisher_ties", base=world.base, shared={"density": 0.5}),
        str(tmp_path / "r.yml"),
    )
    out = str(tmp_path / "out")
    result = _python(
        ALL_MODULES
        + f"""
for name in MODULES:
    importlib.import_module(name)
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
with open({recipe!r}) as fp:
    config = MergeConfiguration.model_validate(yaml.safe_load(fp))
run_merge(config, {out!r}, MergeOptions(quiet=True, write_model_card=False))
print("merged")
"""
    )
    assert result.returncode == 0, result.stderr
    assert "could not hook" not in result.stderr
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def _package_imports() -> dict:
    """module -> the mergekit_fisher modules it imports anywhere (module level or in a function)."""
    graph = {}
    for folder, _dirs, files in os.walk(ROOT):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            relative = os.path.relpath(path, os.path.join(ROOT, os.pardir))[:-3].replace(
                os.sep, "."
            )
            name = relative[: -len(".__init__")] if relative.endswith(".__init__") else relative
            targets = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets.add(node.module)
                elif isinstance(node, ast.Import):
                    targets.update(alias.name for alias in node.names)
            graph[name] = {t for t in targets if t.startswith("mergekit_fisher") and t != name}
    return graph


def test_the_package_has_no_import_cycle():
    graph = _package_imports()
    assert "mergekit_fisher.merge.tasks" in graph and graph["mergekit_fisher.merge.tasks"]

    def closure(start):
        seen, todo = set(), [start]
        while todo:
            importer = todo.pop()
            for target in graph.get(importer, ()):
                # importing a.b.c runs a/__init__ and a/b/__init__ too, unless the importer lives
                # in that package (then they are already running: a package re-exporting its
                # submodules is no cycle)
                parts = target.split(".")
                for depth in range(1, len(parts) + 1):
                    prefix = ".".join(parts[:depth])
                    if (
                        importer.startswith(prefix + ".")
                        or importer == prefix
                        and depth < len(parts)
                    ):
                        continue
                    if prefix not in seen:
                        seen.add(prefix)
                        todo.append(prefix)
        return seen

    cycles = sorted(name for name in graph if name in closure(name))
    assert cycles == []
