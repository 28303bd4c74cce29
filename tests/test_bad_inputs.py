"""The bad-input table: every way a user, or an attacker, can hand the tools a bad input.

Each row runs one command in-process through its own click entry point -- `mergekit-fisher compute
| inspect |
explain | combine | convert | eval`, and the stock `mergekit-yaml` for merges -- and asserts that

* it exits with code 2, cleanly (click's exit, no exception escaping);
* the output holds exactly one `Error:` line, naming what is wrong (file, entry, tensor, parameter)
and a fix;
* no `Traceback` is printed;
* nothing is left behind and nothing is touched: every file and directory of the row's own folder
and of
  the shared inputs (models, data, Fisher files) is byte-identical afterwards (hashed before and
  after),
  including the data-loss rows where OUT is, contains or lies inside an input.

Path-escape rows put `..`, absolute paths, symlinks out of the directory and FIFOs into a Fisher
directory's
index; a FIFO is watched by a thread that would see it opened (and then closes it, so nothing can
hang).
The read-only and disk-full rows use a real tmpfs where this machine lets us mount one (we are
root);
elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import tiny
import torch
from click.testing import CliRunner
from merge_world import write_recipe
from safetensors.torch import save_file

from mergekit_fisher.fisher_file import FisherConfig, write_fisher
from mergekit_fisher.fisher_file.provenance import model_identity

TARGET = (
    "model.layers.0.mlp.down_proj.weight"  # a tensor in a shard of its own in the sharded Fisher
)


# ---------------------------------------------------------------- the world every row reads (never
# writes)
class World:
    def __init__(self, root: str):
        self.root = root
        self.tok = os.path.join(root, "tok")
        tiny.make_tokenizer(self.tok)
        self.m = os.path.join(root, "m")
        self.m2 = os.path.join(root, "m2")
        base = tiny.make_llama(self.m, seed=1, tokenizer_dir=self.tok)
        tiny.perturbed_copy(base, self.m2, seed=7, scale=0.05, tokenizer_dir=self.tok)
        self.data = tiny.write_jsonl(
            os.path.join(root, "d.jsonl"), [{"text": t} for t in tiny.CORPUS[:3]]
        )
        self.state = tiny.state_dict_from_dir(self.m)
        generator = torch.Generator().manual_seed(0)
        self.values = {
            k: torch.rand(v.shape, generator=generator) + 0.1 for k, v in self.state.items()
        }
        # Fisher files that record their model's identity, as `compute` writes them
        self.fisher_m = os.path.join(root, "fisher_m")
        self.fisher_m2 = os.path.join(root, "fisher_m2")
        write_fisher(self.values, self.fisher_m, FisherConfig(**_identity(self.m), num_examples=3))
        write_fisher(
            self.values, self.fisher_m2, FisherConfig(**_identity(self.m2), num_examples=3)
        )
        # a sharded one: each path-escape row copies it and rewrites one index entry
        self.sharded = os.path.join(root, "fisher_sharded")
        write_fisher(
            self.values,
            self.sharded,
            FisherConfig(**_identity(self.m), num_examples=3),
            max_shard_size=20000,
        )
        with open(
            os.path.join(self.sharded, "fisher.safetensors.index.json"), encoding="utf-8"
        ) as fp:
            self.index = json.load(fp)
        # what an escaping entry points at: another model's Fisher, same tensor names
        self.other = os.path.join(root, "other")
        write_fisher(
            {TARGET: self.values[TARGET] * 1000}, os.path.join(self.other, "fisher.safetensors")
        )

    def recipe(self, fishers: Optional[Sequence[object]] = None, **shared) -> dict:
        fishers = list(fishers or [self.fisher_m, self.fisher_m2])
        models = [
            {"model": self.m, "parameters": {"weight": 1.0, "fisher": fishers[0]}},
            {"model": self.m2, "parameters": {"weight": 1.0, "fisher": fishers[1]}},
        ]
        recipe = {"merge_method": "fisher", "dtype": "float32", "models": models}
        if shared:
            recipe["parameters"] = shared
        return recipe


def _identity(model: str) -> dict:
    return {k: v for k, v in model_identity(model).items() if v is not None}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("bad_inputs_world")))


# ---------------------------------------------------------------- small filesystems (root only)
def _mount_tmpfs(path: str, size: str, read_only: bool = False) -> Optional[str]:
    """Mount a tmpfs at `path`; the reason it could not be, or None."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"mount not available ({error})"
    if done.returncode != 0:
        return f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root"
    return None


@pytest.fixture(scope="module")
def filesystems(tmp_path_factory):
    """{"full": a 64 KiB tmpfs (the tiny model's Fisher needs ~150 KB), "ro": a read-only tmpfs} or
    skip reasons."""
    root = str(tmp_path_factory.mktemp("filesystems"))
    mounted, result = [], {}

    def unmount():
        while mounted:
            subprocess.run(["umount", "-l", mounted.pop()], capture_output=True, timeout=30)

    # a mount outlives the process: unmount on SIGTERM (`timeout`, a cancelled CI job) and at exit,
    # not only in the teardown (a SIGKILL still leaks them: `umount -l` the `filesystems*` folders)
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        unmount()
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    atexit.register(unmount)
    try:
        for name, size, read_only in (("full", "64k", False), ("ro", "1m", True)):
            path = os.path.join(root, name)
            reason = _mount_tmpfs(path, size, read_only)
            result[name] = (path, reason)
            if reason is None:
                mounted.append(path)
        yield result
    finally:
        unmount()
        signal.signal(signal.SIGTERM, previous)
        atexit.unregister(unmount)


