"""Throughput of the Fisher tools relative to simply reading the file, within one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_tools.py \
        [--tensors 16] [--rows 512] [--cols 1024] [--repeats 5]

Baseline: read every tensor through `FisherFile.get_tensor(check=False)` and sum it once
(safetensors maps lazily, so the sum is what makes the read touch every byte: the least any
consumer does).
Reported: best and median seconds over --repeats rounds (round robin), and each tool's time as a
ratio of the reads it needs (inspect: 1 file; combine: 2 inputs + write; convert: 1 input +
write). Ratios, not absolute times, are what to compare across machines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
from safetensors.torch import save_file

from mergekit_fisher.fisher_file import FisherConfig, FisherFile, write_fisher
from mergekit_fisher.tools.combine import combine_fishers
from mergekit_fisher.tools.convert import convert
from mergekit_fisher.tools.inspect import build_report


def timed_round_robin(fns, repeats):
    """Each function once per round, `repeats` rounds: a busy neighbour slows all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-tools-")
    try:
        names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(args.tensors)]
        paths = []
        for seed in (0, 1):
            generator = torch.Generator().manual_seed(seed)
            tensors = {n: torch.rand(args.rows, args.cols, generator=generator) for n in names}
            path = os.path.join(root, f"f{seed}")
            write_fisher(tensors, path, FisherConfig(num_examples=100 + seed))
            paths.append(path)
        model = os.path.join(root, "model.safetensors")  # headers are all convert reads of it
        save_file({n: torch.zeros(args.rows, args.cols) for n in names}, model)
        foreign = os.path.join(root, "foreign.safetensors")
        save_file({"module." + n: t for n, t in tensors.items()}, foreign)
        del tensors

        def read():
            fisher = FisherFile(paths[0])  # fresh handle: no cache effects beyond the OS page cache
            for name in fisher.names():
                # touch every byte
                float(fisher.get_tensor(name, check=False).sum(dtype=torch.float64))

        def inspect():
            build_report(paths[0], None, "layer")

        def combine():
            combine_fishers(paths, os.path.join(root, "combined"), overwrite=True)

        def do_convert():
            convert(foreign, os.path.join(root, "converted"), model, overwrite=True)

        read()  # warm the page cache
        size_mb = args.tensors * args.rows * args.cols * 4 / 2**20
        results = timed_round_robin(
            {"read": read, "inspect": inspect, "combine": combine, "convert": do_convert},
            args.repeats,
        )
        print(
            f"file: {args.tensors} tensors x {args.rows}x{args.cols} float32 = {size_mb:.0f} MiB; "
            f"{args.repeats} rounds; torch threads {torch.get_num_threads()}"
        )
        base = results["read"][0]
        for name, (best, median) in results.items():
            print(
                f"{name:8s} best {best:7.3f} s  median {median:7.3f} s  "
                f"{size_mb / best:6.0f} MiB/s  "
                f"best x{best / base:.2f} of read+sum"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
