"""`FisherEngine`: one model, one accumulator, `step(batch)` adds the batch's weighted squared
per-example gradients. Used by the runner (files, processes, checkpoints), tests and the bench."""

from __future__ import annotations

import inspect
import logging
from typing import Dict, Optional, Set

import torch

from mergekit_fisher.errors import FisherInputError
from mergekit_fisher.estimator.accumulator import FisherAccumulator
from mergekit_fisher.estimator.coverage import plan_handlers
from mergekit_fisher.estimator.data import Batch
from mergekit_fisher.estimator.fallback import fallback_pass
from mergekit_fisher.estimator.hooks import PerExampleCapture, probe_structure
from mergekit_fisher.estimator.objectives import (
    IGNORE,
    cls_loglik,
    cls_passes,
    lm_loglik,
    lm_passes,
)
from mergekit_fisher.estimator.padding import mask_is_redundant

log = logging.getLogger(__name__)


def accepted_inputs(model: torch.nn.Module) -> Set[str]:
    """Keyword inputs the (unwrapped: PEFT) model's forward names explicitly."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(inner.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class FisherEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        task: str = "causal-lm",
        fisher_type: str = "empirical",
        samples: int = 1,
        seed: int = 0,
        accumulator_dtype: torch.dtype = torch.float32,
        keys: Optional[Dict[int, str]] = None,
        wrappers=None,
        model_name: str = "model",
    ):
        """`keys`: id(param) -> accumulator key (default: every parameter under its first name)."""
        # Per-example gradients are captured at module outputs; parameters must not require grad or
        # autograd would never need the outputs' gradients (and would waste memory on .grad).
        # The fallback path switches requires_grad on for the parameters it handles, itself.
        model.requires_grad_(False)
        self.model = model
        self.task = task
        self.fisher_type = fisher_type
        self.samples = samples
        self.seed = seed
        self.model_name = model_name
        if keys is None:
            keys = {}
            for name, param in model.named_parameters(remove_duplicate=False):
                keys.setdefault(id(param), name)
        params = {}
        for param in model.parameters():
            if id(param) in keys:
                params[keys[id(param)]] = param
        self.params = params
        self.accumulator = FisherAccumulator(
            {k: p.shape for k, p in params.items()},
            dtype=accumulator_dtype,
            devices={k: p.device for k, p in params.items()},
        )
        self.accepted = accepted_inputs(model)
        self.drop_mask = False
        self.dropped: Set[str] = set()
        self.handlers, self.fallback = plan_handlers(model, keys, wrappers=wrappers)
        config = getattr(model, "config", None)
        vocab = getattr(config, "vocab_size", None) or 2
        is_cls = task == "seq-cls"
        exact = probe_structure(
            model,
            self.handlers,
            self.forward,
            model.get_input_embeddings().weight.device,
            vocab,
            getattr(config, "pad_token_id", None),
            rows_allowed=is_cls,
        )
        # right-padded causal batches: the mask changes no gradient (padding.py)
        self.drop_mask = mask_is_redundant(
            self.forward,
            model.get_input_embeddings().weight.device,
            vocab,
            getattr(config, "pad_token_id", None),
            model.get_input_embeddings().weight.dtype,
        )
        self.capture = PerExampleCapture(self.handlers, self.accumulator)
        for handler in self.handlers:
            if id(handler) in exact:
                self.capture.mark_exact(handler, exact[id(handler)])
        self.loglik = cls_loglik if is_cls else lm_loglik
        self.make_passes = cls_passes if is_cls else lm_passes
        self.num_examples = 0
        self.num_tokens = 0

    def forward(self, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a batch's model inputs: input_ids, attention_mask and whatever else the
        tokenizer gave (token_type_ids, ...) that the model's forward accepts."""
        passed = {}
        for name, value in inputs.items():
            if name in ("input_ids", "attention_mask") or name in self.accepted:
                passed[name] = value
            elif name not in self.dropped:
                self.dropped.add(name)
                log.debug(
                    "the tokenizer's %r is not an input of %s: not passed",
                    name,
                    type(self.model).__name__,
                )
        if "use_cache" in self.accepted:  # no KV cache: nothing is generated
            passed["use_cache"] = False
        if self.drop_mask:
            passed.pop("attention_mask", None)
        return self.model(**passed).logits

    def step(self, batch: Batch) -> int:
        """Accumulate one batch; returns its number of predicted tokens (input tokens: seq-cls)."""
        capture = self.capture
        try:
            capture.begin_forward(*batch.input_ids.shape)
            with torch.enable_grad():
                logits = self.forward(batch.model_inputs())
            capture.end_forward()
            passes = self.make_passes(
                self.fisher_type,
                logits,
                batch.labels,
                batch.indices,
                samples=self.samples,
                seed=self.seed,
            )
            for j, (targets, weights) in enumerate(passes):
                values = self.loglik(logits, targets)
                if not bool(torch.isfinite(values).all()):
                    raise self._non_finite_error()
                with torch.enable_grad():
                    capture.backward(-values.sum(), weights, retain_graph=j < len(passes) - 1)
            capture.release()
            del logits
            fallback = dict(self.fallback)
            fallback.update({key: self.params[key] for key in capture.exact})
            if fallback:
                fallback_pass(
                    fallback,
                    batch,
                    passes,
                    self.forward,
                    self.loglik,
                    self.accumulator,
                    token_targets=self.task != "seq-cls",
                )
        finally:
            capture.active = (
                False  # a failed forward must not count its uncalled modules as unfired
            )
            capture.release()
        tokens = (
            int(batch.attention_mask.sum())
            if self.task == "seq-cls"
            else int((batch.labels[:, 1:] != IGNORE).sum())
        )
        self.num_examples += len(batch.indices)
        self.num_tokens += tokens
        return tokens

    def fallback_keys(self):
        """Keys computed by the exact batch-1 path: planned ones (no handler) and the ones the
        structure probe or the run-time checks sent there (see `exact_reasons`)."""
        return sorted(set(self.fallback) | set(self.capture.exact))

    def exact_reasons(self) -> Dict[str, str]:
        reasons = {key: "no fast-path handler for this module type" for key in self.fallback}
        reasons.update(self.capture.exact)
        return reasons

    def _non_finite_error(self) -> FisherInputError:
        bad = next(
            (
                name
                for name, p in self.model.named_parameters()
                if not bool(torch.isfinite(p).all())
            ),
            None,
        )
        if bad is not None:
            return FisherInputError(
                "the model has non-finite (NaN/Inf) weights, so its gradients are not finite",
                model=self.model_name,
                tensor=bad,
                fix="repair or re-download the checkpoint",
            )
        return FisherInputError(
            "non-finite log-likelihood (NaN/Inf logits) on finite weights",
            model=self.model_name,
            fix="use --dtype float32 (half precision overflows), or check the data for extreme "
            "inputs",
        )

    def fisher(self) -> Dict[str, torch.Tensor]:
        """This engine's own mean (single process use: tests, bench)."""
        return {
            key: value / max(1, self.num_examples) for key, value in self.accumulator.sums.items()
        }

    def close(self) -> None:
        self.capture.remove()
