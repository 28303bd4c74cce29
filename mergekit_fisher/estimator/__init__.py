"""The Fisher estimator room: data -> hooks -> accumulators -> writer.

* `data`        -- read JSONL / .txt / datasets, tokenize, mask, truncate, shuffle, hash;
* `objectives`  -- what is differentiated: empirical, sampled (Monte Carlo true Fisher), exact
                (classes);
* `hooks`       -- per-example gradients of a whole batch in one backward pass, squared layer by
                layer;
* `coverage`    -- which modules the hooks cover (exact type matches, numerically verified norms);
* `fallback`    -- an exact batch-1 path for parameters the hooks do not cover;
* `engine`      -- one model + accumulator: `FisherEngine.step(batch)` (used by runner, tests,
                bench);
* `accumulator` -- float32/float64 sums of squares, distributed reduce, checkpoint state;
* `lora`        -- PEFT adapters: dense W0+BA names, adapter-space names; `loading` --
                model/tokenizer/names;
* `checkpoint`  -- resumable state in one safetensors file (never pickle);
* `runner`      -- the loop (accelerate, progress, checkpoint/resume); `cli` -- the thin click
                command.

Nothing here is imported by ``mergekit_fisher`` itself, so the merge side never pays for it.
"""
