"""The wheel as a pip user gets it: recipes, license texts and the start-up hook inside, and
`mergekit-fisher recipes` working from the installed copy (not from this checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (path,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    return path


def test_wheel_ships_recipes_licenses_and_the_hook(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(
        f
        for f in os.listdir(os.path.join(ROOT, "mergekit_fisher", "recipes"))
        if f.endswith(".yml")
    )
    assert shipped and all(f"mergekit_fisher/recipes/{f}" in names for f in shipped)
    assert "mergekit_fisher.pth" in names
    licenses = {n.rsplit("/", 1)[-1] for n in names if "/licenses/" in n}
    assert {"LICENSE", "COPYING"} <= licenses


def test_recipes_command_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(site), "MERGEKIT_FISHER_NO_HOOK": "1"}
    code = (
        "import mergekit_fisher, sys; assert mergekit_fisher.__file__.startswith(sys.argv[1]), "
        "mergekit_fisher.__file__; from mergekit_fisher.cli import main; "
        "main(['recipes', 'fisher_ties', '--out', sys.argv[2]])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(site), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert run.returncode == 0, run.stderr
    written = (tmp_path / "out" / "fisher_ties.yml").read_text()
    with open(
        os.path.join(ROOT, "mergekit_fisher", "recipes", "fisher_ties.yml"), encoding="utf-8"
    ) as fp:
        assert written == fp.read()


def test_recipes_command_lists_prints_and_refuses(tmp_path):
    from click.testing import CliRunner

    from mergekit_fisher.cli import main

    shipped = sorted(
        f[:-4]
        for f in os.listdir(os.path.join(ROOT, "mergekit_fisher", "recipes"))
        if f.endswith(".yml")
    )
    listing = CliRunner().invoke(main, ["recipes"])
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.output.splitlines()] == shipped
    printed = CliRunner().invoke(main, ["recipes", "fisher_two_finetunes.yml"])
    assert printed.exit_code == 0 and "merge_method: fisher" in printed.output
    bad = CliRunner().invoke(main, ["recipes", "fisher_tie"])
    assert bad.exit_code == 2 and bad.output.count("Error:") == 1 and "fisher_ties" in bad.output
    (tmp_path / "fisher_ties.yml").write_text("mine")
    clash = CliRunner().invoke(main, ["recipes", "fisher_ties", "--out", str(tmp_path)])
    assert clash.exit_code == 2 and (tmp_path / "fisher_ties.yml").read_text() == "mine"
