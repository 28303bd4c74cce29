"""The estimator loop: load, plan hooks, stream batches (data parallel over accelerate processes),
reduce, write Fisher format v1 atomically; checkpoint and resume on request."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from mergekit_fisher.choices import (
    AccumulatorDtype,
    Dtype,
    FisherType,
    Params,
    Space,
    Statistic,
    Task,
)
from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.estimator import lora as lora_mod
from mergekit_fisher.estimator.checkpoint import (
    checkpoint_identity_state,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from mergekit_fisher.estimator.data import check_data_path, collate, prepare
from mergekit_fisher.estimator.engine import FisherEngine
from mergekit_fisher.estimator.gram import GramEngine, check_gram_options, gram_outputs
from mergekit_fisher.estimator.loading import (
    DTYPES,
    check_model_path,
    checkpoint_names,
    load_model,
    load_tokenizer,
)
from mergekit_fisher.fisher_file import check_output_free, parse_shard_size
from mergekit_fisher.fisher_file.provenance import model_identity
from mergekit_fisher.fisher_file.writer import estimated_size, output_lock
from mergekit_fisher.naming import output_names, to_stored_layout

log = logging.getLogger(__name__)


@dataclass
class ComputeOptions:
    model: str
    out_dir: str
    data: str
    task: Task = Task.CAUSAL_LM
    fisher_type: Optional[FisherType] = None  # default: sampled for LMs, exact for classifiers
    # AT_LEAST_ONE: samples, num_examples, max_length, batch_size, checkpoint_every
    samples: int = 1
    num_examples: Optional[int] = None
    max_length: int = 512
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    lora: Optional[str] = None
    params: Params = Params.ALL
    space: Space = Space.DENSE
    accumulator_dtype: AccumulatorDtype = AccumulatorDtype.FLOAT32
    dtype: Dtype = Dtype.FLOAT32  # model dtype for the computation
    device_map: Optional[str] = None
    checkpoint_every: Optional[int] = None  # examples
    overwrite: bool = False
    trust_remote_code: bool = False
    max_shard_size: str = "5GB"
    progress: bool = True
    statistic: Statistic = Statistic.FISHER  # gram: RegMean's input Grams (estimator/gram.py)

    def resolved_fisher_type(self) -> FisherType:
        if self.fisher_type:
            return FisherType(self.fisher_type)
        return FisherType.EXACT if self.task == Task.SEQ_CLS else FisherType.SAMPLED

    def fingerprint(self, dataset_hash: str) -> str:
        """Everything that changes the result (not the process count, progress, or checkpoint
        cadence)."""
        relevant = asdict(self)
        for key in ("overwrite", "progress", "checkpoint_every", "device_map", "max_shard_size"):
            relevant.pop(key)
        relevant["fisher_type"] = self.resolved_fisher_type()
        if relevant["statistic"] == Statistic.FISHER:
            relevant.pop("statistic")  # Fisher checkpoints written before --statistic still resume
        relevant["dataset_hash"] = dataset_hash
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


AT_LEAST_ONE = ("samples", "num_examples", "max_length", "batch_size", "checkpoint_every")


class Interrupted(RuntimeError):
    """Raised by the test hook `interrupt_after_rounds` to simulate a killed run."""


def _validate(opts: ComputeOptions) -> None:
    if opts.task not in Task.values():
        raise FisherInputError(
            f"unknown --task {opts.task!r}", fix=f"use {' or '.join(Task.values())}"
        )
    if opts.fisher_type is not None and opts.fisher_type not in FisherType.values():
        raise FisherInputError(
            f"unknown --fisher-type {opts.fisher_type!r}",
            fix=f"use {', '.join(FisherType.values())}",
        )
    ftype = opts.resolved_fisher_type()
    if ftype == FisherType.EXACT and opts.task != Task.SEQ_CLS:
        raise FisherInputError(
            "--fisher-type exact sums over every class and is only available for --task seq-cls",
            fix=(
                "use --fisher-type sampled (the true Fisher by Monte Carlo) or empirical for "
                "language models"
            ),
        )
    if opts.space == Space.ADAPTER and not opts.lora:
        raise FisherInputError(
            "--space adapter needs --lora ADAPTER", fix="pass --lora or use --space dense"
        )
    if opts.params == Params.ADAPTER_TARGETS and not opts.lora:
        raise FisherInputError(
            "--params adapter-targets needs --lora ADAPTER", fix="pass --lora or --params all"
        )
    # The command line refuses these while parsing (click.IntRange); this guards the Python API
    # (`mergekit_fisher.compute_fisher`, `ComputeOptions`), which click does not see.
    for name in AT_LEAST_ONE:
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise FisherInputError(f"{name} must be at least 1, got {value}")
    parse_shard_size(opts.max_shard_size)  # fail now, not after hours of computation
    check_gram_options(opts)
    _check_output(opts)
    check_model_path(opts.model)
    if opts.lora and not os.path.exists(os.path.join(opts.lora, "adapter_config.json")):
        raise FisherInputError(
            "adapter not found (expected a directory with adapter_config.json)",
            model=opts.lora,
            fix="pass the PEFT adapter directory saved with `save_pretrained` to --lora",
        )
    check_data_path(opts.data)


def _check_output(opts: ComputeOptions, needed_bytes: Optional[int] = None) -> None:
    """OUT_DIR: free (or --overwrite), none of the inputs, writable, with room for
    `needed_bytes`."""
    check_output_free(
        os.path.abspath(opts.out_dir),
        opts.overwrite,
        fix="choose another OUT_DIR or pass --overwrite",
        inputs=(opts.model, opts.lora, opts.data),
        needed_bytes=needed_bytes,
    )


def _needed_bytes(opts: ComputeOptions, keys, names, params) -> int:
    """The output (float32, one copy per stored name) plus, when checkpointing, the accumulators."""
    output = sum(params[pid].numel() * len(names[key]) for pid, key in keys.items())
    needed = estimated_size(output)
    if opts.checkpoint_every:
        needed += estimated_size(
            sum(params[pid].numel() for pid in keys), DTYPES[opts.accumulator_dtype]
        )
    return needed


@contextlib.contextmanager
def _output_guard(opts: ComputeOptions, accelerator):
    """The main process holds OUT_DIR's lock for the whole run (and re-checks OUT_DIR under it);
    every process learns if it could not, so none waits forever in a collective."""
    failure = None
    lock = contextlib.ExitStack()
    if accelerator.is_main_process:
        try:
            lock.enter_context(output_lock(opts.out_dir))
            _check_output(opts)
        except FisherInputError as error:
            lock.close()
            failure = error
    if accelerator.num_processes > 1:
        failed = _reduce(
            accelerator, torch.tensor([float(failure is not None)], device=accelerator.device)
        )
        if failure is None and float(failed.item()) > 0:
            failure = FisherInputError(
                "the main process could not take the output",
                file=opts.out_dir,
                kind="output",
                fix="see the main process's error",
            )
    if failure is not None:
        raise failure
    with lock:
        yield


def _plan_targets(model, opts: ComputeOptions, stored):
    """key (canonical in-memory name) -> output names, and id(param) -> key, for the wanted
    parameters."""
    aliases: Dict[int, List[str]] = {}
    params: Dict[int, torch.nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
        params[id(param)] = param
    wrappers = lora_mod.lora_wrappers(model) if opts.lora else {}
    # with an adapter, names come from PEFT's module tree (lora.py): base names in the dense space,
    # the adapter file's names in the adapter space; parameters the forward does not use have none
    logical, target_bases = lora_mod.dense_names(model) if opts.lora else ({}, set())
    if opts.lora and opts.space == Space.ADAPTER:
        logical = lora_mod.adapter_names(model)
    keys: Dict[int, str] = {}
    names: Dict[str, List[str]] = {}
    for pid, names_in_model in aliases.items():
        first = names_in_model[0]
        if opts.lora and opts.space == Space.ADAPTER:
            if pid not in logical:
                continue
            out = logical[pid]
        else:
            if opts.lora and pid not in logical:
                continue
            if opts.params == Params.ADAPTER_TARGETS and pid not in target_bases:
                continue
            out = output_names(logical[pid] if opts.lora else names_in_model, stored)
        keys[pid] = first
        names[first] = out
    return keys, names, params, (wrappers if opts.space == Space.DENSE else {})


def _reduce(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return tensor.clone()
    return accelerator.reduce(tensor.clone(), reduction="sum")


def _oom_error(error: Exception) -> FisherInputError:
    return FisherInputError(
        f"out of memory ({str(error).splitlines()[0][:200]})",
        fix=(
            "lower --batch-size or --max-length, or spread the model over GPUs with --device-map "
            "auto"
        ),
    )


@contextlib.contextmanager
def _loading_bars(enabled: bool):
    """transformers' weight-loading progress bars follow ours (-q, --no-progress); restored
    afterwards."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled and was_enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            transformers_logging.enable_progress_bar()


