"""`compute` end to end with and without `--group-by-length` on rows of varied length.

Same model, data and options; the runs alternate, several repetitions, median examples/s and the
ratio within each repetition. The rows' token lengths are spread between a tenth of --max-length
and all of it, the case where random batches pad most.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_batching.py
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import tiny

    from mergekit_fisher.estimator.runner import ComputeOptions, run_compute

    with tempfile.TemporaryDirectory(prefix="bench-batching-") as root:
        tokenizer = os.path.join(root, "tokenizer")
        tiny.make_tokenizer(tokenizer)
        model = os.path.join(root, "model")
        tiny.make_llama(model, seed=0, hidden=args.hidden, layers=args.layers,
                        tokenizer_dir=tokenizer, num_attention_heads=4,
                        num_key_value_heads=4)  # fmt: skip
        words = " ".join(tiny.CORPUS).split()
        rng = random.Random(0)
        rows = []
        from transformers import AutoTokenizer

        counter = AutoTokenizer.from_pretrained(tokenizer)
        while len(rows) < args.examples:  # token lengths uniform in [max_length / 10, max_length]
            target = rng.randint(args.max_length // 10, args.max_length)
            text = ""
            while len(counter(text + " x")["input_ids"]) < target:
                text += " " + " ".join(rng.choice(words) for _ in range(8))
            rows.append({"text": text.strip()})
        data = tiny.write_jsonl(os.path.join(root, "data.jsonl"), rows)
        rates = {True: [], False: []}
        for repeat in range(args.repeats):
            for grouped in (True, False):
                out = os.path.join(root, f"out-{grouped}-{repeat}")
                options = ComputeOptions(
                    model=model, out_dir=out, data=data, fisher_type="empirical",
                    batch_size=args.batch_size, max_length=args.max_length,
                    group_by_length=grouped, progress=False,
                )  # fmt: skip
                started = time.perf_counter()
                run_compute(options)
                rates[grouped].append(args.examples / (time.perf_counter() - started))
        ratios = [g / p for g, p in zip(rates[True], rates[False])]
        print(f"Llama hidden {args.hidden}, {args.layers} layers; {args.examples} rows of "
              f"{args.max_length // 10}-{args.max_length} tokens, batch {args.batch_size}; "
              f"median of {args.repeats} (start-up included)")  # fmt: skip
        print(f"--group-by-length    {statistics.median(rates[True]):.2f} ex/s")
        print(f"--no-group-by-length {statistics.median(rates[False]):.2f} ex/s")
        print(f"ratio (per repetition, median) {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
