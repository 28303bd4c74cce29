"""The Python API, for notebooks and training scripts: the same work as the CLI, without a shell.

    import mergekit_fisher as mf

    mf.compute_fisher(
        "/models/llama-math", "/fisher/math", data="math_train.jsonl", num_examples=512
    )
    fisher = mf.open_fisher("/fisher/math")          # lazy, tensor by tensor
    fisher.get_tensor("model.layers.0.mlp.up_proj.weight")
    mf.register()                                      # Fisher methods in mergekit's run_merge

Each function imports torch / mergekit only when called, so `import mergekit_fisher` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergekit_fisher.fisher_file import FisherConfig, FisherFile


def compute_fisher(model: str, out_dir: str, data: str, **options: Any) -> "FisherConfig":
    """Estimate the diagonal Fisher of `model` on `data` and write it to `out_dir` (format v1).

    `options` are `mergekit-fisher compute`'s, as Python names (`num_examples=512`,
    `fisher_type="empirical"`, `lora="/adapters/a"`, `batch_size=4`, ...; see
    `mergekit_fisher.estimator.runner.ComputeOptions`). Returns the written file's provenance.
    Under `accelerate launch`, call it on every process: it returns None on all but the main one.
    """
    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

    return run_compute(ComputeOptions(model=model, out_dir=out_dir, data=data, **options))


def open_fisher(path: str) -> "FisherFile":
    """Open a Fisher file or directory for lazy reading (validated headers, never unpickles)."""
    from mergekit_fisher.fisher_file import open_fisher as _open_fisher

    return _open_fisher(path)


def register() -> None:
    """Register the Fisher merge methods with mergekit in this process (idempotent).

    Needed only where the `.pth` start-up hook is off (`MERGEKIT_FISHER_NO_HOOK=1`, `python -S`).
    """
    from mergekit_fisher.merge.registry import register as _register

    _register()