def run_compute(
    opts: ComputeOptions, *, accelerator=None, interrupt_after_rounds: Optional[int] = None
):
    """Compute and write the Fisher; returns the written FisherConfig on the main process (None
    elsewhere)."""
    from accelerate import Accelerator

    _validate(opts)
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with _output_guard(opts, accelerator):
        return _run(opts, accelerator, interrupt_after_rounds)


def _run(opts: ComputeOptions, accelerator, interrupt_after_rounds: Optional[int]):
    from mergekit_fisher.fisher_file import FisherConfig, write_fisher

    # the identity of the weights about to be loaded: recorded in the output, and a resumed
    # checkpoint must have been written for the very same weights
    identity = model_identity(opts.model, opts.lora)
    fisher_type = opts.resolved_fisher_type()
    acc_dtype = DTYPES[opts.accumulator_dtype]

    log.debug(
        "loading tokenizer and model %s (task %s, dtype %s, fisher %s)",
        opts.model,
        opts.task,
        opts.dtype,
        fisher_type,
    )
    with _loading_bars(opts.progress):
        tokenizer = load_tokenizer(
            opts.model, trust_remote_code=opts.trust_remote_code, fallback=opts.lora
        )
        model = load_model(
            opts.model,
            task=opts.task,
            dtype=opts.dtype,
            device_map=opts.device_map,
            trust_remote_code=opts.trust_remote_code,
        )
    if opts.lora:
        model = lora_mod.load_adapter(model, opts.lora, model_name=opts.model)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    if not opts.device_map:
        model.to(accelerator.device)
    device = model.get_input_embeddings().weight.device

    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        pad_id = 0 if pad_id is None else pad_id
        model.config.pad_token_id = pad_id  # seq-cls pooling finds the last real token through it
    num_labels = getattr(model.config, "num_labels", None) if opts.task == Task.SEQ_CLS else None

    data = prepare(
        opts.data,
        tokenizer,
        task=opts.task,
        num_examples=opts.num_examples,
        max_length=opts.max_length,
        seed=opts.seed,
        shuffle=opts.shuffle,
        num_labels=num_labels,
    )

    log.debug(
        "data %s: %d examples of %d rows (%d truncated, %d skipped)",
        opts.data,
        len(data.examples),
        data.num_rows,
        data.num_truncated,
        data.num_skipped,
    )

    stored = checkpoint_names(opts.lora if opts.space == Space.ADAPTER else opts.model)
    keys, names, params, wrappers = _plan_targets(model, opts, stored)
    if not keys:
        raise FisherInputError(
            "no parameters selected", model=opts.model, fix="check --params / --space / --lora"
        )
    if (
        accelerator.is_main_process
    ):  # read-only, OUT's parent a file, disk full: now, not after the computation
        _check_output(opts, _needed_bytes(opts, keys, names, params))
    # --- statistic: gram (estimator/gram.py): forward-only Gram hooks instead of the Fisher
    if opts.statistic == Statistic.GRAM:
        engine = GramEngine(model, keys=keys, accumulator_dtype=acc_dtype, model_name=opts.model)
    else:
        engine = FisherEngine(
            model,
            task=opts.task,
            fisher_type=fisher_type,
            samples=opts.samples,
            seed=opts.seed,
            accumulator_dtype=acc_dtype,
            keys=keys,
            wrappers=wrappers,
            model_name=opts.model,
        )
    accumulator = engine.accumulator
    log.debug(
        "%d parameter tensors selected; %d take the exact per-example fallback",
        len(keys),
        len(engine.fallback_keys()),
    )

    # resume
    fingerprint = opts.fingerprint(data.dataset_hash)
    ckpt = checkpoint_path(opts.out_dir)
    done_batches, num_tokens = 0, 0
    loaded = load_checkpoint(ckpt, fingerprint, identity) if opts.checkpoint_every else None
    if loaded is not None:
        sums, state = loaded
        done_batches = int(state["done_batches"])
        if accelerator.is_main_process:
            accumulator.load_state(sums)
            num_tokens = int(state["num_tokens"])
        log.info("resuming from %s after %d batches", ckpt, done_batches)

    examples = data.examples
    total_batches = math.ceil(len(examples) / opts.batch_size)
    world, rank = accelerator.num_processes, accelerator.process_index
    rounds = math.ceil((total_batches - done_batches) / world)
    progress = None
    if opts.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=len(examples),
            initial=min(len(examples), done_batches * opts.batch_size),
            unit="ex",
            desc="fisher",
            dynamic_ncols=True,
        )
    started, since_checkpoint = time.time(), 0
    try:
        for round_index in range(rounds):
            g = done_batches + round_index * world + rank
            failure = None
            if g < total_batches:
                chunk = examples[g * opts.batch_size : (g + 1) * opts.batch_size]
                batch = collate(chunk, pad_id, opts.task).to(device)
                try:
                    num_tokens += engine.step(batch)
                except torch.OutOfMemoryError as error:
                    failure = _oom_error(error)
                except RuntimeError as error:
                    if "out of memory" not in str(error).lower():
                        raise
                    failure = _oom_error(error)
            if world > 1:
                # Every process learns of a failure in this round, so none waits forever in a later
                # reduce.
                failed = _reduce(
                    accelerator, torch.tensor([float(failure is not None)], device=device)
                )
                if failure is None and float(failed.item()) > 0:
                    failure = FisherInputError(
                        "another process ran out of memory",
                        model=opts.model,
                        fix="lower --batch-size or --max-length, or use --device-map",
                    )
            if failure is not None:
                raise failure
            round_end = min(total_batches, done_batches + (round_index + 1) * world)
            finished = min(len(examples), round_end * opts.batch_size)
            since_checkpoint += world * opts.batch_size
            if progress is not None:
                progress.update(finished - progress.n)  # tqdm's rate and ETA: examples/s
                elapsed = max(1e-9, time.time() - started)
                progress.set_postfix(tok_s=f"{num_tokens * world / elapsed:.0f}", refresh=False)
                progress.refresh()
            if (
                opts.checkpoint_every
                and since_checkpoint >= opts.checkpoint_every
                and round_end < total_batches
            ):
                since_checkpoint = 0
                _save_state(
                    accelerator, accumulator, ckpt, fingerprint, round_end, num_tokens, identity
                )
            if interrupt_after_rounds is not None and round_index + 1 >= interrupt_after_rounds:
                raise Interrupted(f"interrupted after {round_index + 1} rounds (test hook)")
    finally:
        engine.close()
        if progress is not None:
            progress.close()

    sums = {key: _reduce(accelerator, value) for key, value in accumulator.sums.items()}
    total_tokens = int(
        _reduce(accelerator, torch.tensor([num_tokens], dtype=torch.float64, device=device)).item()
    )
    gram = opts.statistic == Statistic.GRAM
    means = {} if gram else {key: value / len(examples) for key, value in sums.items()}
    if gram:  # Grams are written as sums, with their row counts
        fisher, gram_fields = gram_outputs(sums, names, engine.transposed_keys(), opts.model)
    for key, mean in means.items():  # every process holds the reduced sums: all of them stop alike
        if not bool(torch.isfinite(mean).all()):
            raise FisherInputError(
                "non-finite (NaN/Inf) gradients",
                model=opts.model,
                tensor=names[key][0],
                fix=(
                    "check the model weights and data; try --dtype float32 if the model ran in "
                    "half precision"
                ),
            )
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    if not gram:
        fisher: Dict[str, torch.Tensor] = {}
        for key, mean in means.items():
            for name in names[key]:  # tied weights stored under several names get one copy each
                fisher[name] = mean.clone()
        if opts.space != Space.ADAPTER:  # fused in-memory tensors (MoE experts) -> the stored ones
            fisher = to_stored_layout(model, fisher)
    config = FisherConfig(
        **{key: value for key, value in identity.items() if value is not None},
        space=opts.space,
        fisher_type=fisher_type,
        task=opts.task,
        num_examples=len(examples),
        num_tokens=total_tokens,
        dataset=opts.data,
        dataset_hash=data.dataset_hash,
        samples_per_example=opts.samples if fisher_type == FisherType.SAMPLED else None,
        seed=opts.seed,
        accumulator_dtype=opts.accumulator_dtype,
        num_truncated=data.num_truncated,
        num_skipped=data.num_skipped,
        num_rows=data.num_rows,
        max_length=opts.max_length,
        batch_size=opts.batch_size,
        params=str(opts.params),
        model_dtype=str(opts.dtype),
        shuffle=opts.shuffle,
        num_processes=world,
        fallback_tensors=sorted(names[k][0] for k in engine.fallback_keys()),
    )
    if gram:
        config = config.model_copy(
            update={**gram_fields, "fisher_type": None, "samples_per_example": None}
        )
    try:
        written = write_fisher(
            fisher,
            opts.out_dir,
            config,
            max_shard_size=opts.max_shard_size,
            overwrite=opts.overwrite,
        )
        if opts.checkpoint_every and os.path.exists(ckpt):
            os.remove(ckpt)
    finally:
        # the other processes wait here: release them even on failure
        accelerator.wait_for_everyone()
    return written


def _save_state(
    accelerator, accumulator, path, fingerprint, done_batches, num_tokens, identity
) -> None:
    sums = {key: _reduce(accelerator, value) for key, value in accumulator.sums.items()}
    device = next(iter(sums.values())).device
    tokens = int(
        _reduce(accelerator, torch.tensor([num_tokens], dtype=torch.float64, device=device)).item()
    )
    if accelerator.is_main_process:
        save_checkpoint(
            path,
            sums,
            {
                "fingerprint": fingerprint,
                "done_batches": done_batches,
                "num_tokens": tokens,
                **checkpoint_identity_state(identity),
            },
        )
    accelerator.wait_for_everyone()
