"""The README's "In one minute" and the shipped recipes, run as written.

The commands are read from README.md (and from each recipe's comments), not copied here. Paths
under `/models/`, `/fisher/`, `/adapters/` and `/tmp/` are mapped into a temporary directory, where
tiny models, adapters and data files are made for whatever the commands name; the rest runs as is,
through the real entry points (`mergekit-fisher`'s click group and mergekit-yaml's own `main`), in
that directory as the working directory.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest
import tiny
import yaml
from click.testing import CliRunner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
RECIPES = os.path.join(REPO, "mergekit_fisher", "recipes")
ROOTS = re.compile(r"(?<![\w.])/(models|fisher|adapters|tmp)/")


def section_blocks(title: str, language: str):
    text = open(README, encoding="utf-8").read()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end > 0 else None]
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def commands_of(block: str):
    """Shell lines of a code block, trailing comments removed."""
    out = []
    for line in block.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(" ".join(shlex.split(line, comments=True)))
    return out


class Sandbox:
    """A working directory where /models, /fisher, /adapters and /tmp live, filled on demand."""

    def __init__(self, root: str, tokenizer_dir: str):
        self.root, self.tokenizer_dir = root, tokenizer_dir
        self.base = None

    def path(self, text: str) -> str:
        return ROOTS.sub(lambda m: f"{self.root}/{m.group(1)}/", text)

    def _base_model(self):
        if self.base is None:
            self.base = tiny.make_llama(seed=0, tokenizer_dir=self.tokenizer_dir)
        return self.base

    def model(self, path: str, seed: int) -> None:
        if not os.path.exists(path):
            tiny.perturbed_copy(
                self._base_model(), path, seed=seed, tokenizer_dir=self.tokenizer_dir
            )

    def adapter(self, path: str, seed: int) -> None:
        if os.path.exists(path):
            return
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(tiny.make_llama(seed=0), config).save_pretrained(path)

    def data(self, path: str) -> None:
        if not os.path.exists(path):
            tiny.write_jsonl(path, [{"text": text} for text in tiny.CORPUS])

    def prepare(self, argv) -> None:
        """Make the models, adapters and data files a command names (fine-tunes of one base)."""
        for index, arg in enumerate(argv):
            for part in arg.split("+"):
                if f"{self.root}/models/" in part:
                    self.model(part, seed=100 + index)
                elif f"{self.root}/adapters/" in part:
                    self.adapter(part, seed=200 + index)
            if index and argv[index - 1] == "--data":
                self.data(arg)

    def recipe(self, path: str, make: bool = True) -> None:
        """Map a recipe's paths into the sandbox; with `make`, also make what it names (models,
        adapters, Fishers) -- the README's walkthrough must find them made by its own commands."""
        with open(path, encoding="utf-8") as fp:
            text = self.path(fp.read())
        with open(path, "w", encoding="utf-8") as fp:
            fp.write(text)
        if not make:
            return
        config = yaml.safe_load(text)
        models = [entry["model"] for entry in config["models"]]
        if config.get("base_model"):
            models.append(config["base_model"])
        self.prepare(models)
        for entry in config["models"]:
            fisher = entry["parameters"]["fisher"]
            if not os.path.exists(fisher):  # not made by a command in the comments: compute it
                out = os.path.dirname(fisher) if fisher.endswith(".safetensors") else fisher
                base, _, adapter = entry["model"].partition("+")
                argv = ["compute", base, out, "--data", os.path.join(self.root, "any.jsonl")]
                self.run(["mergekit-fisher", *argv, *(["--lora", adapter] if adapter else [])])
                assert os.path.exists(fisher), fisher

    def run(self, argv):
        from mergekit.scripts.run_yaml import main as mergekit_yaml

        from mergekit_fisher.cli import main as mergekit_fisher
        from mergekit_fisher.merge.registry import ensure_registered

        self.prepare(argv)
        program, args = argv[0], argv[1:]
        if program == "mergekit-fisher":
            result = CliRunner().invoke(mergekit_fisher, args)
        elif program == "mergekit-yaml":
            ensure_registered()  # what the .pth start-up hook does in a real shell
            result = CliRunner().invoke(mergekit_yaml, args)
        else:
            raise AssertionError(f"the walkthrough runs {program!r}, which this test cannot run")
        assert result.exit_code == 0, (argv, result.output, result.exception)
        return result