# ---------------------------------------------------------------- snapshots
def snapshot(*roots: str) -> Dict[str, tuple]:
    """Every entry under `roots`: kind and content hash (files), target (links); FIFOs are never
    opened."""
    entries: Dict[str, tuple] = {}
    for root in roots:
        if not os.path.lexists(root):
            entries[root] = ("absent",)
            continue
        for directory, dirs, files in os.walk(root):
            entries[directory] = ("dir",)
            for name in dirs + files:
                path = os.path.join(directory, name)
                info = os.lstat(path)
                if os.path.islink(path):
                    entries[path] = ("link", os.readlink(path))
                elif os.path.isdir(path):
                    continue
                elif not os.path.isfile(path):
                    entries[path] = ("special", info.st_mode)
                else:
                    with open(path, "rb") as fp:
                        entries[path] = ("file", hashlib.sha256(fp.read()).hexdigest())
    return entries


_WATCHER = r"""
import errno, os, sys, time
path, report = sys.argv[1], sys.argv[2]
open(report + ".ready", "w").close()
while True:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno not in (errno.ENXIO, errno.ENOENT):
            raise
    else:
        open(report, "w").close()
        os.close(fd)
    time.sleep(0.01)
"""


class FifoWatch:
    """Sees whether anyone opens a FIFO for reading, and then closes its write end so that the
    reader gets
    EOF instead of hanging. A separate process: a reader blocked in a C/Rust `open` may hold the
    GIL."""

    def __init__(self, path: str, report: str):
        self.path, self.report = path, report

    @property
    def opened(self) -> bool:
        return os.path.exists(self.report)

    def __enter__(self):
        self._process = subprocess.Popen([sys.executable, "-c", _WATCHER, self.path, self.report])
        deadline = time.time() + 30
        while not os.path.exists(self.report + ".ready") and time.time() < deadline:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self._process.kill()
        self._process.wait(timeout=30)


# ---------------------------------------------------------------- the rows
@dataclass
class Case:
    command: str  # "mergekit-yaml" or a mergekit-fisher subcommand
    args: List[str]
    needles: Sequence[str]  # must be in the one Error: line
    fifos: Sequence[str] = ()  # must never be opened
    roots: Sequence[str] = ()  # more folders that must be untouched (mounts, ...)
    chdir: Optional[str] = None
    marker: Optional[str] = None  # a file a hostile input would create


@dataclass
class Ctx:
    world: World
    dir: str  # the row's own folder: all of it must be untouched
    filesystems: dict
    extra: dict = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def fs(self, name: str) -> str:
        path, reason = self.filesystems[name]
        if reason is not None:
            pytest.skip(reason)
        return path


def _merge(
    ctx: Ctx, recipe: dict, *needles: str, card: bool = False, extra: Sequence[str] = ()
) -> Case:
    path = write_recipe(recipe, ctx.path("recipe.yml"))
    args = [path, ctx.path("out"), "--quiet", *([] if card else ["--no-write-model-card"]), *extra]
    return Case("mergekit-yaml", args, needles)


def _compute(
    ctx: Ctx, model: str, out: str, *needles: str, data: Optional[str] = None, extra=()
) -> Case:
    return Case(
        "compute",
        [
            model,
            out,
            "--data",
            data or ctx.world.data,
            "--no-progress",
            "--batch-size",
            "2",
            *extra,
        ],
        needles,
    )


def _fifo(path: str) -> str:
    os.mkfifo(path)
    return path


ESCAPES = {
    # name -> (setup(ctx, fisher_dir) -> entry, needles, fifo to watch (a path relative to the row
    # dir) or None)
    "dotdot": (
        lambda ctx, d: "../../other/fisher.safetensors",
        ["points outside the directory"],
        None,
    ),
    "absolute": (lambda ctx, d: "/etc/passwd", ["'/etc/passwd'", "absolute path"], None),
    "absolute-fifo": (
        lambda ctx, d: _fifo(ctx.path("outside.fifo")),
        ["outside.fifo", "absolute path"],
        "outside.fifo",
    ),
    "symlink-out": (
        lambda ctx, d: (
            os.symlink(
                os.path.join(ctx.world.other, "fisher.safetensors"),
                os.path.join(d, "link.safetensors"),
            ),
            "link.safetensors",
        )[1],
        ["'link.safetensors'", "points outside the directory"],
        None,
    ),
    "fifo": (
        lambda ctx, d: (_fifo(os.path.join(d, "pipe.safetensors")), "pipe.safetensors")[1],
        ["'pipe.safetensors'", "FIFO"],
        "f/pipe.safetensors",
    ),
    "integer": (lambda ctx, d: 5, ["index entry 5", "a number, not a shard file name"], None),
    "list": (
        lambda ctx, d: ["fisher-00001-of-00007.safetensors"],
        ["a list, not a shard file name"],
        None,
    ),
}


def _escape_row(command: str, kind: str):
    setup, needles, fifo = ESCAPES[kind]

    def build(ctx: Ctx) -> Case:
        fisher = ctx.path("f")
        shutil.copytree(ctx.world.sharded, fisher)
        _rewrite_entry(fisher, setup(ctx, fisher))
        all_needles = [f"tensor {TARGET}", "fisher.safetensors.index.json", *needles]
        if command == "mergekit-yaml":
            case = _merge(ctx, ctx.world.recipe([ctx.world.fisher_m, fisher]), *all_needles)
        elif command == "inspect":
            case = Case("inspect", [fisher], all_needles)
        elif command == "explain":
            case = Case(
                "explain",
                [
                    write_recipe(
                        ctx.world.recipe([ctx.world.fisher_m, fisher]), ctx.path("recipe.yml")
                    )
                ],
                all_needles,
            )
        else:  # combine
            case = Case("combine", [ctx.world.fisher_m, fisher, ctx.path("out")], all_needles)
        case.fifos = [ctx.path(fifo)] if fifo else []
        return case

    return build


