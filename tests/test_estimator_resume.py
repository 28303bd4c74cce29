"""Checkpoint / resume: an interrupted run leaves no output, only a checkpoint; rerunning the same command
finishes it with exactly the Fisher of one uninterrupted run; other options refuse the checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

import tiny
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


def test_interrupt_then_resume_equals_one_run(world, tmp_path):
    common = dict(fisher_type="sampled", samples=2, batch_size=2, seed=3, progress=False, shuffle=True)
    whole = compute(world["model"], str(tmp_path / "whole"), world["data"], **common)

    out = str(tmp_path / "resumed")
    options = ComputeOptions(model=world["model"], out_dir=out, data=world["data"], checkpoint_every=4, **common)
    with pytest.raises(Interrupted):
        run_compute(options, interrupt_after_rounds=3)  # 3 batches done, checkpoint after 2
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".resumed")]  # no half-written temp dir
    assert os.path.exists(checkpoint_path(out))

    changed = ComputeOptions(model=world["model"], out_dir=out, data=world["data"], checkpoint_every=4,
                             **{**common, "seed": 4})
    with pytest.raises(FisherInputError, match="different options"):
        run_compute(changed)

    run_compute(options)
    assert not os.path.exists(checkpoint_path(out))
    resumed = open_fisher(out)
    assert resumed.config.num_examples == len(ROWS)
    assert set(resumed.names()) == set(whole)
    for name in whole:
        assert torch.equal(resumed.get_tensor(name), whole[name]), name
