"""Wall time and peak RSS of `fisher_ties` vs mergekit's `ties` on the same recipe.

Builds a ~100M-parameter Llama base and two perturbed fine-tunes (float32 safetensors) plus their
Fisher files in WORKDIR (reused when present), then runs the stock `mergekit-yaml` CLI as a child
process for each method, alternating, REPEATS times, and reports medians and ratios.
Peak RSS is each child's own ru_maxrss (os.wait4), so runs do not contaminate each other.

    .venv/bin/python bench/bench_merge.py [--workdir bench/out/merge] [--repeats 3] [--cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


def build(workdir: str, hidden: int, layers: int, vocab: int) -> dict:
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergekit_fisher.fisher_file import FisherConfig, write_fisher

    paths = {
        name: os.path.join(workdir, name) for name in ("base", "a", "b", "fisher_a", "fisher_b")
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(workdir, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters", flush=True)
    base.save_pretrained(paths["base"])
    for index, label in enumerate(("a", "b")):
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for param in base.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
        base.save_pretrained(paths[label])
        state = load_file(os.path.join(paths[label], "model.safetensors"))
        fisher = {k: torch.rand(v.shape, generator=generator).pow_(4) for k, v in state.items()}
        write_fisher(
            fisher, paths[f"fisher_{label}"], FisherConfig(model=paths[label], num_examples=1)
        )
        del state, fisher
    return paths


def recipe(paths: dict, method: str) -> dict:
    models = []
    for label in ("a", "b"):
        params = {"weight": 1.0, "density": 0.5}
        if method.startswith("fisher"):
            params["fisher"] = paths[f"fisher_{label}"]
        models.append({"model": paths[label], "parameters": params})
    return {
        "merge_method": method,
        "base_model": paths["base"],
        "dtype": "float32",
        "models": models,
    }


def run_once(recipe_path: str, out: str, extra: list) -> tuple:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
        recipe_path,
        out,
        "--quiet",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{command} failed: {process.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024  # MiB (Linux reports KiB)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "merge"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--cuda", action="store_true", help="pass --cuda to mergekit-yaml")
    args = parser.parse_args()

    paths = build(args.workdir, args.hidden, args.layers, args.vocab)
    extra = ["--no-write-model-card", "--random-seed", "0"] + (["--cuda"] if args.cuda else [])
    results = {"ties": [], "fisher_ties": []}
    recipes = {}
    for method in results:
        recipes[method] = os.path.join(args.workdir, f"{method}.yml")
        with open(recipes[method], "w", encoding="utf-8") as fp:
            yaml.safe_dump(recipe(paths, method), fp)
    run_once(recipes["ties"], os.path.join(args.workdir, "warmup"), extra)  # warm the page cache
    for repeat in range(args.repeats):
        for method in results:
            elapsed, rss = run_once(
                recipes[method], os.path.join(args.workdir, f"out_{method}"), extra
            )
            results[method].append((elapsed, rss))
            print(
                f"run {repeat + 1}: {method:12s} {elapsed:7.2f} s  peak RSS {rss:8.1f} MiB",
                flush=True,
            )
    median = {
        m: (statistics.median(t for t, _ in r), statistics.median(m_ for _, m_ in r))
        for m, r in results.items()
    }
    print()
    print("| method | median wall time (s) | median peak RSS (MiB) |")
    print("|---|---|---|")
    for method, (t, m) in median.items():
        print(f"| {method} | {t:.2f} | {m:.0f} |")
    print(
        f"\nfisher_ties / ties: time x{median['fisher_ties'][0] / median['ties'][0]:.2f} "
        "(target <= 1.5), "
        f"peak RSS x{median['fisher_ties'][1] / median['ties'][1]:.2f} (target <= 1.3)"
    )


if __name__ == "__main__":
    main()
