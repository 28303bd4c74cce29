"""A byte-level BPE tokenizer trained on the demo's mixture, saved as a HF fast tokenizer."""

from __future__ import annotations

import os
from typing import List, Sequence

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_tokenizer(texts: Sequence[str], out_dir: str, *, vocab_size: int):
    """Train on `texts` (deterministic: the BPE trainer has no randomness) and save to `out_dir`.

    Ids 0/1/2 are pad/bos/eos, matching the model config written by `demo.train`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def encode_examples(tokenizer, texts: Sequence[str], max_length: int) -> List[List[int]]:
    """Token ids of each text: BOS, then the text's tokens, truncated to `max_length` in all.

    Examples with fewer than two tokens are dropped: they contain no next-token prediction.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    out = []
    for ids in encoded:
        ids = (bos + list(ids))[:max_length]
        if len(ids) >= 2:
            out.append(ids)
    return out


def encode_stream(tokenizer, text: str, max_length: int) -> List[List[int]]:
    """One long text cut into consecutive windows of `max_length` tokens (the last may be
    shorter)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    return [window for window in windows if len(window) >= 2]


def collate(batch: Sequence[Sequence[int]], pad_id: int):
    """Right-padded input_ids / attention_mask, and labels with padding set to -100 (ignored by the
    loss)."""
    import torch

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels
