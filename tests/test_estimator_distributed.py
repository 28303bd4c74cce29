"""Data parallel over 2 CPU processes gives the Fisher of 1 process; a run interrupted with 2
processes resumes with 1. The 2-process runs start from a fresh interpreter: `accelerate launch
--multi_gpu` (which runs torchrun; on a machine without GPUs each process falls back to CPU + gloo),
plain `torchrun`, and `accelerate.debug_launcher` (which forks; forking a pytest process whose
OpenMP pool is already running can deadlock, so it is launched from a clean `python -c`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import tiny
import torch
from estimator_helpers import compute

from mergekit_fisher.fisher_file import open_fisher

ROWS = [{"text": t} for t in tiny.CORPUS] + [{"prompt": "odd one", "completion": " out"}]
TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "ACCELERATE_USE_CPU": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}


def _worker(options_dict, interrupt):
    from accelerate import Accelerator

    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    run_compute(
        ComputeOptions(**options_dict), accelerator=accelerator, interrupt_after_rounds=interrupt
    )


def launch_debug(options_json: str, interrupt) -> None:
    """Entry point for the clean interpreter."""
    from accelerate import debug_launcher

    debug_launcher(_worker, args=(json.loads(options_json), interrupt), num_processes=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("dist")
    model = str(root / "m")
    tiny.make_llama(model, seed=31, tie=True, tokenizer_dir=tokenizer_dir)
    return {"model": model, "data": tiny.write_jsonl(str(root / "d.jsonl"), ROWS)}


COMMON = dict(
    fisher_type="sampled",
    samples=2,
    seed=5,
    batch_size=2,
    dtype="float64",
    accumulator_dtype="float64",
    shuffle=True,
)


LAUNCHERS = {
    # `accelerate launch --cpu` goes through mpirun; --multi_gpu goes through torchrun and works on
    # CPUs too
    "accelerate launch": [
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29518",
    ],
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"],
}


# plain torchrun in the default suite (one 2-process run, seconds); the rest are marked slow
@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(name, marks=pytest.mark.slow) if name != "torchrun" else name
        for name in sorted(LAUNCHERS)
    ],
)
def test_two_launched_processes_equal_one(world, tmp_path, launcher):
    one = compute(world["model"], str(tmp_path / "one"), world["data"], **COMMON)
    two_dir = str(tmp_path / "two")
    command = [
        sys.executable,
        *LAUNCHERS[launcher],
        "-m",
        "mergekit_fisher",
        "compute",
        world["model"],
        two_dir,
        "--data",
        world["data"],
        "--fisher-type",
        "sampled",
        "--samples",
        "2",
        "--seed",
        "5",
        "--batch-size",
        "2",
        "--dtype",
        "float64",
        "--accumulator-dtype",
        "float64",
        "--no-progress",
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = open_fisher(two_dir)
    assert two.config.num_processes == 2 and two.config.num_examples == len(ROWS)
    assert set(two.names()) == set(one)
    for name in one:
        torch.testing.assert_close(two.get_tensor(name), one[name], rtol=1e-6, atol=0)


def _interrupted_two_process_run(world, tmp_path, launch: str):
    """The Fisher of an uninterrupted run, and a 2-process run of the same options killed (the
    test hook) after 2 rounds with a checkpoint: (whole, out, options, resume command)."""
    whole = compute(world["model"], str(tmp_path / "whole"), world["data"], **COMMON)
    out = str(tmp_path / "resumed")
    options = dict(
        model=world["model"],
        out_dir=out,
        data=world["data"],
        checkpoint_every=4,
        progress=False,
        **COMMON,
    )
    code = (
        f"import sys; sys.path.insert(0, {TESTS!r}); import test_estimator_distributed as t; "
        f"t.{launch.format(options=repr(json.dumps(options)), interrupt=2)}"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "Interrupted" in result.stderr, result.stderr[-3000:]
    assert not os.path.exists(out) and os.path.exists(out + ".checkpoint.safetensors")
    return whole, out, options, code


@pytest.mark.slow
def test_interrupted_two_process_run_resumes_with_one(world, tmp_path):
    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

    whole, out, options, _ = _interrupted_two_process_run(
        world, tmp_path, "launch_debug({options}, {interrupt})"
    )
    run_compute(ComputeOptions(**options))  # resume with ONE process
    resumed = open_fisher(out)
    for name in whole:
        torch.testing.assert_close(resumed.get_tensor(name), whole[name], rtol=1e-6, atol=0)


def _oom_on_rank_one_worker(options_dict):
    import torch as _torch
    from accelerate import Accelerator

    from mergekit_fisher.errors import FisherInputError
    from mergekit_fisher.estimator import engine as engine_mod
    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

    accelerator = Accelerator(cpu=True)
    if accelerator.process_index == 1:

        def fail(self, batch):
            raise _torch.OutOfMemoryError("CUDA out of memory (simulated)")

        engine_mod.FisherEngine.step = fail
    try:
        run_compute(ComputeOptions(**options_dict), accelerator=accelerator)
    except FisherInputError as error:
        kind = type(error).__name__
        print(f"rank {accelerator.process_index}: {kind}: {error.message}", flush=True)
        return
    raise AssertionError("run_compute should have failed")


def launch_oom(options_json: str) -> None:
    from accelerate import debug_launcher

    debug_launcher(_oom_on_rank_one_worker, args=(json.loads(options_json),), num_processes=2)


@pytest.mark.slow
def test_out_of_memory_on_one_process_stops_every_process(world, tmp_path):
    """No process may wait forever in a collective for one that already failed."""
    out = str(tmp_path / "oom")
    options = dict(model=world["model"], out_dir=out, data=world["data"], progress=False, **COMMON)
    code = (
        f"import sys; sys.path.insert(0, {TESTS!r}); import test_estimator_distributed as t; "
        f"t.launch_oom({json.dumps(options)!r})"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the main process names the process and the cause; the other stops quietly
    assert (
        "rank 0: FisherInputError: process 1 of 2 failed while computing round 1" in result.stdout
    )
    assert "out of memory" in result.stdout and "--batch-size" in result.stdout
    assert "rank 1: PeerStopped" in result.stdout
    assert not os.path.exists(out)


# ---------------------------------------------------------------- in the default suite
POISON = "zebra quiz jukebox"


def _poisoned_model(world, root, others) -> str:
    """A model like the world's with a NaN embedding row for a token of POISON no other row has:
    only the process that gets the POISON row sees non-finite log-likelihoods."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(root / "poisoned")
    # untied: a NaN row of a tied head would make every position's softmax NaN
    tiny.make_llama(str(root / "untied"), seed=31, tie=False, tokenizer_dir=world["model"])
    model = AutoModelForCausalLM.from_pretrained(str(root / "untied"))
    tokenizer = AutoTokenizer.from_pretrained(world["model"])
    seen = {t for text in others for t in tokenizer(text)["input_ids"]}
    token = next(t for t in tokenizer(POISON)["input_ids"] if t not in seen)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_failure_on_one_process_stops_both_with_one_error(world, tmp_path):
    model = _poisoned_model(world, tmp_path, tiny.CORPUS)
    # no shuffle, batch size 1, 2 processes: row 2 (index 1) is batch 1, which process 1 computes
    rows = [{"text": tiny.CORPUS[0]}, {"text": POISON}, *({"text": t} for t in tiny.CORPUS[1:])]
    data = tiny.write_jsonl(str(tmp_path / "poison.jsonl"), rows)
    out = tmp_path / "out"
    command = [
        sys.executable,
        *LAUNCHERS["torchrun"],
        "-m",
        "mergekit_fisher",
        "compute",
        model,
        str(out),
        "--data",
        data,
        "--no-shuffle",
        "--batch-size",
        "1",
        "--fisher-type",
        "empirical",
        "--no-progress",
    ]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("Error: process 1 of 2 failed while computing round 1"), errors
    assert "non-finite" in errors[0] and "model.embed_tokens.weight" in errors[0], errors
    assert "exitcode  : 2" in result.stderr  # the main process exited 2 (torchrun's report)
    assert not out.exists() and not os.path.exists(str(out) + ".lock")