def _rewrite_entry(fisher: str, entry) -> None:
    """The index of the Fisher copy `fisher` names `entry` for TARGET."""
    path = os.path.join(fisher, "fisher.safetensors.index.json")
    with open(path, encoding="utf-8") as fp:
        index = json.load(fp)
    index["weight_map"][TARGET] = entry
    with open(path, "w", encoding="utf-8") as fp:
        json.dump(index, fp)


def _fisher_copy(ctx: Ctx, name: str = "fc") -> str:
    target = ctx.path(name)
    shutil.copytree(ctx.world.fisher_m, target)
    return target


def _bad_config(ctx: Ctx, how: str) -> str:
    fisher = _fisher_copy(ctx)
    config = os.path.join(fisher, "fisher_config.json")
    os.remove(config)
    if how == "non-utf8":
        with open(config, "wb") as fp:
            fp.write(b'{"format": "mergekit-fisher", "model": "caf\xe9"}')
    else:
        os.mkdir(config)
    return fisher


def _data(ctx: Ctx, name: str, content: bytes) -> str:
    path = ctx.path(name)
    with open(path, "wb") as fp:
        fp.write(content)
    return path


def _doctored(ctx: Ctx, **changes) -> str:
    fisher = _fisher_copy(ctx, "doctored")
    config_path = os.path.join(fisher, "fisher_config.json")
    with open(config_path, encoding="utf-8") as fp:
        config = json.load(fp)
    for key, value in changes.items():
        config[key] = value(config[key]) if callable(value) else value
    with open(config_path, "w", encoding="utf-8") as fp:
        json.dump(config, fp)
    return fisher


def _recipe_with(ctx: Ctx, where, key, value, **recipe_changes) -> dict:
    recipe = ctx.world.recipe()
    if where == "shared":
        recipe.setdefault("parameters", {})[key] = value
    else:
        recipe["models"][where]["parameters"][key] = value
    recipe.update(recipe_changes)
    return recipe


def _model_copy(ctx: Ctx, name: str = "mc") -> str:
    target = ctx.path(name)
    shutil.copytree(ctx.world.m, target)
    return target


CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"


