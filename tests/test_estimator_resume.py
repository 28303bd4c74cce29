"""Checkpoint / resume: an interrupted run leaves no output, only a checkpoint; rerunning the same
command
finishes it with exactly the Fisher of one uninterrupted run; other options refuse the
checkpoint."""

from __future__ import annotations

import os

import pytest
import tiny
import torch
from estimator_helpers import compute

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.estimator.checkpoint import checkpoint_path
from mergekit_fisher.estimator.runner import ComputeOptions, Interrupted, run_compute
from mergekit_fisher.fisher_file import open_fisher

ROWS = [{"text": t} for t in tiny.CORPUS] + [{"text": "one more line"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("resume")
    model = str(root / "m")
    tiny.make_llama(model, seed=21, tokenizer_dir=tokenizer_dir)
    return {"model": model, "data": tiny.write_jsonl(str(root / "d.jsonl"), ROWS)}


def test_interrupt_then_resume_equals_one_run(world, tmp_path, caplog):
    common = dict(
        fisher_type="sampled", samples=2, batch_size=2, seed=3, progress=False, shuffle=True
    )
    whole = compute(world["model"], str(tmp_path / "whole"), world["data"], **common)

    out = str(tmp_path / "resumed")
    options = ComputeOptions(
        model=world["model"], out_dir=out, data=world["data"], checkpoint_every=4, **common
    )
    with pytest.raises(Interrupted):
        run_compute(options, interrupt_after_rounds=3)  # 3 batches done, checkpoint after 2
    assert not os.path.exists(out)
    assert not [
        n for n in os.listdir(tmp_path) if n.startswith(".resumed")
    ]  # no half-written temp dir
    assert os.path.exists(checkpoint_path(out))

    changed = ComputeOptions(
        model=world["model"],
        out_dir=out,
        data=world["data"],
        checkpoint_every=4,
        **{**common, "seed": 4},
    )
    with pytest.raises(FisherInputError, match="different options"):
        run_compute(changed)

    with caplog.at_level("INFO", logger="mergekit_fisher.estimator.runner"):
        run_compute(options)
    # it says where it resumes: 2 batches of 2 examples were checkpointed
    assert f"resuming from {checkpoint_path(out)}: 2 batches (4 examples) done" in caplog.text
    assert not os.path.exists(checkpoint_path(out))
    resumed = open_fisher(out)
    assert resumed.config.num_examples == len(ROWS)
    assert set(resumed.names()) == set(whole)
    for name in whole:
        assert torch.equal(resumed.get_tensor(name), whole[name]), name


def _tree_bytes(path: str) -> dict:
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fp:
                out[os.path.relpath(os.path.join(root, name), path)] = fp.read()
    return out


def test_resume_refuses_a_model_changed_in_place(world, tmp_path, tokenizer_dir):
    """kill, replace model.safetensors with another model's (same architecture), rerun: refused --
    not a
    Fisher of neither. Put the original back and the same command resumes to exactly the one-run
    Fisher."""
    import shutil

    model = str(tmp_path / "model")
    shutil.copytree(world["model"], model)
    other = str(tmp_path / "other")
    tiny.make_llama(other, seed=22, tokenizer_dir=tokenizer_dir)  # same shapes, other weights
    common = dict(fisher_type="empirical", batch_size=2, seed=3, progress=False, shuffle=True)
    whole = compute(model, str(tmp_path / "whole"), world["data"], **common)

    out = str(tmp_path / "resumed")
    options = ComputeOptions(
        model=model, out_dir=out, data=world["data"], checkpoint_every=2, **common
    )
    with pytest.raises(Interrupted):
        run_compute(options, interrupt_after_rounds=2)
    ckpt = checkpoint_path(out)
    assert os.path.exists(ckpt) and not os.path.exists(out + ".lock")  # the lock goes with the run
    saved = _tree_bytes(str(tmp_path))

    original = os.path.join(str(tmp_path), "original.safetensors")
    os.rename(os.path.join(model, "model.safetensors"), original)
    shutil.copy(os.path.join(other, "model.safetensors"), os.path.join(model, "model.safetensors"))
    with pytest.raises(
        FisherInputError, match="the model's weights changed since the checkpoint was written"
    ):
        run_compute(options)
    assert not os.path.exists(out) and not os.path.exists(out + ".lock")
    with open(ckpt, "rb") as fp:
        assert (
            fp.read() == saved[os.path.relpath(ckpt, str(tmp_path))]
        )  # the checkpoint is kept as it was

    os.replace(original, os.path.join(model, "model.safetensors"))
    run_compute(options)
    assert not os.path.exists(ckpt) and not os.path.exists(out + ".lock")
    resumed = open_fisher(out)
    for name in whole:
        assert torch.equal(resumed.get_tensor(name), whole[name]), name


def test_a_second_run_on_the_same_out_fails_fast_and_keeps_the_checkpoint(world, tmp_path):
    """Two checkpointed runs racing for one OUT: the one that does not hold OUT.lock stops before
    it loads
    anything, and the other's checkpoint is untouched (no stale or mixed checkpoint)."""
    import fcntl
    import time

    out = str(tmp_path / "out")
    options = ComputeOptions(
        model=world["model"],
        out_dir=out,
        data=world["data"],
        checkpoint_every=2,
        fisher_type="empirical",
        batch_size=2,
        progress=False,
    )
    with pytest.raises(Interrupted):
        run_compute(options, interrupt_after_rounds=2)
    with open(checkpoint_path(out), "rb") as fp:
        before = fp.read()
    fd = os.open(out + ".lock", os.O_RDWR | os.O_CREAT, 0o644)  # the first run, still going
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.time()
        with pytest.raises(FisherInputError, match="another run is writing this output"):
            run_compute(options)
        assert time.time() - started < 5  # fails fast: nothing loaded, nothing computed
    finally:
        os.close(fd)
    with open(checkpoint_path(out), "rb") as fp:
        assert fp.read() == before
    assert not os.path.exists(out)
    run_compute(options)  # the lock released (its holder gone): the run resumes and finishes
    assert open_fisher(out).config.num_examples == len(ROWS) and not os.path.exists(
        checkpoint_path(out)
    )