def _resume_worker(options_dict, interrupt, hide_checkpoint_from_rank_one):
    from accelerate import Accelerator

    from mergekit_fisher.estimator import checkpoint as checkpoint_mod
    from mergekit_fisher.estimator import runner as runner_mod

    accelerator = Accelerator(cpu=True)
    if hide_checkpoint_from_rank_one and accelerator.process_index == 1:
        # as on a node without the main node's filesystem: the file is not there for this process
        def unreadable(*args, **kwargs):
            raise AssertionError("only the main process may read the checkpoint")

        checkpoint_mod.load_checkpoint = runner_mod.load_checkpoint = unreadable
        checkpoint_mod.restore_sums = runner_mod.restore_sums = unreadable
    runner_mod.run_compute(
        runner_mod.ComputeOptions(**options_dict),
        accelerator=accelerator,
        interrupt_after_rounds=interrupt,
    )


def launch_resume(options_json: str, interrupt, hide: bool) -> None:
    from accelerate import debug_launcher

    debug_launcher(
        _resume_worker, args=(json.loads(options_json), interrupt, hide), num_processes=2
    )


def test_killed_two_process_run_resumes_with_two_main_reads_the_checkpoint(world, tmp_path):
    whole, out, options, code = _interrupted_two_process_run(
        world, tmp_path, "launch_resume({options}, {interrupt}, False)"
    )
    # resume with 2 processes; process 1 cannot read the checkpoint (the patch fails if it tries)
    code = code.replace(", 2, False)", ", None, True)")
    run = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    resumed = open_fisher(out)
    assert resumed.config.num_examples == len(ROWS) and resumed.config.num_processes == 2
    assert not os.path.exists(out + ".checkpoint.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed.get_tensor(name), whole[name], rtol=1e-6, atol=0)
