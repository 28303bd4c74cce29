"""Peak memory of `mergekit-fisher compute` (and `combine`) above the loaded model, as a multiple of
the float32 Fisher size; and examples/s of 2 processes vs 1.

Each measurement runs in a fresh process. A sampler thread reads the process's resident memory
(/proc/self/statm) every 5 ms from the moment the model is loaded (the baseline) to the end of the
run; the figure is (peak - baseline) / (4 bytes x parameters). Loading itself is not counted (it
is transformers' business and ends before the Fisher exists); the weights are read once before
the baseline is taken, since memory-mapped safetensors weights only become resident when read.

    .venv/bin/python bench/bench_memory.py                    # ~134M-parameter Llama, CPU
    .venv/bin/python bench/bench_memory.py --hidden 256 --layers 4 --vocab 8000   # quick
    .venv/bin/python bench/bench_memory.py --device cuda      # + torch.cuda.max_memory_allocated
    .venv/bin/python bench/bench_memory.py --throughput       # + 2 processes vs 1 (torchrun, gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as fp:
        return int(fp.read().split()[1]) * PAGE


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.baseline = None
        self.peak = 0
        self.running = True

    def start_from_here(self):
        self.baseline = rss()
        self.peak = self.baseline
        if not self.is_alive():
            self.start()

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)


def build(args, root: str) -> dict:
    """A saved Llama, a tokenizer and data (run once, in the parent)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import tiny

    model_dir = os.path.join(root, "model")
    tokenizer = os.path.join(root, "tokenizer")
    tiny.make_tokenizer(tokenizer, vocab_size=min(args.vocab, 2000))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(model_dir)
    rows = [{"text": " ".join(tiny.CORPUS[i % len(tiny.CORPUS)] for i in range(k, k + 3))}
            for k in range(args.examples)]  # fmt: skip
    data = tiny.write_jsonl(os.path.join(root, "data.jsonl"), rows)
    return {"model": model_dir, "data": data, "params": sum(p.numel() for p in model.parameters())}


def child(spec: dict) -> dict:
    """One measured run, in this (fresh) process."""
    import torch

    from mergekit_fisher.estimator import runner

    sampler = Sampler()
    cuda = spec["device"] == "cuda"
    if spec["what"] == "combine":
        from mergekit_fisher.tools.combine import combine_fishers

        sampler.start_from_here()
        combine_fishers(spec["inputs"], spec["out"])
    else:
        load = runner._load

        def measured_load(opts, device):
            loaded = load(opts, device)
            # safetensors weights may be memory-mapped: resident only once read. Read them all,
            # so the baseline holds the whole model and the figure is what compute adds to it
            with torch.no_grad():
                for param in loaded[1].parameters():
                    param.sum()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                sampler.baseline_cuda = torch.cuda.memory_allocated()
            sampler.start_from_here()
            return loaded

        runner._load = measured_load
        options = runner.ComputeOptions(
            model=spec["model"],
            out_dir=spec["out"],
            data=spec["data"],
            fisher_type="empirical",
            batch_size=spec["batch_size"],
            max_length=spec["max_length"],
            save_dtype=spec["save_dtype"],
            progress=False,
        )
        runner.run_compute(options)
    sampler.running = False
    result = {"cpu_peak_above": sampler.peak - sampler.baseline}
    if cuda:
        result["cuda_peak_above"] = torch.cuda.max_memory_allocated() - sampler.baseline_cuda
    return result


def measure(spec: dict, glibc_default: bool) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    if not glibc_default:
        # glibc's dynamic mmap threshold keeps freed blocks of up to 32 MB in the heap: resident
        # memory nobody uses. A fixed threshold returns them, so RSS shows what is live
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(world: dict, args, processes: int, out: str) -> float:
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_port", str(29533 + int(time.time()) % 200)]  # no TIME_WAIT reuse
    command += ["-m", "mergekit_fisher", "-q", "compute", world["model"], out, "--data",
                world["data"], "--fisher-type", "empirical", "--batch-size", str(args.batch_size),
                "--max-length", str(args.max_length), "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(2 // processes or 1)}
    env["ACCELERATE_USE_CPU"] = "1"
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return args.examples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (RSS then includes freed, retained heap)",
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as root:
        world = build(args, root)
        fisher_bytes = 4 * world["params"]
        print(f"Llama {world['params'] / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} "
              f"layers, vocab {args.vocab}); float32 Fisher {fisher_bytes / 1e6:.0f} MB; "
              f"{args.examples} examples, batch {args.batch_size}, max length {args.max_length}; "
              f"median of {args.repeats}")  # fmt: skip
        rows = {}
        for repeat in range(args.repeats):
            for save_dtype in ("float32", "bfloat16"):
                out = os.path.join(root, f"fisher-{save_dtype}-{repeat}")
                spec = dict(world, out=out, what="compute", save_dtype=save_dtype,
                            device=args.device, batch_size=args.batch_size,
                            max_length=args.max_length)  # fmt: skip
                rows.setdefault(f"compute --save-dtype {save_dtype}", []).append(
                    measure(spec, args.glibc_default)
                )
            inputs = [os.path.join(root, f"fisher-float32-{repeat}")] * 2
            spec = dict(what="combine", inputs=inputs, out=os.path.join(root, f"comb-{repeat}"),
                        device="cpu")  # fmt: skip
            rows.setdefault("combine (2 float32 files)", []).append(
                measure(spec, args.glibc_default)
            )
        print("| run | CPU peak above the loaded model | x float32 Fisher |")
        print("|---|---|---|")
        for name, results in rows.items():
            for key in ("cpu_peak_above", "cuda_peak_above"):
                if key not in results[0]:
                    continue
                peak = statistics.median(r[key] for r in results)
                label = name + (" (CUDA)" if key.startswith("cuda") else "")
                print(f"| {label} | {peak / 1e6:.0f} MB | {peak / fisher_bytes:.2f}x |")
        if args.throughput:
            rates = {1: [], 2: []}
            for repeat in range(args.repeats):
                for processes in (1, 2):  # interleaved
                    out = os.path.join(root, f"tp-{processes}-{repeat}")
                    rates[processes].append(throughput(world, args, processes, out))
            one, two = (statistics.median(rates[p]) for p in (1, 2))
            print(f"throughput: 1 process (2 threads) {one:.2f} ex/s, 2 processes (1 thread each) "
                  f"{two:.2f} ex/s: {two / one:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
