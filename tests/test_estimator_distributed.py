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


@pytest.mark.slow
def test_interrupted_two_process_run_resumes_with_one(world, tmp_path):
    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

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
        f"t.launch_debug({json.dumps(options)!r}, 2)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "Interrupted" in result.stderr, result.stderr[-3000:]
    assert not os.path.exists(out) and os.path.exists(out + ".checkpoint.safetensors")
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
        print(f"rank {accelerator.process_index}: {error.message}", flush=True)
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
    assert "rank 1: " in result.stdout and "--batch-size" in result.stdout
    assert "rank 0: another process ran out of memory" in result.stdout
    assert not os.path.exists(out)
