"""A tiny Llama, pre-trained on the domain mixture and fine-tuned into one specialist per domain.

A plain, seeded torch loop (AdamW, linear warm-up then cosine decay): the demo needs models in
seconds to minutes on a CPU, not a training framework.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0


def build_model(*, vocab_size: int, hidden: int, layers: int, max_length: int, seed: int):
    """A randomly initialised LlamaForCausalLM; heads of 16 dimensions, MLP 4x wide, untied
    embeddings.

    Special ids 0/1/2 are pad/bos/eos, as `demo.tokenizer.train_tokenizer` assigns them.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 16)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _lr_factor(step: int, settings: TrainSettings) -> float:
    warmup = max(1, int(settings.steps * settings.warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(
    model,
    examples: Sequence[Sequence[int]],
    settings: TrainSettings,
    *,
    seed: int,
    device: str = "cpu",
    desc: str = "train",
    progress: Optional[bool] = None,
) -> List[float]:
    """Train `model` in place on token-id `examples`; returns the loss of every step.

    Batches are drawn epoch by epoch from a permutation seeded by `seed`, so a run is reproducible.
    `progress`: a progress bar; by default unless -q.
    """
    import torch
    from tqdm.auto import tqdm

    from mergekit_fisher.cli import show_progress
    from mergekit_fisher.demo.tokenizer import collate

    if progress is None:
        progress = show_progress()

    if not examples:
        raise ValueError("no training examples")
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings)
    )
    generator = torch.Generator().manual_seed(seed)
    order: List[int] = []
    losses = []
    bar = tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress, leave=False)
    for _step in bar:
        if len(order) < settings.batch_size:
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        input_ids, attention_mask, labels = collate([examples[i] for i in batch], pad_id=0)
        loss = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            labels=labels.to(device),
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    if not all(math.isfinite(value) for value in losses):
        raise RuntimeError(f"{desc}: training diverged (non-finite loss); lower the learning rate")
    return losses


def save_model(model, tokenizer, out_dir: str) -> str:
    """Safetensors weights + config + tokenizer: what `compute`, `mergekit-yaml` and `eval` read."""
    os.makedirs(out_dir, exist_ok=True)
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
