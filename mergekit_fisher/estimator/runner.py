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
    SaveDtype,
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
    restore_sums,
    save_checkpoint,
)
from mergekit_fisher.estimator.data import (
    DataPlan,
    check_data_path,
    check_rows,
    collate,
    encode_rows,
    no_examples_error,
    plan_data,
)
from mergekit_fisher.estimator.device_plan import auto_device_map, parse_max_memory
from mergekit_fisher.estimator.engine import FisherEngine
from mergekit_fisher.estimator.finalize import check_finite, stream_to_writer
from mergekit_fisher.estimator.gram import GramEngine, check_gram_options, gram_outputs
from mergekit_fisher.estimator.loading import (
    DTYPES,
    check_model_path,
    checkpoint_names,
    load_model,
    load_tokenizer,
)
from mergekit_fisher.estimator.peers import Peers
from mergekit_fisher.estimator.sources import DatasetOptions, Shard, parse_shard
from mergekit_fisher.fisher_file import check_output_free, parse_shard_size
from mergekit_fisher.fisher_file.provenance import model_identity
from mergekit_fisher.fisher_file.writer import (
    FisherWriter,
    estimated_size,
    output_lock,
    write_fisher,
)
from mergekit_fisher.naming import output_names, stored_names, to_stored_layout

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
    save_dtype: SaveDtype = SaveDtype.FLOAT32  # dtype of the stored Fisher
    device_map: Optional[str] = None
    max_memory: Optional[str] = None  # "0=70GiB,1=70GiB": capacity per device for --device-map
    text_field: Optional[str] = None
    subset: Optional[str] = None  # datasets: config name
    split: Optional[str] = None
    revision: Optional[str] = None
    shard: Optional[str] = None  # "I/N"
    streaming: bool = False  # datasets: read as a stream (needs num_examples)
    shuffle_buffer: int = 10_000  # rows in datasets' shuffle buffer, with streaming
    group_by_length: bool = True  # batches of similar-length rows (JSONL/txt): less padding
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

    def data_options(self) -> DatasetOptions:
        return DatasetOptions(subset=self.subset, split=self.split, revision=self.revision)

    def parsed_shard(self) -> Shard:
        return parse_shard(self.shard) if self.shard else Shard()

    def fingerprint(self, dataset_hash: str) -> str:
        """Everything that changes the result (not the process count, progress, or checkpoint
        cadence)."""
        relevant = asdict(self)
        for key in (
            "overwrite",
            "progress",
            "checkpoint_every",
            "device_map",
            "max_memory",
            "max_shard_size",
            "save_dtype",
        ):
            relevant.pop(key)
        relevant["fisher_type"] = self.resolved_fisher_type()
        if relevant["statistic"] == Statistic.FISHER:
            relevant.pop("statistic")  # Fisher checkpoints written before --statistic still resume
        relevant["dataset_hash"] = dataset_hash
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


AT_LEAST_ONE = (
    "samples",
    "num_examples",
    "max_length",
    "batch_size",
    "checkpoint_every",
    "shuffle_buffer",
)


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
    if opts.save_dtype not in SaveDtype.values():
        raise FisherInputError(
            f"unknown --save-dtype {opts.save_dtype!r}",
            fix=f"use {' or '.join(SaveDtype.values())}",
        )
    opts.parsed_shard()
    check_gram_options(opts)
    if opts.max_memory:
        parse_max_memory(opts.max_memory)
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


def _needed_bytes(opts: ComputeOptions, engine, names) -> int:
    """The output (one copy per stored name; a Gram is in x in) plus, when checkpointing, the
    accumulators -- sized from the accumulators themselves."""
    sums = engine.accumulator.sums
    if opts.statistic == Statistic.GRAM:
        output = estimated_size(sum(t.numel() for t in sums.values()))
    else:
        copies = sum(t.numel() * len(names[key]) for key, t in sums.items())
        output = estimated_size(copies, DTYPES[opts.save_dtype])
    if opts.checkpoint_every:
        kept = sum(t.numel() for t in sums.values())
        output += estimated_size(kept, DTYPES[opts.accumulator_dtype])
    return output


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
    elsewhere). With several processes, any failure on any of them stops all of them together
    (`peers.py`): one `Error:` from the main process, `PeerStopped` on the others."""
    from accelerate import Accelerator

    _validate(opts)
    owned = accelerator is None
    if owned:
        try:  # joins the launcher's process group: every process must arrive
            accelerator = Accelerator(cpu=not torch.cuda.is_available())
        except Exception as error:  # DistStoreError, timeouts: a process never joined
            raise FisherInputError(
                f"the processes of this run could not all join ({type(error).__name__}: "
                f"{(str(error).strip().splitlines() or [''])[0][:200]})",
                fix=(
                    "start every process with the same launch command (same --num_machines, "
                    "--num_processes, main process address and port); read the log of the process "
                    "that did not start"
                ),
            ) from None
    peers = Peers(accelerator)
    try:
        with contextlib.ExitStack() as lock:
            # the main process holds OUT_DIR's lock for the whole run (and re-checks it under it)
            with peers.phase("taking the output"):
                if peers.is_main:
                    lock.enter_context(output_lock(opts.out_dir))
                    _check_output(opts)
            return _run(opts, peers, interrupt_after_rounds)
    finally:
        if owned:
            peers.close()


@dataclass
class Counters:
    """What a run has counted so far; the main process's include a resumed checkpoint's."""

    done_batches: int = 0
    num_tokens: int = 0
    num_examples: int = 0
    num_truncated: int = 0
    num_skipped: int = 0

    def as_list(self) -> List[int]:
        return [getattr(self, name) for name in COUNTERS]


COUNTERS = ("done_batches", "num_tokens", "num_examples", "num_truncated", "num_skipped")


def _load(opts: ComputeOptions, device):
    with _loading_bars(opts.progress):
        tokenizer = load_tokenizer(
            opts.model, trust_remote_code=opts.trust_remote_code, fallback=opts.lora
        )
        device_map = opts.device_map
        if device_map == "auto":  # room for the accumulators beside the weights (device_plan.py)
            device_map = auto_device_map(
                opts.model,
                task=opts.task,
                dtype=DTYPES[opts.dtype],
                accumulator_dtype=DTYPES[opts.accumulator_dtype],
                max_memory=parse_max_memory(opts.max_memory) if opts.max_memory else None,
                trust_remote_code=opts.trust_remote_code,
            )
        model = load_model(
            opts.model,
            task=opts.task,
            dtype=opts.dtype,
            device_map=device_map,
            trust_remote_code=opts.trust_remote_code,
        )
    if opts.lora:
        model = lora_mod.load_adapter(model, opts.lora, model_name=opts.model)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
    if not device_map:
        model.to(device)
    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        pad_id = 0 if pad_id is None else pad_id
        model.config.pad_token_id = pad_id  # seq-cls pooling finds the last real token through it
    return tokenizer, model


def _resume(opts, peers, accumulator, fingerprint, identity) -> Counters:
    """The main process alone reads the checkpoint (other nodes may not see the file) and tells
    the others where to start."""
    ckpt = checkpoint_path(opts.out_dir)
    counters = Counters()
    with peers.phase("reading the checkpoint"):
        state = None
        if peers.is_main and opts.checkpoint_every:
            state = load_checkpoint(ckpt, fingerprint, identity)
        if state is not None:
            restore_sums(ckpt, accumulator.sums)
            counters = Counters(**{name: int(state.get(name, 0)) for name in COUNTERS})
            log.info(
                "resuming from %s: %d batches (%d examples) done, written by %s process(es)",
                ckpt,
                counters.done_batches,
                counters.num_examples,
                state.get("num_processes", "?"),
            )
    done_batches = peers.from_main(counters.as_list())[0]
    if not peers.is_main:  # the others start from zero counts at the same position
        counters = Counters(done_batches=done_batches)
    return counters


def _step(run: Run, g: int, counts: Counters) -> None:
    opts = run.opts
    rows, indices = run.plan.batch_rows(g, opts.batch_size)
    encoded = encode_rows(
        rows,
        indices,
        run.tokenizer,
        task=opts.task,
        max_length=opts.max_length,
        strict=run.plan.source.strict,
        num_labels=run.num_labels,
        text_field=opts.text_field,
    )
    counts.num_truncated += encoded.num_truncated
    counts.num_skipped += encoded.num_skipped
    if not encoded.examples:
        return
    batch = collate(encoded.examples, run.pad_id, opts.task).to(run.device)
    try:
        counts.num_tokens += run.engine.step(batch)
    except torch.OutOfMemoryError as error:
        raise _oom_error(error) from None
    except RuntimeError as error:
        if "out of memory" not in str(error).lower():
            raise
        raise _oom_error(error) from None
    counts.num_examples += len(encoded.examples)


def _progress_bar(opts, peers, total: int, initial: int):
    if not (opts.progress and peers.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=min(total, initial), unit="ex", desc="fisher", dynamic_ncols=True
    )


def _engine(opts: ComputeOptions, model, keys, wrappers):
    acc_dtype = DTYPES[opts.accumulator_dtype]
    if opts.statistic == Statistic.GRAM:  # forward-only Gram hooks instead of the Fisher
        return GramEngine(model, keys=keys, accumulator_dtype=acc_dtype, model_name=opts.model)
    return FisherEngine(
        model,
        task=opts.task,
        fisher_type=opts.resolved_fisher_type(),
        samples=opts.samples,
        seed=opts.seed,
        accumulator_dtype=acc_dtype,
        keys=keys,
        wrappers=wrappers,
        model_name=opts.model,
    )


def _run(opts: ComputeOptions, peers: Peers, interrupt_after_rounds: Optional[int]):
    # the identity of the weights about to be loaded: recorded in the output, and a resumed
    # checkpoint must have been written for the very same weights
    identity = model_identity(opts.model, opts.lora)
    fisher_type = opts.resolved_fisher_type()
    log.debug(
        "loading tokenizer and model %s (task %s, dtype %s, fisher %s)",
        opts.model,
        opts.task,
        opts.dtype,
        fisher_type,
    )
    with peers.phase("loading the tokenizer and the model"):
        tokenizer, model = _load(opts, peers.device)
    device = model.get_input_embeddings().weight.device
    pad_id = model.config.pad_token_id
    num_labels = getattr(model.config, "num_labels", None) if opts.task == Task.SEQ_CLS else None
    with peers.phase("reading the data"):
        plan = plan_data(
            opts.data,
            num_examples=opts.num_examples,
            seed=opts.seed,
            shuffle=opts.shuffle,
            shard=opts.parsed_shard(),
            options=opts.data_options(),
            streaming=opts.streaming,
            shuffle_buffer=opts.shuffle_buffer,
            group_batch_size=opts.batch_size if opts.group_by_length else None,
        )
        if peers.is_main:  # every selected row checked now, not hours in
            check_rows(plan, task=opts.task, num_labels=num_labels, text_field=opts.text_field)
    log.debug("data %s: %d of %s rows selected", opts.data, plan.num_selected, plan.num_rows)

    engine = None
    with peers.phase("planning the tensors"):
        stored = checkpoint_names(opts.lora if opts.space == Space.ADAPTER else opts.model)
        keys, names, params, wrappers = _plan_targets(model, opts, stored)
        if not keys:
            raise FisherInputError(
                "no parameters selected", model=opts.model, fix="check --params / --space / --lora"
            )
        engine = _engine(opts, model, keys, wrappers)
        if peers.is_main:  # read-only, OUT's parent a file, disk full: now, not at the end
            _check_output(opts, _needed_bytes(opts, engine, names))
    try:
        fingerprint = opts.fingerprint(plan.dataset_hash)
        counts = _resume(opts, peers, engine.accumulator, fingerprint, identity)
        run = Run(opts, peers, engine, plan, tokenizer, num_labels, pad_id, device)
        _loop(run, counts, fingerprint, identity, interrupt_after_rounds)
    finally:
        engine.close()
    with peers.phase("checking the sums"):
        check_finite(engine.accumulator.sums, names, opts.model)
    totals = Counters(*peers.sum_ints(counts.as_list()))
    if totals.num_examples == 0:
        with peers.phase("counting the examples"):
            if peers.is_main:
                raise no_examples_error(opts.data, totals.num_skipped)
    config = _config(opts, identity, plan, totals, peers, engine, names)
    if opts.statistic == Statistic.GRAM:
        return _write_grams(opts, peers, engine, names, config)
    return _write(opts, peers, engine, model, names, totals, config)


@dataclass
class Run:
    """What every batch of a run needs."""

    opts: ComputeOptions
    peers: Peers
    engine: FisherEngine
    plan: DataPlan
    tokenizer: object
    num_labels: Optional[int]
    pad_id: int
    device: torch.device


def _loop(run: Run, counts: Counters, fingerprint, identity, interrupt_after_rounds) -> None:
    opts, peers, plan = run.opts, run.peers, run.plan
    total_batches = plan.num_batches(opts.batch_size)
    done = counts.done_batches
    rounds = math.ceil((total_batches - done) / peers.world)
    num_selected = plan.num_selected
    progress = _progress_bar(opts, peers, num_selected, done * opts.batch_size)
    started, since_checkpoint = time.time(), 0
    try:
        for round_index in range(rounds):
            g = done + round_index * peers.world + peers.rank
            with peers.phase(f"computing round {round_index + 1} of {rounds}"):
                if g < total_batches:
                    _step(run, g, counts)
            round_end = min(total_batches, done + (round_index + 1) * peers.world)
            since_checkpoint += peers.world * opts.batch_size
            if progress is not None:
                progress.update(min(num_selected, round_end * opts.batch_size) - progress.n)
                elapsed = max(1e-9, time.time() - started)
                rate = counts.num_tokens * peers.world / elapsed
                progress.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
                progress.refresh()
            if (
                opts.checkpoint_every
                and since_checkpoint >= opts.checkpoint_every
                and round_end < total_batches
            ):
                since_checkpoint = 0
                counts.done_batches = round_end
                _save_state(opts, peers, run.engine.accumulator, fingerprint, counts, identity)
            if interrupt_after_rounds is not None and round_index + 1 >= interrupt_after_rounds:
                raise Interrupted(f"interrupted after {round_index + 1} rounds (test hook)")
    finally:
        if progress is not None:
            progress.close()


def _fallback_tensors(opts, engine, names) -> List[str]:
    """The exact-fallback tensors as the checkpoint stores them (a fused MoE expert tensor: its
    per-expert tensors), like the Fisher file's own names."""
    fallback = {names[k][0]: engine.accumulator.sums[k].shape for k in engine.fallback_keys()}
    if opts.space == Space.ADAPTER:
        return sorted(fallback)
    return stored_names(engine.model, fallback, fallback)


def _config(opts, identity, plan, totals: Counters, peers, engine, names):
    from mergekit_fisher.fisher_file import FisherConfig

    fisher_type = opts.resolved_fisher_type()
    source = plan.source
    return FisherConfig(
        **{key: value for key, value in identity.items() if value is not None},
        space=opts.space,
        fisher_type=fisher_type,
        task=opts.task,
        num_examples=totals.num_examples,
        num_tokens=totals.num_tokens,
        dataset=opts.data,
        dataset_hash=plan.dataset_hash,
        dataset_subset=opts.subset,
        dataset_split=getattr(source, "split", None),
        dataset_streamed=opts.streaming or None,
        dataset_revision=opts.revision,
        text_field=opts.text_field,
        shard=opts.shard,
        samples_per_example=opts.samples if fisher_type == FisherType.SAMPLED else None,
        seed=opts.seed,
        accumulator_dtype=opts.accumulator_dtype,
        num_truncated=totals.num_truncated,
        num_skipped=totals.num_skipped,
        num_rows=plan.num_rows,
        max_length=opts.max_length,
        batch_size=opts.batch_size,
        params=str(opts.params),
        model_dtype=str(opts.dtype),
        shuffle=opts.shuffle,
        num_processes=peers.world,
        fallback_tensors=_fallback_tensors(opts, engine, names),
    )


