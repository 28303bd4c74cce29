"""RegMean's costs: Gram computation, the regmean merge, and the solve per layer size.

    # Gram statistic vs the Fisher estimator vs a training step (examples/s, same model and data)
    .venv/bin/python bench/bench_regmean.py compute [--hidden 256 --layers 4 --vocab 2048 ...]
    # `regmean` vs `linear` through the stock mergekit-yaml (wall time, peak RSS of the child)
    .venv/bin/python bench/bench_regmean.py merge [--repeats 3]
    # the closed-form solve alone, per layer width (2 models, float64)
    .venv/bin/python bench/bench_regmean.py solve [--widths 768 2048 4096]

`compute` reuses bench_compute.py's model and data; `merge` reuses bench_merge.py's ~100M Llama
(base + two fine-tunes) and writes each fine-tune a Gram file of random positive definite Grams.
Methods alternate within one run; medians over the repetitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run_gram(model, data, args):
    from mergekit_fisher.estimator.gram import GramEngine

    keys = {id(p): name for name, p in model.named_parameters()}
    engine = GramEngine(model, keys=keys)
    try:
        for batch in data:
            engine.step(batch.to(args.device))
    finally:
        engine.close()


def compute_section(args) -> None:
    import bench_compute

    args.tie, args.fisher_type = False, "empirical"
    model, ids, lengths = bench_compute.build(args)
    data = bench_compute.batches(ids, lengths, args.batch_size)
    methods = {
        "gram": run_gram,
        "fisher": bench_compute.run_estimator,
        "train": bench_compute.run_train,
    }
    times = {name: [] for name in methods}
    for fn in methods.values():  # warm-up
        fn(model, data[:1], args)
    for _ in range(args.reps):
        for name, fn in methods.items():
            times[name].append(bench_compute.timed(fn, model, data, args))
    rate = {name: args.examples / statistics.median(t) for name, t in times.items()}
    print("| seq, batch | gram | fisher estimator | train step | gram / fisher | gram / train |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.seq_len}, {args.batch_size} | {rate['gram']:.1f} ex/s | "
        f"{rate['fisher']:.1f} ex/s | {rate['train']:.1f} ex/s | "
        f"{rate['gram'] / rate['fisher']:.2f}x | {rate['gram'] / rate['train']:.2f}x |"
    )


def random_grams(state, generator):
    grams, counts = {}, {}
    for name, tensor in state.items():
        if tensor.ndim == 2 and (name.endswith("proj.weight") or name == "lm_head.weight"):
            width = tensor.shape[1]
            factor = torch.randn(width, width, generator=generator)
            grams[name] = factor @ factor.T + width * torch.eye(width)
            counts[name] = 1000
    return grams, counts


def merge_section(args) -> None:
    import bench_merge
    from safetensors.torch import load_file

    from mergekit_fisher.fisher_file import FisherConfig, write_fisher

    paths = bench_merge.build(args.workdir, args.hidden, args.layers, args.vocab)
    for label in ("a", "b"):
        gram_path = os.path.join(args.workdir, f"gram_{label}")
        paths[f"gram_{label}"] = gram_path
        if os.path.exists(gram_path):
            continue
        state = load_file(os.path.join(paths[label], "model.safetensors"))
        grams, counts = random_grams(state, torch.Generator().manual_seed(ord(label)))
        config = FisherConfig(model=paths[label], statistic="gram", gram_counts=counts)
        write_fisher(grams, gram_path, config)
    recipes = {}
    for method in ("linear", "regmean"):
        models = []
        for label in ("a", "b"):
            params = {"weight": 1.0}
            if method == "regmean":
                params["gram"] = paths[f"gram_{label}"]
            models.append({"model": paths[label], "parameters": params})
        recipes[method] = os.path.join(args.workdir, f"{method}.yml")
        with open(recipes[method], "w", encoding="utf-8") as fp:
            yaml.safe_dump({"merge_method": method, "dtype": "float32", "models": models}, fp)
    extra = ["--no-write-model-card"] + (["--cuda"] if args.cuda else [])
    bench_merge.run_once(recipes["linear"], os.path.join(args.workdir, "warmup"), extra)
    results = {method: [] for method in recipes}
    for repeat in range(args.repeats):
        for method, path in recipes.items():
            elapsed, rss = bench_merge.run_once(path, os.path.join(args.workdir, "out_r"), extra)
            results[method].append((elapsed, rss))
            print(f"run {repeat + 1}: {method:8s} {elapsed:7.2f} s  peak RSS {rss:8.1f} MiB")
    median = {
        m: (statistics.median(t for t, _ in r), statistics.median(x for _, x in r))
        for m, r in results.items()
    }
    print("\n| method | median wall time (s) | median peak RSS (MiB) |\n|---|---|---|")
    for method, (t, m) in median.items():
        print(f"| {method} | {t:.2f} | {m:.0f} |")
    print(
        f"\nregmean / linear: time x{median['regmean'][0] / median['linear'][0]:.2f}, "
        f"peak RSS x{median['regmean'][1] / median['linear'][1]:.2f}"
    )


def solve_section(args) -> None:
    from mergekit_fisher.math import regmean_merge, weighted_average

    print(f"device {args.device}")
    print("| width (in = out) | regmean solve (s) | weighted average (s) | ratio |")
    print("|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for width in args.widths:
        weights = [torch.randn(width, width, generator=generator).to(args.device) for _ in "ab"]
        grams = []
        for _ in range(2):
            factor = torch.randn(width, width, generator=generator)
            grams.append((factor @ factor.T / width + torch.eye(width)).to(args.device))
        solve, average = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            float(regmean_merge(weights, grams, [1.0, 1.0])[0, 0])  # synchronizes a GPU
            solve.append(time.perf_counter() - start)
            start = time.perf_counter()
            float(weighted_average(weights, [1.0, 1.0]).float()[0, 0])
            average.append(time.perf_counter() - start)
        s, a = statistics.median(solve), statistics.median(average)
        print(f"| {width} | {s:.3f} | {a:.4f} | {s / a:.0f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("section", choices=["compute", "merge", "solve"])
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--reps", "--repeats", dest="repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "regmean"))
    parser.add_argument("--cuda", action="store_true", help="merge: pass --cuda to mergekit-yaml")
    parser.add_argument("--widths", type=int, nargs="+", default=[768, 2048, 4096])
    args = parser.parse_args()
    if args.section == "compute":
        args.hidden, args.layers = args.hidden or 256, args.layers or 4
        args.vocab, args.reps = args.vocab or 2048, args.repeats
        compute_section(args)
    elif args.section == "merge":
        args.hidden, args.layers = args.hidden or 768, args.layers or 10
        args.vocab = args.vocab or 16000
        merge_section(args)
    else:
        solve_section(args)


if __name__ == "__main__":
    main()
