"""Our estimator against the per-example-gradient libraries a user would pick instead.

The same model and batches through: our estimator (`FisherEngine`), opacus `GradSampleModule`,
`torch.func` (`functional_call` + `vmap(grad)`), BackPACK (`SumGradSquared`, where it covers the
model: its coverage is reported), the batch-1 autograd loop and a training step. All give the
diagonal empirical Fisher, mean over examples of the squared per-example gradient of the summed
log-likelihood; each is checked against the loop (max tensor-wise relative difference over the
tensors it covers). Rows are sequence lengths at a fixed token budget per batch; the methods are
interleaved within each repetition, ratios are medians of per-repetition ratios.

    # the peers: pip install -e '.[bench]' and, for BackPACK (its torchvision dependency is unused
    # by SumGradSquared and breaks `import transformers` on CPU-only machines), --no-deps:
    .venv/bin/python -m pip install --no-deps backpack-for-pytorch==1.7.1
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_peers.py --seq 16 64 128 256
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_peers.py --seq 128 --memory
    .venv/bin/python bench/bench_peers.py --device cuda --seq 128 512 1024 --tokens 16384

A method that cannot run the model (an exception) is reported with its error's first line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_compute  # noqa: E402  (the model builder, batches, loop and training step)

METHODS = ["ours", "opacus", "torch.func", "backpack", "loop", "train"]


def _trainable(model, flag: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(flag)


def _named(model):
    return dict(model.named_parameters())  # deduplicated: a tied weight once


def _loss(logits, labels):
    from mergekit_fisher.estimator.objectives import lm_loglik

    return -lm_loglik(logits, labels[:, 1:]).sum()


def run_ours(model, data, args):
    fisher = bench_compute.run_estimator(model, data, args)
    return {name: fisher[name] for name in _named(model)}


def run_loop(model, data, args):
    return dict(zip(_named(model), bench_compute.run_loop(model, data, args)))


def run_train(model, data, args):
    bench_compute.run_train(model, data, args)
    return None


def run_opacus(model, data, args):
    from opacus import GradSampleModule

    named = _named(model)
    _trainable(model, True)
    model.train()  # opacus needs train mode ("No activations detected"); no dropout in these
    wrapped = GradSampleModule(model, loss_reduction="sum", batch_first=True)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
    count = 0
    try:
        for batch in data:
            batch = batch.to(args.device)
            logits = wrapped(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            _loss(logits, batch.labels).backward()
            for name, p in named.items():
                sample = getattr(p, "grad_sample", None)
                if sample is not None:
                    sums[name].add_(sample.float().square().sum(0))
                p.grad_sample = None
                p.grad = None
            count += batch.input_ids.shape[0]
    finally:
        wrapped._close()
        model.eval()
        _trainable(model, False)
    return {name: value / count for name, value in sums.items()}


def run_functorch(model, data, args):
    from torch.func import functional_call, grad, vmap

    named = _named(model)
    params = {name: p.detach() for name, p in named.items()}
    buffers = dict(model.named_buffers())

    # no attention mask: HF's padding-mask construction is data-dependent, which vmap refuses;
    # with right padding and causal attention a real token never sees a pad, and pads predict
    # nothing, so the per-example gradients are the same
    def example_loss(params, ids, labels):
        logits = functional_call(model, (params, buffers), (), {"input_ids": ids[None]}).logits
        return _loss(logits, labels[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for batch in data:
        batch = batch.to(args.device)
        grads = per_example(params, batch.input_ids, batch.labels)
        for name, g in grads.items():
            sums[name].add_(g.float().square().sum(0))
        count += batch.input_ids.shape[0]
    return {name: value / count for name, value in sums.items()}


def run_backpack(model, data, args):
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    named = _named(model)
    # BackPACK refuses an Embedding's padding_idx; the pad row's gradient is zero here anyway
    # (right padding, causal attention, pads predict nothing)
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.padding_idx = None
    extend(model)
    _trainable(model, True)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in named.items()}
    covered = set()
    count = 0
    try:
        for batch in data:
            batch = batch.to(args.device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            with backpack(SumGradSquared()):
                _loss(logits, batch.labels).backward()
            for name, p in named.items():
                value = getattr(p, "sum_grad_squared", None)
                if value is not None:
                    sums[name].add_(value.float())
                    covered.add(name)
                    del p.sum_grad_squared
                p.grad = None
            count += batch.input_ids.shape[0]
    finally:
        _trainable(model, False)
    return {name: value / count for name, value in sums.items() if name in covered}


RUNNERS = {
    "ours": run_ours,
    "opacus": run_opacus,
    "torch.func": run_functorch,
    "backpack": run_backpack,
    "loop": run_loop,
    "train": run_train,
}


def check(result, reference):
    """(max tensor-wise relative difference over covered tensors, covered count)."""
    worst = 0.0
    for name, value in result.items():
        ref = reference[name].float()
        worst = max(worst, float((value.float() - ref).norm() / max(float(ref.norm()), 1e-30)))
    return worst, len(result)


def _first_line(error: Exception) -> str:
    return (
        f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120] if str(error) else ''}"
    )


def row(args, seq: int) -> dict:
    """One sequence length: every method, interleaved, `args.reps` times, checked once."""
    args.seq_len = seq
    args.batch_size = max(1, args.tokens // seq)
    args.examples = args.batch_size * args.batches
    model, ids, lengths = bench_compute.build(args)
    data = bench_compute.batches(ids, lengths, args.batch_size, group=args.group_by_length)
    reference = run_loop(model, data, args)
    methods = [m for m in METHODS if m in args.methods]
    # one copy per method: peers leave hooks and attributes behind (opacus, BackPACK's extend)
    models = {name: copy.deepcopy(model) for name in methods}
    status, errors = {}, {}
    for name in methods:  # warm-up + check (and what runs at all)
        try:
            result = RUNNERS[name](models[name], data[:1] if name == "train" else data, args)
        except Exception as error:  # noqa: BLE001 - a peer that cannot run this model
            errors[name] = _first_line(error)
            continue
        if result is not None:
            worst, covered = check(result, reference)
            status[name] = {"rel_diff": worst, "covered": covered, "of": len(reference)}
    rates = {name: [] for name in methods if name not in errors}
    plans = []
    for _ in range(args.reps):
        for name in rates:
            bench_compute.PLAN_SECONDS.clear()
            elapsed = bench_compute.timed(RUNNERS[name], models[name], data, args)
            # our engine's one-time plan is not per-batch work (bench_compute reports it apart)
            plans.extend(bench_compute.PLAN_SECONDS)
            rates[name].append(args.examples / (elapsed - sum(bench_compute.PLAN_SECONDS)))

    def per_rep(a, b):
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    params = sum(p.numel() for p in model.parameters())
    summary = {
        "seq": seq,
        "batch": args.batch_size,
        "examples": args.examples,
        "params_M": round(params / 1e6, 2),
        "rates": rates,
        "median": {k: statistics.median(v) for k, v in rates.items()},
        "vs_ours": {k: per_rep(k, "ours") for k in rates if "ours" in rates},
        "vs_train": {k: per_rep(k, "train") for k in rates if "train" in rates},
        "check": status,
        "errors": errors,
        "plan_s": statistics.median(plans) if plans else None,
    }
    return summary


def print_row(summary):
    print(
        f"seq {summary['seq']}, batch {summary['batch']} ({summary['examples']} examples, "
        f"{summary['params_M']}M params):"
    )
    for name, rate in summary["median"].items():
        check_text = ""
        if name in summary["check"]:
            c = summary["check"][name]
            check_text = f"  vs loop {c['rel_diff']:.1e} on {c['covered']}/{c['of']} tensors"
        spread = summary["rates"][name]
        print(
            f"  {name:10s} {rate:8.2f} ex/s  x{summary['vs_ours'].get(name, float('nan')):.2f} "
            f"of ours  x{summary['vs_train'].get(name, float('nan')):.2f} of train  "
            f"(reps {min(spread):.2f}-{max(spread):.2f}){check_text}"
        )
    for name, error in summary["errors"].items():
        print(f"  {name:10s} cannot run: {error}")


def memory(args):
    """Peak memory above the built model, each method in a fresh process, per sequence length."""
    out = {}
    for seq in args.seq:
        for name in args.methods:
            argv = [a for a in sys.argv[1:] if a != "--memory"]
            result = subprocess.run(
                [sys.executable, __file__, *argv, "--only", name, "--seq", str(seq)],
                capture_output=True,
                text=True,
            )
            lines = result.stdout.strip().splitlines()
            if result.returncode or not lines:
                tail = (result.stderr.strip().splitlines() or ["?"])[-1]
                out[f"{seq}/{name}"] = f"failed: {tail[:120]}"
            else:
                out[f"{seq}/{name}"] = json.loads(lines[-1])["peak_above_model_mib"]
            print(f"  seq {seq} {name:10s} {out[f'{seq}/{name}']}", flush=True)
    print(json.dumps({"peak_above_model_mib": out, "args": vars(args)}))


def only(args):
    seq = args.seq[0]
    args.seq_len, args.batch_size = seq, max(1, args.tokens // seq)
    args.examples = args.batch_size * min(2, args.batches)
    model, ids, lengths = bench_compute.build(args)
    data = bench_compute.batches(ids, lengths, args.batch_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = bench_compute.peak_bytes(args.device)
    RUNNERS[args.only](model, data, args)
    bench_compute.sync(args.device)
    peak = bench_compute.peak_bytes(args.device) - before
    print(json.dumps({"method": args.only, "peak_above_model_mib": round(peak / 2**20, 1)}))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument(
        "--tokens", type=int, default=1024, help="tokens per batch (<= seq x batch)"
    )
    parser.add_argument("--batches", type=int, default=2, help="batches per repetition")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--tie", action="store_true")
    parser.add_argument("--moe", action="store_true")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-intermediate", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch the examples as `compute --group-by-length` does (every batched method alike)",
    )
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.fisher_type = "empirical"
    if args.memory:
        return memory(args)
    if args.only:
        return only(args)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
        f"{args.dtype}; hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
        f"{' tied' if args.tie else ''}{' MoE' if args.moe else ''}; {args.tokens} tokens per "
        f"batch, {args.batches} batches per rep, {args.reps} reps"
        f"{', batches grouped by length' if args.group_by_length else ''}",
        flush=True,
    )
    rows = []
    for seq in args.seq:
        summary = row(args, seq)
        print_row(summary)
        sys.stdout.flush()
        rows.append(summary)
    print(json.dumps({"rows": rows, "args": vars(args)}))


if __name__ == "__main__":
    main()
