"""Shared helpers for the estimator tests (run the estimator in-process, tokenize like the
reference)."""

from __future__ import annotations

import os
from typing import Dict

import torch

from mergekit_fisher.estimator.runner import ComputeOptions, run_compute
from mergekit_fisher.fisher_file import open_fisher

IGNORE = -100


def compute(model_dir: str, out_dir: str, data: str, **options) -> Dict[str, torch.Tensor]:
    options.setdefault("progress", False)
    options.setdefault("shuffle", False)
    run_compute(ComputeOptions(model=model_dir, out_dir=out_dir, data=data, **options))
    fisher = open_fisher(out_dir)
    return {name: fisher.get_tensor(name) for name in fisher.names()}


def lm_reference_examples(tokenizer, rows):
    """(input_ids, labels) exactly as documented: text -> every token; prompt/completion ->
    completion + eos."""
    out = []
    for row in rows:
        if "text" in row:
            ids = tokenizer(row["text"])["input_ids"]
            out.append((ids, list(ids)))
        else:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id
            ]
            out.append((prompt + completion, [IGNORE] * len(prompt) + completion))
    return out


def assert_fisher_close(
    actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rtol: float = 1e-5
):
    """Every tensor: |a - e| <= rtol * |e| + rtol * 1e-3 * max|e| (the tiny absolute part only
    absorbs float32 storage of values ~1e-3 of the tensor's largest)."""
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    for name, value in expected.items():
        value = value.double()
        scale = float(value.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(
            actual[name].double(),
            value,
            rtol=rtol,
            atol=rtol * 1e-3 * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def exists(path: str) -> bool:
    return os.path.exists(path)
