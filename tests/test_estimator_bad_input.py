"""Every bad input: one clear `Error: ...` (exit 2, FisherInputError), naming what is wrong,
nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import tiny
import torch
from click.testing import CliRunner

from mergekit_fisher.estimator.cli import compute as compute_command


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("bad")
    lm, cls, other = str(root / "lm"), str(root / "cls"), str(root / "other")
    tiny.make_llama(lm, seed=1, tokenizer_dir=tokenizer_dir)
    tiny.make_llama(other, seed=1, hidden=48, tokenizer_dir=tokenizer_dir)
    tiny.make_llama_classifier(cls, seed=2, num_labels=3, tokenizer_dir=tokenizer_dir)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    adapter = str(root / "adapter")
    get_peft_model(
        LlamaForCausalLM.from_pretrained(lm), LoraConfig(r=2, target_modules=["q_proj"])
    ).save_pretrained(adapter)
    return {
        "root": root,
        "lm": lm,
        "cls": cls,
        "other": other,
        "adapter": adapter,
        "data": tiny.write_jsonl(str(root / "d.jsonl"), [{"text": t} for t in tiny.CORPUS[:3]]),
    }


def run_cli(args):
    return CliRunner().invoke(compute_command, [*map(str, args), "--no-progress"])


def expect_error(world, tmp_path, args, *needles):
    out = tmp_path / "out"
    result = run_cli([args[0], out, *args[1:]])
    assert result.exit_code == 2, (result.output, result.exception)
    last = result.output.strip().splitlines()[
        -1
    ]  # above it: transformers' own loading progress bars
    assert last.startswith("Error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in last, last
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
    return last


def test_missing_model(world, tmp_path):
    expect_error(
        world,
        tmp_path,
        [str(tmp_path / "nope"), "--data", world["data"]],
        "model directory does not exist",
        str(tmp_path / "nope"),
    )


def test_missing_adapter(world, tmp_path):
    expect_error(
        world,
        tmp_path,
        [world["lm"], "--data", world["data"], "--lora", str(tmp_path / "noad")],
        "adapter not found",
        "noad",
    )


def test_missing_empty_and_unreadable_data(world, tmp_path):
    expect_error(
        world,
        tmp_path,
        [world["lm"], "--data", str(tmp_path / "none.jsonl")],
        "does not exist",
        f"data file {tmp_path / 'none.jsonl'}",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    expect_error(
        world, tmp_path, [world["lm"], "--data", empty], "no examples", f"data file {empty}"
    )
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n')
    expect_error(
        world,
        tmp_path,
        [world["lm"], "--data", broken],
        "line 2 is not valid JSON",
        f"data file {broken}",
    )
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.bin").write_bytes(b"\0\1")
    expect_error(
        world,
        tmp_path,
        [world["lm"], "--data", folder],
        "cannot load the data",
        f"data file {folder}",
    )


def test_unknown_fields(world, tmp_path):
    data = tiny.write_jsonl(str(tmp_path / "u.jsonl"), [{"text": "a b c", "labelz": 1}])
    expect_error(
        world, tmp_path, [world["lm"], "--data", data], "unknown field(s) ['labelz']", "u.jsonl:1"
    )
    data = tiny.write_jsonl(str(tmp_path / "v.jsonl"), [{"content": "a b c"}])
    expect_error(world, tmp_path, [world["lm"], "--data", data], "no usable fields")


def test_no_label_tokens_everywhere_is_an_error_somewhere_is_skipped(world, tmp_path):
    rows = [
        {"prompt": tiny.CORPUS[0], "completion": " x"},
        {"prompt": tiny.CORPUS[1], "completion": " y"},
    ]
    data = tiny.write_jsonl(str(tmp_path / "p.jsonl"), rows)
    expect_error(
        world,
        tmp_path,
        [world["lm"], "--data", data, "--max-length", "4"],
        "none of the 2 examples",
    )
    data = tiny.write_jsonl(str(tmp_path / "q.jsonl"), rows + [{"text": "ok then"}])
    result = run_cli([world["lm"], tmp_path / "fine", "--data", data, "--max-length", "4"])
    assert result.exit_code == 0, result.output
    from mergekit_fisher.fisher_file import open_fisher

    config = open_fisher(str(tmp_path / "fine")).config
    assert (config.num_examples, config.num_skipped, config.num_truncated) == (1, 2, 2)


def test_label_out_of_range(world, tmp_path):
    data = tiny.write_jsonl(
        str(tmp_path / "c.jsonl"), [{"text": "a", "label": 0}, {"text": "b", "label": 3}]
    )
    expect_error(
        world,
        tmp_path,
        [world["cls"], "--data", data, "--task", "seq-cls"],
        "label 3 is out of range",
        "c.jsonl:2",
    )


def test_adapter_for_another_base(world, tmp_path):
    expect_error(
        world,
        tmp_path,
        [world["other"], "--data", world["data"], "--lora", world["adapter"]],
        "does not fit this base model",
        "adapter",
    )


def test_exact_needs_classifier(world, tmp_path):
    expect_error(
        world, tmp_path, [world["lm"], "--data", world["data"], "--fisher-type", "exact"], "seq-cls"
    )


def test_out_of_memory_message(world, tmp_path, monkeypatch):
    from mergekit_fisher.estimator import engine

    def boom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine.FisherEngine, "step", boom)
    expect_error(
        world,
        tmp_path,
        [world["lm"], "--data", world["data"]],
        "out of memory",
        "--batch-size",
        "--max-length",
        "--device-map",
    )


def test_non_finite_weights_name_the_tensor(world, tmp_path):
    from transformers import LlamaForCausalLM

    broken = str(tmp_path / "broken")
    model = LlamaForCausalLM.from_pretrained(world["lm"])
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[3] = float("inf")
    model.save_pretrained(broken)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(world["lm"]).save_pretrained(broken)
    expect_error(
        world,
        tmp_path,
        [broken, "--data", world["data"]],
        "non-finite",
        "tensor model.layers.1.input_layernorm.weight",
    )


def test_overflowing_gradients_name_a_tensor(world, tmp_path):
    """Finite weights and logits, but squared gradients beyond float32: refused, naming a tensor."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    hot = str(tmp_path / "hot")
    model = LlamaForCausalLM.from_pretrained(world["lm"])
    with torch.no_grad():
        model.lm_head.weight[5] = 1e19
    model.save_pretrained(hot)
    AutoTokenizer.from_pretrained(world["lm"]).save_pretrained(hot)
    output = expect_error(
        world,
        tmp_path,
        [hot, "--data", world["data"], "--fisher-type", "empirical"],
        "non-finite (NaN/Inf) gradients",
    )
    assert "tensor model." in output or "tensor lm_head" in output


def test_existing_output_needs_overwrite(world, tmp_path):
    out = tmp_path / "out"
    assert run_cli([world["lm"], out, "--data", world["data"]]).exit_code == 0
    before = (out / "fisher_config.json").read_text()
    result = run_cli([world["lm"], out, "--data", world["data"], "--seed", "9"])
    assert (
        result.exit_code == 2
        and "already exists" in result.output
        and "--overwrite" in result.output
    )
    assert (out / "fisher_config.json").read_text() == before
    assert (
        run_cli([world["lm"], out, "--data", world["data"], "--seed", "9", "--overwrite"]).exit_code
        == 0
    )
    assert '"seed": 9' in (out / "fisher_config.json").read_text()


def test_cli_subprocess_as_the_demo_calls_it(world, tmp_path):
    out = str(tmp_path / "sub")
    command = [
        sys.executable,
        "-m",
        "mergekit_fisher",
        "compute",
        world["lm"],
        out,
        "--data",
        world["data"],
        "--fisher-type",
        "empirical",
        "--num-examples",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "16",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "fisher.safetensors"))
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 2
    assert "Error: output already exists" in second.stderr and "Traceback" not in second.stderr


def test_dora_adapter_refused(world, tmp_path):
    import json
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(world["adapter"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    expect_error(
        world,
        tmp_path,
        [world["lm"], "--data", world["data"], "--lora", dora],
        "DoRA",
        "merge_and_unload",
    )


CUSTOM_CONFIG = """from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
"""
CUSTOM_MODELING = """from transformers import LlamaForCausalLM

from .configuration_tinycustom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def test_remote_code_needs_trust_remote_code(world, tmp_path, monkeypatch):
    """A checkpoint whose architecture lives in its own Python files (auto_map): refused without
    --trust-remote-code (nothing written), and with it the Fisher equals that of the same weights
    as a Llama."""
    import json
    import shutil

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    custom = tmp_path / "custom"
    shutil.copytree(world["lm"], custom)
    (custom / "configuration_tinycustom.py").write_text(CUSTOM_CONFIG)
    (custom / "modeling_tinycustom.py").write_text(CUSTOM_MODELING)
    config = json.loads((custom / "config.json").read_text())
    config.update(
        model_type="tiny-custom",
        architectures=["TinyCustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_tinycustom.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM",
        },
    )
    (custom / "config.json").write_text(json.dumps(config))

    expect_error(
        world,
        tmp_path,
        [str(custom), "--data", world["data"]],
        "defined by Python files shipped with it",
        "pass --trust-remote-code",
        str(custom),
    )

    from estimator_helpers import compute

    options = dict(fisher_type="empirical", batch_size=2)
    trusted = compute(
        str(custom), str(tmp_path / "trusted"), world["data"], trust_remote_code=True, **options
    )
    plain = compute(world["lm"], str(tmp_path / "plain"), world["data"], **options)
    assert set(trusted) == set(plain)
    for name in plain:
        assert torch.equal(trusted[name], plain[name]), name


@pytest.mark.parametrize(
    "option", ["--batch-size", "--samples", "--max-length", "--num-examples", "--checkpoint-every"]
)
def test_ranges_are_refused_by_click_before_anything_loads(tmp_path, monkeypatch, option):
    """A count below 1 is refused while the options are parsed (click.IntRange): the model path
    does not
    exist, yet the range is what is reported, and the runner (model loading) is never reached."""
    from mergekit_fisher.estimator import runner

    def never(*args, **kwargs):
        raise AssertionError("the runner must not be reached")

    monkeypatch.setattr(runner, "run_compute", never)
    out = tmp_path / "out"
    result = run_cli(
        [tmp_path / "no-such-model", out, "--data", tmp_path / "no-such.jsonl", option, "0"]
    )
    assert result.exit_code == 2, (result.output, result.exception)
    last = result.output.strip().splitlines()[-1]
    assert last == f"Error: Invalid value for '{option}': 0 is not in the range x>=1.", (
        result.output
    )
    assert "does not exist" not in result.output and not out.exists()


def test_batch_size_zero_fails_fast_in_a_fresh_process(tmp_path):
    """The whole command line, as a user runs it: refused before torch is even imported."""
    probe = (
        "import sys, runpy; sys.argv = ['mergekit-fisher', 'compute', sys.argv[1], sys.argv[2], "
        "'--data', 'x.jsonl', '--batch-size', '0']\n"
        "try:\n    runpy.run_module('mergekit_fisher', run_name='__main__')\n"
        "finally:\n    print('torch imported' if 'torch' in sys.modules "
        "else 'torch not imported', file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Error: Invalid value for '--batch-size': 0 is not in the range x>=1." in done.stderr
    assert "torch not imported" in done.stderr and "Traceback" not in done.stderr


def test_quiet_and_verbose(world, tmp_path):
    """-q: no status line and no progress bars (nothing printed at all); -v: debug lines; stdout
    stays empty
    (log messages go to stderr), with the flags after the subcommand or (through `main`) before
    it."""
    from mergekit_fisher.cli import main

    base = [
        world["lm"],
        None,
        "--data",
        world["data"],
        "--fisher-type",
        "empirical",
        "--batch-size",
        "2",
    ]

    def args(out, *extra):
        return [str(a) for a in [base[0], out, *base[2:], *extra]]

    quiet = CliRunner().invoke(compute_command, args(tmp_path / "q", "-q"))
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == "", quiet.output  # neither the `wrote` line nor any progress bar
    quiet_group = CliRunner().invoke(main, ["-q", "compute", *args(tmp_path / "q2")])
    assert quiet_group.exit_code == 0 and quiet_group.output == "", quiet_group.output

    verbose = CliRunner().invoke(compute_command, args(tmp_path / "v", "-v", "--no-progress"))
    assert verbose.exit_code == 0, verbose.output
    assert verbose.stdout == ""
    assert f"debug: loading tokenizer and model {world['lm']}" in verbose.stderr
    assert f"wrote {tmp_path / 'v'}: 3 examples" in verbose.stderr

    default = CliRunner().invoke(compute_command, args(tmp_path / "d", "--no-progress"))
    assert default.exit_code == 0 and default.stdout == ""
    assert (
        f"wrote {tmp_path / 'd'}: 3 examples" in default.stderr and "debug:" not in default.stderr
    )


def test_out_dir_that_is_an_input_is_refused_even_with_overwrite(world, tmp_path):
    """`compute M M --overwrite` or OUT = the data file used to delete the input. (On the command
    line click
    refuses a file as OUT_DIR; the Python API reaches our check.)"""
    import hashlib
    import shutil

    from mergekit_fisher.errors import FisherInputError
    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

    data = str(tmp_path / "d.jsonl")
    shutil.copy(world["data"], data)
    model = str(tmp_path / "model")
    shutil.copytree(world["lm"], model)

    def digest(path):
        parts = (
            [path]
            if os.path.isfile(path)
            else sorted(os.path.join(r, f) for r, _d, fs in os.walk(path) for f in fs)
        )
        return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in parts]

    before = digest(data), digest(model)
    for out, needle in (
        (data, "is the input"),
        (model, "is the input"),
        (str(tmp_path), "contains the input"),
        (os.path.join(model, "fisher"), "lies inside the input"),
    ):
        with pytest.raises(FisherInputError, match=needle):
            run_compute(
                ComputeOptions(model=model, out_dir=out, data=data, overwrite=True, progress=False)
            )
    assert (digest(data), digest(model)) == before
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "model"]