def _write(opts, peers, engine, model, names, totals: Counters, config):
    """Streaming finalization (finalize.py): accumulators + one tensor at most, on every process."""
    writer = None
    with peers.phase("opening the output"):
        if peers.is_main:
            writer = FisherWriter(
                opts.out_dir,
                config,
                dtype=DTYPES[opts.save_dtype],
                max_shard_size=opts.max_shard_size,
                overwrite=opts.overwrite,
            )
    if opts.space == Space.ADAPTER:
        stored_layout = dict
    else:  # fused in-memory tensors (MoE experts) -> the stored ones

        def stored_layout(tensors):
            return to_stored_layout(model, tensors)

    written = None
    try:
        failure = stream_to_writer(
            engine.accumulator.sums,
            peers,
            names=names,
            num_examples=totals.num_examples,
            stored_layout=stored_layout,
            writer=writer,
        )
        with peers.phase("writing the Fisher"):
            if failure is not None:
                raise failure
            if writer is not None:
                written = writer.close()
                ckpt = checkpoint_path(opts.out_dir)
                if opts.checkpoint_every and os.path.exists(ckpt):
                    os.remove(ckpt)
    finally:
        if writer is not None and written is None:
            writer.abort()
    return written


def _write_grams(opts, peers, engine, names, config):
    """`--statistic gram`: every sum reduced onto the main process, then written whole (inputs
    shared by several layers are found by comparing the reduced sums, estimator/gram.py)."""
    sums = engine.accumulator.sums
    for value in sums.values():
        peers.sum_to_main_(value)
    written = None
    with peers.phase("writing the Grams"):
        if peers.is_main:
            tensors, fields = gram_outputs(sums, names, engine.transposed_keys(), opts.model)
            update = {**fields, "fisher_type": None, "samples_per_example": None}
            written = write_fisher(
                tensors,
                opts.out_dir,
                config.model_copy(update=update),
                dtype=DTYPES[opts.save_dtype],
                max_shard_size=opts.max_shard_size,
                overwrite=opts.overwrite,
            )
            ckpt = checkpoint_path(opts.out_dir)
            if opts.checkpoint_every and os.path.exists(ckpt):
                os.remove(ckpt)
    return written


def _save_state(opts, peers, accumulator, fingerprint, counts: Counters, identity) -> None:
    """The checkpoint: every sum reduced onto the main process one tensor at a time (a copy, as
    accumulation goes on), written there alone."""
    ckpt = checkpoint_path(opts.out_dir)
    sums: Dict[str, torch.Tensor] = {}
    for key, value in accumulator.sums.items():
        reduced = peers.sum_to_main_(value.clone()) if peers.world > 1 else value
        if peers.is_main:
            sums[key] = reduced.to("cpu")
        del reduced
    totals = Counters(*peers.sum_ints(counts.as_list()))
    with peers.phase("writing the checkpoint"):
        if peers.is_main:
            state = {
                "fingerprint": fingerprint,
                **{name: getattr(totals, name) for name in COUNTERS},
                "done_batches": counts.done_batches,
                "num_processes": peers.world,
                **checkpoint_identity_state(identity),
            }
            save_checkpoint(ckpt, sums, state)