def test_activation_line_provides_the_commands():
    block = section_blocks("In one minute", "bash")[0]
    first = commands_of(block)[0]
    assert first == "source .venv/bin/activate", first
    script = "source .venv/bin/activate && command -v mergekit-fisher && command -v mergekit-yaml"
    found = subprocess.run(
        ["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert found.returncode == 0, found.stderr
    venv = os.path.realpath(os.path.join(REPO, ".venv"))
    assert all(os.path.realpath(line).startswith(venv) for line in found.stdout.split())


def test_in_one_minute_runs_as_written(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sandbox = Sandbox(str(tmp_path), tokenizer_dir)
    commands = commands_of(section_blocks("In one minute", "bash")[0])[1:]  # after activation
    programs = [shlex.split(c)[0] for c in commands]
    assert programs.count("mergekit-yaml") == 1 and "mergekit-fisher" in programs
    for command in commands:
        argv = shlex.split(sandbox.path(command))
        sandbox.run(argv)
        if argv[1:2] == ["recipes"] and "--out" in argv:
            out = argv[argv.index("--out") + 1]
            for name in os.listdir(out):
                sandbox.recipe(os.path.join(out, name), make=False)
    assert os.path.isfile(tmp_path / "share.png")
    assert os.path.isfile(tmp_path / "merged" / "config.json")
    # the YAML shown is the shipped recipe's content
    shown = yaml.safe_load(section_blocks("In one minute", "yaml")[0])
    shipped = yaml.safe_load(open(os.path.join(RECIPES, "fisher_two_finetunes.yml")))
    assert {k: shown[k] for k in ("merge_method", "dtype")} == {
        k: shipped[k] for k in ("merge_method", "dtype")
    }
    assert [(m["model"], m["parameters"]) for m in shown["models"]] == [
        (m["model"], m["parameters"]) for m in shipped["models"]
    ]


@pytest.mark.parametrize(
    "name", sorted(f[: -len(".yml")] for f in os.listdir(RECIPES) if f.endswith(".yml"))
)
def test_shipped_recipe_runs(name, tmp_path, tokenizer_dir, monkeypatch):
    """Each recipe: the commands in its comments (compute, mergekit-yaml), `explain`, and the merge,
    on tiny models at its own paths."""
    monkeypatch.chdir(tmp_path)
    sandbox = Sandbox(str(tmp_path), tokenizer_dir)
    sandbox.run(["mergekit-fisher", "recipes", name, "--out", "recipes"])
    recipe = os.path.join("recipes", f"{name}.yml")
    with open(recipe, encoding="utf-8") as fp:
        comments = [line.lstrip("#").strip() for line in fp if line.startswith("#")]
    commands = [
        shlex.split(sandbox.path(line.split(":", 1)[-1].strip() if ":  " in line else line))
        for line in comments
        if re.match(r"^(.*:\s+)?(mergekit-fisher|mergekit-yaml) ", line)
    ]
    assert len(commands) == sum("mergekit-fisher " in c or "mergekit-yaml " in c for c in comments)
    computes = [argv for argv in commands if argv[:2] == ["mergekit-fisher", "compute"]]
    merges = [argv for argv in commands if argv[0] == "mergekit-yaml"]
    for argv in computes:
        sandbox.run(argv)
    sandbox.recipe(recipe)
    sandbox.run(["mergekit-fisher", "explain", recipe, "--plot", "share.png"])
    for argv in merges or [["mergekit-yaml", recipe, "./merged"]]:
        sandbox.run(argv)
    assert os.path.isfile(tmp_path / "merged" / "config.json")
