"""Recipe checks before mergekit loads anything: the mistakes that otherwise end in its tracebacks.

mergekit's `run_merge` starts with `get_architecture_info`, which opens every model; a missing path,
a delta method without `base_model` or a LoRA reference without `--lora-merge-cache` then fails deep
inside mergekit or transformers (35-65 traceback lines), and a relative model path fails only in the
model-card step, after the weights were written. `check_recipe` runs first (installed in front of
`get_architecture_info` by `registry.patch_merge_entry`, and called by `explain`) and says what to
fix in one `Error:` line. Fisher methods only: other methods keep mergekit's behaviour.
"""

from __future__ import annotations

import os
import re
import shutil

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import registry as mergekit_registry
from mergekit.merge_methods.base import BasePolicy
from mergekit.options import MergeOptions

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.merge.methods import is_plugin_method

# What the Hugging Face Hub accepts as a repository id: "name" or "org/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_path(path: str, what: str, write_card: bool) -> None:
    local = os.path.expanduser(path)
    if os.path.exists(local):
        if not os.path.isabs(local) and write_card:
            raise FisherInputError(
                f"relative {what} path {path!r}: mergekit's model card asks the Hugging Face Hub "
                "about relative paths, after the weights were written",
                kind="recipe",
                fix=f"write it as {os.path.abspath(local)!r}, or pass --no-write-model-card",
            )
        if not os.path.isdir(local):
            raise FisherInputError(
                f"{what} path {path!r} is not a directory",
                kind="recipe",
                fix="point it at a Hugging Face model directory (config.json + weights)",
            )
        return
    if _HUB_ID.match(path) and not path.startswith("."):
        return  # a Hub id: mergekit downloads it (or its cache serves it)
    raise FisherInputError(
        f"{what} {path!r} does not exist (and is not a Hugging Face Hub id)",
        kind="recipe",
        fix="check the path; use an absolute path to a model directory, or `org/name` for the Hub",
    )


def _has_loader(model: ModelReference) -> bool:
    """Whether mergekit's loader cache already serves `model` (`explain`'s lazy adapter loader), in
    which case mergekit never builds the merged copy the cache directory is for."""
    from mergekit.io.tasks import LoaderCache

    return model in LoaderCache().loaders


def check_paths(model: ModelReference, options: MergeOptions) -> None:
    """The model's (and adapter's) path exists, or is a Hub id."""
    _check_path(model.model.path, "model", options.write_model_card)
    if model.lora is not None:
        _check_path(model.lora.path, "LoRA adapter", options.write_model_card)


def check_model(model: ModelReference, options: MergeOptions) -> None:
    check_paths(model, options)
    if model.lora is not None:
        if not options.lora_merge_cache and not _has_loader(model):
            raise FisherInputError(
                f"model {model} is a base+adapter reference, which mergekit merges into a full "
                "model first and needs a cache directory for",
                kind="recipe",
                fix="pass --lora-merge-cache DIR to mergekit-yaml",
            )


def _has_base(config: MergeConfiguration) -> bool:
    if config.base_model is not None:
        return True
    slices = list(config.slices or [])
    for module in (config.modules or {}).values():
        slices.extend(module.slices or [])
    return bool(slices) and all(s.base_model is not None for s in slices)


def check_recipe(config: MergeConfiguration, options: MergeOptions) -> None:
    """Refuse, before anything is loaded, a Fisher recipe that mergekit would fail on later."""
    if not is_plugin_method(config.merge_method):
        return
    method = mergekit_registry.get(config.merge_method)
    if method.spec.contract.base == BasePolicy.REQUIRED and not _has_base(config):
        raise FisherInputError(
            f"{config.merge_method} merges each model's difference from a base model, and the "
            "recipe names none",
            kind="recipe",
            fix="add `base_model: /path/to/base` (the model the others were fine-tuned from), or "
            "use `merge_method: fisher`, which needs no base",
        )
    for model in config.referenced_models():
        check_model(model, options)


def checked_architecture_info(original):
    """`get_architecture_info` with `check_recipe` in front (what run_merge calls first)."""

    def get_architecture_info(config, options, *args, **kwargs):
        check_recipe(config, options)
        return original(config, options, *args, **kwargs)

    get_architecture_info.checks_fisher_recipes = True
    return get_architecture_info


def removing_failed_output(original):
    """`run_merge` that, for a Fisher method, removes the OUT it created if the merge fails.

    A value error found only when a tensor is loaded (`fisher_validate: headers`) stops the merge
    after mergekit's writer created OUT; a directory that was not there before is removed again, so
    a failed merge leaves nothing behind. An OUT that existed before is never touched.
    """

    def run_merge(merge_config, out_path, *args, **kwargs):
        existed = os.path.exists(out_path)
        try:
            return original(merge_config, out_path, *args, **kwargs)
        except BaseException:
            if not existed and is_plugin_method(merge_config.merge_method):
                shutil.rmtree(out_path, ignore_errors=True)
            raise

    run_merge.removes_failed_output = True
    return run_merge