def _chat_model(ctx: Ctx) -> str:
    """m with a chat template in its tokenizer: `messages` rows reach their field checks."""
    model = _model_copy(ctx, "chat")
    config_path = os.path.join(model, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as fp:
        config = json.load(fp)
    config["chat_template"] = CHAT_TEMPLATE
    with open(config_path, "w", encoding="utf-8") as fp:
        json.dump(config, fp)
    return model


def _auto_map_model(ctx: Ctx) -> str:
    model = _model_copy(ctx, "remote")
    config_path = os.path.join(model, "config.json")
    with open(config_path, encoding="utf-8") as fp:
        config = json.load(fp)
    # a built-in model_type: transformers would quietly use its own Llama class and ignore the
    # shipped code
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    with open(config_path, "w", encoding="utf-8") as fp:
        json.dump(config, fp)
    marker = ctx.path("remote_code_ran")
    with open(os.path.join(model, "modeling_evil.py"), "w", encoding="utf-8") as fp:
        fp.write(f"open({marker!r}, 'w').close()\n")
    return model


def _pickle_only_model(ctx: Ctx) -> str:
    """m whose only weights are a hostile pytorch_model.bin: refused, never unpickled."""
    model = _model_copy(ctx, "pickled")
    os.remove(os.path.join(model, "model.safetensors"))
    shutil.move(_hostile_pickle(ctx), os.path.join(model, "pytorch_model.bin"))
    return model


def _hostile_pickle(ctx: Ctx) -> str:
    marker = ctx.path("pwned")

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = ctx.path("importance.pt")
    torch.save(
        {"model.embed_tokens.weight": Hostile()}, path
    )  # built only to be refused: never loaded
    return path


def _hold_lock(ctx: Ctx, out: str) -> None:
    """Another run writing OUT: it holds OUT.lock."""
    fd = os.open(out + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"mergekit-fisher output lock (pid 1)\n")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx.extra["lock_fd"] = fd


def _lora(ctx: Ctx, name: str, seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    path = ctx.path(name)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(ctx.world.m), LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.save_pretrained(path)
    return path


def _truncated_model(ctx: Ctx) -> str:
    model = _model_copy(ctx, "truncated")
    weights = os.path.join(model, "model.safetensors")
    with open(weights, "r+b") as fp:
        fp.truncate(os.path.getsize(weights) // 2)
    return model


def _two_fishers_in(ctx: Ctx) -> str:
    folder = ctx.path("fishers")
    os.mkdir(folder)
    shutil.copytree(ctx.world.fisher_m, os.path.join(folder, "a"))
    shutil.copytree(ctx.world.fisher_m, os.path.join(folder, "b"))
    return folder


def _parent_file(ctx: Ctx) -> str:
    with open(ctx.path("afile"), "w", encoding="utf-8") as fp:
        fp.write("a file, not a directory\n")
    return ctx.path("afile", "out")


ROWS: Dict[str, Callable[[Ctx], Case]] = {
    # ---- compute: never destroy inputs
    "compute/out-is-the-model": lambda c: _compute(
        c, _model_copy(c), c.path("mc"), "is the input", c.path("mc"), extra=["--overwrite"]
    ),
    # (a data *file* as OUT_DIR click itself refuses: "is a file"; the Python API:
    # test_estimator_bad_input)
    "compute/out-is-the-data-directory": lambda c: _compute(
        c,
        c.world.m,
        c.path("dd"),
        "is the input",
        data=(
            os.mkdir(c.path("dd")),
            tiny.write_jsonl(c.path("dd", "train.jsonl"), [{"text": "a b"}]),
            c.path("dd"),
        )[2],
        extra=["--overwrite"],
    ),
    "compute/out-contains-the-data": lambda c: _compute(
        c,
        c.world.m,
        c.path("dd"),
        "contains the input",
        data=(os.mkdir(c.path("dd")), tiny.write_jsonl(c.path("dd", "d.jsonl"), [{"text": "a b"}]))[
            1
        ],
        extra=["--overwrite"],
    ),
    "compute/out-inside-the-model": lambda c: _compute(
        c, _model_copy(c), c.path("mc", "fisher"), "lies inside the input"
    ),
    "compute/out-is-the-adapter": lambda c: _compute(
        c,
        c.world.m,
        _lora(c, "lora", 1),
        "is the input",
        extra=["--lora", c.path("lora"), "--overwrite"],
    ),
    "compute/out-is-a-symlink-to-the-model": lambda c: _compute(
        c,
        _model_copy(c),
        (os.symlink(c.path("mc"), c.path("link")), c.path("link"))[1],
        "is the input",
        extra=["--overwrite"],
    ),
    "compute/out-exists": lambda c: _compute(
        c, c.world.m, (os.mkdir(c.path("out")), c.path("out"))[1], "already exists", "--overwrite"
    ),
    "compute/out-parent-is-a-file": lambda c: _compute(
        c, c.world.m, _parent_file(c), "is not a directory", "afile"
    ),
    "compute/out-read-only": lambda c: Case(
        **{
            **_compute(
                c, c.world.m, os.path.join(c.fs("ro"), "out"), "cannot write in", "Read-only"
            ).__dict__,
            "roots": [c.fs("ro")],
        }
    ),
    "compute/disk-full": lambda c: Case(
        **{
            **_compute(
                c, c.world.m, os.path.join(c.fs("full"), "out"), "not enough free space", "free"
            ).__dict__,
            "roots": [c.fs("full")],
        }
    ),
    "compute/another-run-holds-the-lock": lambda c: (
        _hold_lock(c, c.path("out")),
        _compute(
            c,
            c.world.m,
            c.path("out"),
            "another run is writing this output",
            "out.lock",
            extra=["--checkpoint-every", "2"],
        ),
    )[1],
    # ---- compute: data rows
    "compute/text-null": lambda c: _compute(
        c,
        c.world.m,
        c.path("out"),
        'nul.jsonl:2: "text" is null, not a string',
        data=tiny.write_jsonl(c.path("nul.jsonl"), [{"text": "ok"}, {"text": None}]),
        extra=["--no-shuffle"],
    ),
    "compute/text-list": lambda c: _compute(
        c,
        c.world.m,
        c.path("out"),
        'lst.jsonl:1: "text" is a list',
        data=tiny.write_jsonl(c.path("lst.jsonl"), [{"text": ["a", "b"]}]),
    ),
    "compute/prompt-number": lambda c: _compute(
        c,
        c.world.m,
        c.path("out"),
        'num.jsonl:1: "prompt" is a number',
        data=tiny.write_jsonl(c.path("num.jsonl"), [{"prompt": 5, "completion": "x"}]),
    ),
    "compute/message-content-null": lambda c: _compute(
        c,
        _chat_model(c),
        c.path("out"),
        'chat.jsonl:1: message 2 "content" is null, not a string',
        data=tiny.write_jsonl(
            c.path("chat.jsonl"),
            [
                {
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": None},
                    ]
                }
            ],
        ),
    ),
    "compute/data-not-utf8": lambda c: _compute(
        c,
        c.world.m,
        c.path("out"),
        "line 2 is not UTF-8",
        "latin.jsonl",
        data=_data(c, "latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
    ),
    "compute/txt-not-utf8": lambda c: _compute(
        c,
        c.world.m,
        c.path("out"),
        "line 1 is not UTF-8",
        "latin.txt",
        data=_data(c, "latin.txt", b"caf\xe9 au lait\n"),
    ),
    "compute/auto-map-with-a-builtin-model-type": lambda c: (
        lambda model: Case(
            **{
                **_compute(
                    c, model, c.path("out"), "auto_map", "--trust-remote-code", model
                ).__dict__,
                "marker": c.path("remote_code_ran"),
            }
        )
    )(_auto_map_model(c)),
    "compute/missing-model": lambda c: _compute(
        c, c.path("nope"), c.path("out"), "does not exist", c.path("nope")
    ),
    # ---- merge through the stock mergekit-yaml: path escapes
    **{f"merge/index-{kind}": _escape_row("mergekit-yaml", kind) for kind in ESCAPES},
    "merge/config-not-utf8": lambda c: _merge(
        c,
        c.world.recipe([c.world.fisher_m, _bad_config(c, "non-utf8")]),
        "not UTF-8",
        "fisher_config.json",
    ),
    "merge/config-is-a-directory": lambda c: _merge(
        c,
        c.world.recipe([c.world.fisher_m, _bad_config(c, "dir")]),
        "is a directory",
        "fisher_config.json",
    ),
    # ---- merge: strict recipes (merge/recipe.py, preflight.py, resolution.py)
    "merge/typo-fisher_normalise": lambda c: _merge(
        c,
        _recipe_with(c, "shared", "fisher_normalise", "l2"),
        "`fisher_normalise`",
        "did you mean `fisher_normalize`",
    ),
    "merge/typo-fisher_flor": lambda c: _merge(
        c,
        _recipe_with(c, "shared", "fisher_flor", 0.1),
        "`fisher_flor`",
        "did you mean `fisher_floor`",
    ),
    "merge/typo-wieght": lambda c: _merge(
        c, _recipe_with(c, 1, "wieght", 2.0), "`wieght`", "did you mean `weight`"
    ),
    "merge/fisher_floor-abc": lambda c: _merge(
        c, _recipe_with(c, "shared", "fisher_floor", "abc"), "`fisher_floor`", "'abc'"
    ),
    "merge/fisher-is-a-number": lambda c: _merge(
        c, _recipe_with(c, 0, "fisher", 5), "`fisher:` must be a path"
    ),
    "merge/negative-weight": lambda c: _merge(
        c, _recipe_with(c, 0, "weight", -1.0), "negative weight", "allow_negative_weights"
    ),
    "merge/all-zero-weights": lambda c: _merge(
        c,
        (lambda r: ([m["parameters"].update(weight=0.0) for m in r["models"]], r)[1])(
            c.world.recipe()
        ),
        "sum to 0",
    ),
    "merge/stats-sum-x1e6": lambda c: _merge(
        c,
        c.world.recipe([c.world.fisher_m, _doctored(c, sum=lambda s: s * 1e6)]),
        "global statistics",
        "doctored",
    ),
    "merge/stats-negative-sum": lambda c: _merge(
        c,
        c.world.recipe([c.world.fisher_m, _doctored(c, sum=lambda s: -s)]),
        "global statistics",
        "doctored",
    ),
    "merge/impossible-stats-headers": lambda c: _merge(
        c,
        c.world.recipe(
            [c.world.fisher_m, _doctored(c, sum=lambda s: -s)], fisher_validate="headers"
        ),
        "impossible global statistics",
        "doctored",
    ),
    "merge/adapter-space-fisher": lambda c: _merge(
        c,
        c.world.recipe([c.world.fisher_m, _doctored(c, space="adapter")]),
        "adapter space",
        "--space dense",
        "doctored",
    ),
    "merge/missing-model-path": lambda c: _merge(
        c,
        (lambda r: (r["models"][1].update(model=c.path("no_such_model")), r)[1])(c.world.recipe()),
        "no_such_model",
        "does not exist",
    ),
    "merge/fisher_ties-without-base": lambda c: _merge(
        c, {**c.world.recipe(), "merge_method": "fisher_ties"}, "fisher_ties", "base_model"
    ),
    "merge/lora-without-merge-cache": lambda c: _merge(
        c,
        (lambda r: (r["models"][0].update(model=f"{c.world.m}+{_lora(c, 'lora', 1)}"), r)[1])(
            c.world.recipe()
        ),
        "--lora-merge-cache",
        "base+adapter",
    ),
    "merge/relative-paths-with-a-model-card": lambda c: Case(
        **{
            **_merge(
                c,
                (
                    lambda r: (
                        [m.update(model=os.path.basename(m["model"])) for m in r["models"]],
                        r,
                    )[1]
                )(c.world.recipe()),
                "relative model path",
                "--no-write-model-card",
                card=True,
            ).__dict__,
            "chdir": c.world.root,
        }
    ),
    # ---- merge: provenance, strict
    "merge/fisher-of-another-model": lambda c: _merge(
        c,
        c.world.recipe([c.world.fisher_m, c.world.fisher_m], fisher_provenance="error"),
        "the Fisher was computed for model",
        f"is used for model {c.world.m2}",
        "the model differs",
        "fisher_m",
    ),
    "merge/fisher-of-another-model-same-directory-name": lambda c: (
        lambda other: _merge(
            c,
            c.world.recipe([c.world.fisher_m, other], fisher_provenance="error"),
            "the model differs",
            f"is used for model {c.world.m2}",
        )
    )(_renamed_model_fisher(c)),
    "merge/fisher-of-another-adapter": lambda c: _adapter_row(c),
    # ---- inspect
    **{
        f"inspect/index-{kind}": _escape_row("inspect", kind)
        for kind in ("dotdot", "absolute", "absolute-fifo", "symlink-out", "fifo", "integer")
    },
    "inspect/config-not-utf8": lambda c: Case(
        "inspect", [_bad_config(c, "non-utf8")], ["not UTF-8", "fisher_config.json"]
    ),
    "inspect/config-is-a-directory": lambda c: Case(
        "inspect", [_bad_config(c, "dir")], ["is a directory", "fisher_config.json"]
    ),
    # ---- explain
    "explain/not-yaml": lambda c: Case(
        "explain", [_data(c, "r.yml", b"models: [unclosed\n  - {\n")], ["not valid YAML", "r.yml"]
    ),
    "explain/binary-file": lambda c: Case(
        "explain", [_data(c, "r.yml", b"\x00\x01\x02")], ["not valid YAML", "r.yml"]
    ),
    "explain/no-models": lambda c: Case(
        "explain",
        [_data(c, "r.yml", b"merge_method: fisher\ndtype: float32\n")],
        ["invalid recipe", "models", "r.yml"],
    ),
    "explain/typo": lambda c: Case(
        "explain",
        [write_recipe(_recipe_with(c, "shared", "fisher_normalise", "l2"), c.path("r.yml"))],
        ["did you mean `fisher_normalize`"],
    ),
    **{f"explain/index-{kind}": _escape_row("explain", kind) for kind in ("dotdot", "fifo")},
    # ---- combine
    "combine/out-is-an-input": lambda c: (
        lambda a: Case("combine", [a, c.world.fisher_m, a, "--overwrite"], ["is the input", a])
    )(_fisher_copy(c, "a")),
    "combine/out-contains-the-inputs": lambda c: (
        lambda d: Case(
            "combine",
            [os.path.join(d, "a"), os.path.join(d, "b"), d, "--overwrite"],
            ["contains the input", d],
        )
    )(_two_fishers_in(c)),
    "combine/different-models": lambda c: Case(
        "combine",
        [c.world.fisher_m, c.world.fisher_m2, c.path("out")],
        ["different models", "--allow-different-models", c.world.m2],
    ),
    **{f"combine/index-{kind}": _escape_row("combine", kind) for kind in ("dotdot", "symlink-out")},
    "combine/out-parent-is-a-file": lambda c: Case(
        "combine",
        [c.world.fisher_m, c.world.fisher_m, _parent_file(c)],
        ["is not a directory", "afile"],
    ),
    "combine/disk-full": lambda c: Case(
        "combine",
        [c.world.fisher_m, c.world.fisher_m, os.path.join(c.fs("full"), "out")],
        ["not enough free space"],
        roots=[c.fs("full")],
    ),
    "combine/read-only": lambda c: Case(
        "combine",
        [c.world.fisher_m, c.world.fisher_m, os.path.join(c.fs("ro"), "out")],
        ["cannot write in", "Read-only"],
        roots=[c.fs("ro")],
    ),
    "combine/another-run-holds-the-lock": lambda c: (
        _hold_lock(c, c.path("out")),
        Case(
            "combine",
            [c.world.fisher_m, c.world.fisher_m, c.path("out")],
            ["another run", "out.lock"],
        ),
    )[1],
    # ---- convert
    "convert/hostile-pickle": lambda c: Case(
        "convert",
        [_hostile_pickle(c), c.path("out"), "--model", c.world.m],
        ["refusing it", "never unpickles", "importance.pt"],
        marker=c.path("pwned"),
    ),
    "convert/out-is-the-input": lambda c: (
        lambda src: Case(
            "convert", [src, src, "--model", c.world.m, "--overwrite"], ["is the input", src]
        )
    )((save_file(c.world.values, c.path("in.safetensors")), c.path("in.safetensors"))[1]),
    "convert/out-is-the-model": lambda c: (
        lambda model: Case(
            "convert",
            [c.world.fisher_m, model, "--model", model, "--overwrite"],
            ["is the input", model],
        )
    )(_model_copy(c)),
    "convert/out-parent-is-a-file": lambda c: Case(
        "convert",
        [c.world.fisher_m, _parent_file(c), "--model", c.world.m],
        ["is not a directory", "afile"],
    ),
    "convert/disk-full": lambda c: Case(
        "convert",
        [c.world.fisher_m, os.path.join(c.fs("full"), "out"), "--model", c.world.m],
        ["not enough free space"],
        roots=[c.fs("full")],
    ),
    # ---- eval
    "eval/pickle-only-model": lambda c: (
        lambda model: Case(
            "eval",
            [model, "--data", c.world.data],
            ["pickle-only", "refusing to unpickle", model],
            marker=c.path("pwned"),
        )
    )(_pickle_only_model(c)),
    "eval/truncated-model": lambda c: (
        lambda model: Case("eval", [model, "--data", c.world.data], ["model.safetensors", model])
    )(_truncated_model(c)),
    "eval/data-not-utf8": lambda c: Case(
        "eval",
        [c.world.m, "--data", _data(c, "latin.jsonl", b'{"text": "\xe9"}\n')],
        ["line 1 is not UTF-8", "latin.jsonl"],
    ),
    "eval/txt-not-utf8": lambda c: Case(
        "eval",
        [c.world.m, "--data", _data(c, "latin.txt", b"ok\n\xe9\n")],
        ["line 2 is not UTF-8", "latin.txt"],
    ),
    "eval/text-null": lambda c: Case(
        "eval",
        [c.world.m, "--data", tiny.write_jsonl(c.path("n.jsonl"), [{"text": None}])],
        ['n.jsonl:1: "text" is null, not a string'],
    ),
}


def _renamed_model_fisher(ctx: Ctx) -> str:
    """A Fisher recorded for another model whose directory has the same last component as the
    recipe's m2:
    the old basename comparison let it through; the fingerprint does not."""
    elsewhere = ctx.path("elsewhere", os.path.basename(ctx.world.m2))
    shutil.copytree(ctx.world.m, elsewhere)  # the weights of m, under m2's name
    fisher = ctx.path("fisher_elsewhere")
    write_fisher(ctx.world.values, fisher, FisherConfig(**_identity(elsewhere), num_examples=3))
    shutil.rmtree(
        ctx.path("elsewhere")
    )  # the model is gone: only the fingerprint says whose Fisher it is
    return fisher


def _adapter_row(ctx: Ctx) -> Case:
    """A Fisher computed for base+A, used for base+B (strict provenance)."""
    a, b = _lora(ctx, "lora_a", 1), _lora(ctx, "lora_b", 2)
    fisher = ctx.path("fisher_a")
    write_fisher(
        ctx.world.values,
        fisher,
        FisherConfig(
            **{k: v for k, v in model_identity(ctx.world.m, a).items() if v is not None},
            num_examples=3,
        ),
    )
    recipe = ctx.world.recipe([fisher, ctx.world.fisher_m2], fisher_provenance="error")
    recipe["models"][0]["model"] = f"{ctx.world.m}+{b}"
    os.makedirs(ctx.path("scratch", "cache"))
    return _merge(
        ctx,
        recipe,
        "the adapter differs",
        f"adapter {a}",
        f"adapter {b}",
        extra=["--lora-merge-cache", ctx.path("scratch", "cache")],
    )


def _invoke(case: Case):
    if case.command == "mergekit-yaml":
        from mergekit.scripts.run_yaml import main as command

        from mergekit_fisher.merge.registry import ensure_registered

        ensure_registered()
        return CliRunner().invoke(command, case.args)
    from mergekit_fisher.cli import main

    return CliRunner().invoke(main, [case.command, *case.args])


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_bad_input(row, world, filesystems, tmp_path, monkeypatch):
    ctx = Ctx(world, str(tmp_path / "row"), filesystems)
    os.makedirs(ctx.dir)
    try:
        case = ROWS[row](ctx)
        if case.chdir:
            monkeypatch.chdir(case.chdir)
        watched = ("scratch",)
        roots = [ctx.dir, world.root, *case.roots]
        before = {
            k: v for k, v in snapshot(*roots).items() if not any(f"/{w}" in k for w in watched)
        }
        watches = [
            FifoWatch(path, str(tmp_path / f"opened-{i}")) for i, path in enumerate(case.fifos)
        ]
        for watch in watches:
            watch.__enter__()
        try:
            result = _invoke(case)
        finally:
            for watch in watches:
                watch.__exit__()
        after = {
            k: v for k, v in snapshot(*roots).items() if not any(f"/{w}" in k for w in watched)
        }
    finally:
        if "lock_fd" in ctx.extra:
            os.close(ctx.extra["lock_fd"])
    output = result.output
    assert result.exit_code == 2, (result.exit_code, output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(
        result.exception
    )  # a clean exit, not a crash
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "Error:" in line]
    assert len(errors) == 1, output
    line = errors[0]
    assert line.startswith("Error: ") and "Fix:" in line, line
    for needle in case.needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    # nothing written, nothing changed: the row's folder (its inputs, OUT, OUT.lock, temporaries)
    # and the
    # shared inputs are exactly as they were
    changed = sorted(set(before) ^ set(after)) + sorted(
        k for k in before if k in after and before[k] != after[k]
    )
    assert not changed, changed
    for watch in watches:
        assert not watch.opened, f"{watch.path} was opened"
    if case.marker:
        assert not os.path.exists(case.marker), "the hostile input ran code"


def test_the_table_covers_every_command_and_enough_rows():
    commands = {row.split("/")[0] for row in ROWS}
    assert commands == {"compute", "merge", "inspect", "explain", "combine", "convert", "eval"}
    assert len(ROWS) >= 40


# ---------------------------------------------------------------- beyond the table: what is
# checked, and how
class Captured(logging.Handler):
    """Warnings of one logger, whatever the propagation settings of the command line left behind."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def _resharded(source: str, target: str) -> str:
    """The same weights in two shards with an index (what `save_pretrained(max_shard_size=...)`
    writes)."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(source, "model.safetensors"))
    names = sorted(state)
    os.makedirs(target)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file(
            {k: state[k] for k in keys}, os.path.join(target, shard), metadata={"format": "pt"}
        )
        weight_map.update({k: shard for k in keys})
    with open(os.path.join(target, "model.safetensors.index.json"), "w", encoding="utf-8") as fp:
        json.dump({"metadata": {}, "weight_map": weight_map}, fp)
    shutil.copy(os.path.join(source, "config.json"), target)
    return target


def test_fingerprint_follows_the_weights_not_the_path_or_the_layout(world, tmp_path):
    from safetensors.torch import load_file

    from mergekit_fisher.tools.checkpoint import model_fingerprint

    original = model_fingerprint(world.m)
    copy = str(tmp_path / "copy" / os.path.basename(world.m))
    shutil.copytree(world.m, copy)
    assert model_fingerprint(copy) == original  # copied elsewhere: the same model
    assert (
        model_fingerprint(_resharded(world.m, str(tmp_path / "sharded"))) == original
    )  # re-sharded: the same
    assert (
        model_fingerprint(world.m2) != original
    )  # a fine-tune of the same architecture: another model
    # a LoRA merged into one projection of one layer (a dense rank-2 update), everything else
    # identical
    state = load_file(os.path.join(world.m, "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    generator = torch.Generator().manual_seed(3)
    out_dim, in_dim = state[name].shape
    state[name] = state[name] + 0.01 * torch.randn(out_dim, 2, generator=generator) @ torch.randn(
        2, in_dim, generator=generator
    )
    merged = str(tmp_path / "merged")
    shutil.copytree(world.m, merged)
    save_file(state, os.path.join(merged, "model.safetensors"), metadata={"format": "pt"})
    assert model_fingerprint(merged) != original


def test_compute_records_the_model_and_adapter_identity(world, tmp_path):
    from estimator_helpers import compute

    from mergekit_fisher.fisher_file import open_fisher
    from mergekit_fisher.tools.checkpoint import model_fingerprint

    ctx = Ctx(world, str(tmp_path), {})
    adapter = _lora(ctx, "lora", 1)
    link = str(tmp_path / "model_link")
    os.symlink(world.m, link)  # the path as given and the resolved path differ
    compute(
        link, str(tmp_path / "out"), world.data, lora=adapter, fisher_type="empirical", batch_size=2
    )
    config = open_fisher(str(tmp_path / "out")).config
    assert (config.model, config.model_path) == (link, os.path.realpath(world.m))
    assert config.model_fingerprint == model_fingerprint(
        world.m
    ) and config.model_fingerprint.startswith("w2:")
    assert (config.adapter, config.adapter_path) == (adapter, os.path.realpath(adapter))
    assert config.adapter_fingerprint == model_fingerprint(adapter) != config.model_fingerprint


def test_fingerprint_sees_one_changed_element_of_an_adapter_factor(tmp_path):
    """Small tensors (LoRA factors) are hashed whole: two adapters that differ in one element of
    one factor, away from the start, middle and end, have different fingerprints."""
    from safetensors.torch import save_file

    from mergekit_fisher.tools.checkpoint import model_fingerprint

    factor = torch.randn(16, 4096, generator=torch.Generator().manual_seed(0))  # 256 KiB
    paths = []
    for index, value in enumerate((0.0, 1e-3)):
        changed = factor.clone()
        changed[3, 77] += value
        path = tmp_path / f"adapter{index}"
        path.mkdir()
        save_file({"base_model.model.q_proj.lora_A.weight": changed}, str(path / "a.safetensors"))
        paths.append(str(path))
    first, second = (model_fingerprint(p) for p in paths)
    assert first != second and first.startswith("w2:")
    copy = tmp_path / "copy"
    copy.mkdir()
    save_file(
        {"base_model.model.q_proj.lora_A.weight": factor}, str(copy / "other-name.safetensors")
    )
    assert model_fingerprint(str(copy)) == first  # the same weights elsewhere: the same identity


def test_merge_provenance_warns_by_default_and_knows_a_copy(world, tmp_path):
    from merge_world import run_recipe

    # m2 merged with m's Fisher: a warning naming both, and the merge goes on (fisher_provenance:
    # warn)
    with Captured("mergekit_fisher.merge.provenance") as log:
        run_recipe(world.recipe([world.fisher_m, world.fisher_m]), str(tmp_path / "out1"))
    mismatch = [m for m in log.messages if "was computed for model" in m]
    assert len(mismatch) == 1, log.messages  # once, not once per tensor
    assert (
        f"model {world.m} [weights" in mismatch[0]
        and f"used for model {world.m2} [weights" in mismatch[0]
    )
    # a Fisher computed for a copy of m2 elsewhere (same weights): no warning
    copy = str(tmp_path / "copy_of_m2")
    shutil.copytree(world.m2, copy)
    fisher = str(tmp_path / "fisher_of_copy")
    write_fisher(world.values, fisher, FisherConfig(**_identity(copy), num_examples=3))
    shutil.rmtree(copy)
    with Captured("mergekit_fisher.merge.provenance") as log:
        run_recipe(world.recipe([world.fisher_m, fisher]), str(tmp_path / "out2"))
    assert log.messages == []
    # a Fisher with no config: cannot be checked, says so
    bare = str(tmp_path / "bare.safetensors")
    save_file(world.values, bare)
    with Captured("mergekit_fisher.merge.provenance") as log:
        run_recipe(world.recipe([world.fisher_m, bare]), str(tmp_path / "out3"))
    assert [m for m in log.messages if "records no model" in m and bare in m], log.messages


def test_combine_of_different_models_with_the_override(world, tmp_path):
    from mergekit_fisher.cli import main
    from mergekit_fisher.fisher_file import open_fisher

    out = str(tmp_path / "out")
    result = CliRunner().invoke(
        main, ["combine", world.fisher_m, world.fisher_m2, out, "--allow-different-models"]
    )
    assert result.exit_code == 0, result.output
    assert "different models" in result.output  # said, not silent
    combined = open_fisher(out)
    assert (
        combined.config.model is None and combined.config.model_fingerprint is None
    )  # a Fisher of neither
    assert sorted(combined.config.model_extra["models"]) == sorted([world.m, world.m2])
    torch.testing.assert_close(
        combined.get_tensor(TARGET), world.values[TARGET]
    )  # equal weights, equal values


def test_convert_records_its_origin_and_the_model(world, tmp_path):
    from mergekit_fisher.cli import main
    from mergekit_fisher.fisher_file import open_fisher
    from mergekit_fisher.tools.checkpoint import model_fingerprint

    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["convert", world.fisher_m2, out, "--model", world.m])
    assert result.exit_code == 0, result.output
    assert (
        f"records model {world.m2}" in result.output
        and f"converted for model {world.m}" in result.output
    )
    config = open_fisher(out).config
    assert config.model_extra["origin"] == {
        "path": world.fisher_m2,
        "format": "mergekit-fisher v1",
        "files": ["fisher.safetensors"],
        "model": world.m2,
        "model_fingerprint": model_fingerprint(world.m2),
    }
    assert config.model_fingerprint == model_fingerprint(world.m)
    torch.save({"module." + TARGET: world.values[TARGET]}, tmp_path / "plain.pt")
    result = CliRunner().invoke(
        main, ["convert", str(tmp_path / "plain.pt"), str(tmp_path / "out2"), "--model", world.m]
    )
    assert result.exit_code == 0, result.output
    assert open_fisher(str(tmp_path / "out2")).config.model_extra["origin"] == {
        "path": str(tmp_path / "plain.pt"),
        "format": "torch.save",
        "files": ["plain.pt"],
    }


def test_nan_found_while_merging_leaves_no_output(world, tmp_path):
    """`fisher_validate: headers` with plausible recorded statistics but a NaN value: found only
    when the
    tensor is loaded, after mergekit has created OUT."""
    values = {k: v.clone() for k, v in world.values.items()}
    values["lm_head.weight"][0, 0] = float("nan")
    fisher = str(tmp_path / "nan")
    write_fisher(values, fisher, FisherConfig(model=world.m2))
    shutil.copy(
        os.path.join(world.fisher_m2, "fisher_config.json"),
        os.path.join(fisher, "fisher_config.json"),
    )
    ctx = Ctx(world, str(tmp_path), {})
    case = _merge(
        ctx, world.recipe([world.fisher_m, fisher], fisher_validate="headers"), "non-finite"
    )
    result = _invoke(case)
    assert result.exit_code == 2 and "non-finite" in result.output, result.output
    assert not os.path.exists(ctx.path("out")), os.listdir(ctx.path("out"))
