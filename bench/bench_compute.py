"""Benchmark `mergekit-fisher compute`'s estimator against a batch-1 autograd loop and a plain
training step.

Same model, same data, same batch size; examples/s, several repetitions (median), ratios within
one run.

    # CPU, small Llama (hidden 256, 4 layers)
    .venv/bin/python bench/bench_compute.py
    .venv/bin/python bench/bench_compute.py --device cuda --examples 256 --batch-size 16
    # peak memory, each in a fresh process
    .venv/bin/python bench/bench_compute.py --memory --tie --vocab 32000
    # a Mixtral-shaped MoE (8 experts, top-2), plus the estimator with experts and routers forced
    # onto the exact batch-1 fallback (what they ran on before the fused-experts fast path)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_compute.py --moe --check

* estimator: `FisherEngine.step` (per-example squared gradients from one backward pass per batch);
             the engine's construction (coverage checks, structure probe: once per `compute` run) is
             timed apart and reported as "plan";
* loop:      the obvious exact method -- per example: forward, autograd.grad of the summed
             log-likelihood w.r.t. every parameter, square, add;
* train:     one training step (forward + loss.backward() of the batch-summed loss), no optimizer;
* fallback:  (--moe only) the estimator with the experts and routers on its batch-1 fallback.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def moe_config(args):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.expert_intermediate or args.hidden * 2,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=args.tie,
        pad_token_id=0,
    )


def build(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.moe:  # experts as compute loads them (loading.py): eager per-expert matmuls
        model = AutoModelForCausalLM.from_config(moe_config(args), experts_implementation="eager")
        with torch.no_grad():  # random routers (HF initialises them to zero: uniform routing)
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0, 0.02)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=args.tie,
        pad_token_id=0,
    )
    if not args.moe:
        model = LlamaForCausalLM(config)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.examples, args.seq_len), generator=generator)
    lengths = torch.randint(
        args.seq_len // 2, args.seq_len + 1, (args.examples,), generator=generator
    )
    return model, ids, lengths


def batches(ids, lengths, batch_size, group: bool = False):
    """Padded batches of the examples; `group`: formed as `compute --group-by-length` forms them
    (rows of similar length together; each example keeps its index)."""
    from mergekit_fisher.estimator.data import Example, collate

    order = list(range(len(ids)))
    if group:
        from mergekit_fisher.estimator.sources import group_by_length

        everyone = torch.arange(len(ids))
        order = group_by_length(everyone, everyone, lengths.tolist(), batch_size)[0].tolist()
    examples = [
        Example(i, ids[i, : lengths[i]].tolist(), ids[i, : lengths[i]].tolist()) for i in order
    ]
    return [
        collate(examples[s : s + batch_size], 0, "causal-lm")
        for s in range(0, len(examples), batch_size)
    ]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# FisherEngine construction (coverage checks, structure probe): once per `compute` run, timed apart
PLAN_SECONDS: list = []


def run_estimator(model, data, args):
    from mergekit_fisher.estimator.engine import FisherEngine

    for p in model.parameters():
        p.requires_grad_(False)
    start = time.perf_counter()
    engine = FisherEngine(model, fisher_type=args.fisher_type, samples=1)
    PLAN_SECONDS.append(time.perf_counter() - start)
    try:
        for batch in data:
            engine.step(batch.to(args.device))
    finally:
        engine.close()
    return engine.fisher()


def run_fallback(model, data, args):
    """The estimator with the experts and routers refused by coverage: their batch-1 path."""
    from mergekit_fisher.estimator import coverage

    saved = coverage.verified_experts, coverage._verified_router
    coverage.verified_experts = coverage._verified_router = lambda *_a: False
    try:
        return run_estimator(model, data, args)
    finally:
        coverage.verified_experts, coverage._verified_router = saved


def run_loop(model, data, args):
    from mergekit_fisher.estimator.objectives import lm_loglik

    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    count = 0
    for batch in data:
        batch = batch.to(args.device)
        for b, length in enumerate(batch.attention_mask.sum(1).tolist()):
            ids = batch.input_ids[b : b + 1, :length]
            logits = model(input_ids=ids).logits
            value = lm_loglik(logits, batch.labels[b : b + 1, 1:length]).sum()
            for total, grad in zip(sums, torch.autograd.grad(value, params)):
                total.add_(grad.float().square())
            count += 1
    for p in params:
        p.requires_grad_(False)
    return [s / count for s in sums]


def run_train(model, data, args):
    from mergekit_fisher.estimator.objectives import lm_loglik

    for p in model.parameters():
        p.requires_grad_(True)
    for batch in data:
        batch = batch.to(args.device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = -lm_loglik(logits, batch.labels[:, 1:]).sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)


def timed(fn, model, data, args):
    sync(args.device)
    start = time.perf_counter()
    fn(model, data, args)
    sync(args.device)
    return time.perf_counter() - start


def peak_bytes(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def print_peak(args, model, ids, lengths):
    """One method, one process: its peak (CPU: max RSS; GPU: max allocated) above the model and
    data."""
    data = batches(ids, lengths, args.batch_size)
    fn = {
        "estimator": run_estimator,
        "loop": run_loop,
        "train": run_train,
        "fallback": run_fallback,
    }[args.only]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(args.device)  # after the reset on GPU: what is allocated now
    fn(model, data, args)
    sync(args.device)
    print(json.dumps({"method": args.only, "peak_above_model": peak_bytes(args.device) - before}))


def memory_report(args):
    argv = [a for a in sys.argv[1:] if a != "--memory"]
    peaks = {}
    for method in ("estimator", "loop", "train") + (("fallback",) if args.moe else ()):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                *argv,
                "--only",
                method,
                "--examples",
                str(args.batch_size * 2),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        peaks[method] = json.loads(out.strip().splitlines()[-1])["peak_above_model"]
    mib = {k: v / 2**20 for k, v in peaks.items()}
    print(
        "peak memory above the model (MiB; "
        f"{'max allocated' if args.device.startswith('cuda') else 'max RSS'}), "
        f"vocab {args.vocab}{' tied' if args.tie else ''}, hidden {args.hidden}, "
        f"seq {args.seq_len}, "
        f"batch {args.batch_size}:"
    )
    for name, value in mib.items():
        print(f"  {name:9s} {value:8.1f}")
    print(f"  estimator / train = {peaks['estimator'] / max(1, peaks['train']):.2f}x")
    print(json.dumps({"peak_above_model_bytes": peaks, "args": vars(args)}))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument(
        "--loop-examples", type=int, default=None, help="fewer examples for the slow loop"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--tie", action="store_true", help="tie lm_head to the input embedding (Gemma, Llama-3.2)"
    )
    parser.add_argument("--fisher-type", default="empirical", choices=["empirical", "sampled"])
    parser.add_argument(
        "--check", action="store_true", help="also check estimator == loop on the data"
    )
    parser.add_argument(
        "--strategy",
        choices=["auto", "per-example", "batched"],
        default="auto",
        help=(
            "how the estimator forms per-example gradients "
            "(auto: per-example on CPU, batched on GPU)"
        ),
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="peak memory of each method above the built model, each in a fresh process",
    )
    parser.add_argument(
        "--moe", action="store_true", help="a Mixtral-shaped MoE instead of Llama (see --experts)"
    )
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-intermediate", type=int, default=None, help="default: 2 x hidden")
    parser.add_argument(
        "--only", choices=["estimator", "loop", "train", "fallback"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.strategy != "auto":
        from mergekit_fisher.estimator import accumulator

        accumulator.PER_EXAMPLE_LOOP_DEVICES = (
            (args.device.split(":")[0],) if args.strategy == "per-example" else ()
        )
    if args.memory:
        return memory_report(args)

    model, ids, lengths = build(args)
    if args.only:
        return print_peak(args, model, ids, lengths)
    data = batches(ids, lengths, args.batch_size)
    loop_n = args.loop_examples or args.examples
    loop_data = batches(ids[:loop_n], lengths[:loop_n], args.batch_size)
    # warm-up (allocator, kernels, lazy imports)
    run_estimator(model, data[:1], args)
    run_loop(model, loop_data[:1], args)
    run_train(model, data[:1], args)
    if args.moe:
        run_fallback(model, loop_data[:1], args)

    rates = {"estimator": [], "loop": [], "train": []}
    if args.moe:
        rates["fallback"] = []
    plans = []

    def steps_only(fn, data):  # the run's time less its engine construction (reported apart)
        PLAN_SECONDS.clear()
        elapsed = timed(fn, model, data, args)
        plans.extend(PLAN_SECONDS)
        return elapsed - sum(PLAN_SECONDS)

    for _ in range(args.reps):  # interleaved, so drifts in machine load hit all alike
        rates["estimator"].append(args.examples / steps_only(run_estimator, data))
        rates["loop"].append(loop_n / timed(run_loop, model, loop_data, args))
        rates["train"].append(args.examples / timed(run_train, model, data, args))
        if args.moe:
            rates["fallback"].append(loop_n / steps_only(run_fallback, loop_data))
    median = {k: statistics.median(v) for k, v in rates.items()}

    def per_rep(a, b):  # median of the ratios within each repetition (same machine load)
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    params = sum(p.numel() for p in model.parameters())
    kind = (
        f"Mixtral-shaped MoE ({args.experts} experts, top-{args.top_k}, expert intermediate "
        f"{args.expert_intermediate or args.hidden * 2})"
        if args.moe
        else "Llama"
    )
    print(
        f"model: {kind} hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}{' tied' if args.tie else ''}, "
        f"{params / 1e6:.2f}M params, "
        f"{args.dtype} on {args.device}; seq <= {args.seq_len}, batch {args.batch_size}, "
        f"{args.examples} examples ({loop_n} for the loop), {args.fisher_type} Fisher, "
        f"{args.strategy} strategy, "
        f"{args.reps} reps, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name, values in rates.items():
        print(
            f"  {name:9s} {median[name]:8.2f} ex/s   "
            f"(reps: {', '.join(f'{v:.2f}' for v in values)})"
        )
    print(
        f"  estimator / loop  = {median['estimator'] / median['loop']:.2f}x   "
        f"(per-rep median {per_rep('estimator', 'loop'):.2f}x; target >= 4x CPU, >= 10x GPU)"
    )
    print(
        f"  estimator / train = {median['estimator'] / median['train']:.2f}x   "
        f"(per-rep median {per_rep('estimator', 'train'):.2f}x; target >= 0.6x)"
    )
    if args.moe:
        print(
            f"  estimator / fallback = {median['estimator'] / median['fallback']:.2f}x   "
            f"(per-rep median {per_rep('estimator', 'fallback'):.2f}x)"
        )
    print(
        f"  plan (FisherEngine construction, once per compute run, not in the rates): "
        f"median {statistics.median(plans):.3f} s"
    )
    if args.check:
        reference = run_loop(model, loop_data, args)
        checked = [("estimator", run_estimator)] + (
            [("fallback", run_fallback)] if args.moe else []
        )
        for name, fn in checked:
            fisher = fn(model, loop_data, args)
            worst = max(
                float((f - r).norm() / r.norm()) for f, r in zip(fisher.values(), reference)
            )
            print(f"  check: max tensor-wise relative difference {name} vs loop = {worst:.2e}")
    print(
        json.dumps({"rates_ex_per_s": rates, "median": median, "plan_s": plans, "args": vars(args)})
    )


if __name__ == "__main__":
    main()
