"""Which layer and which kind of module a checkpoint tensor belongs to.

`layer_and_module` reads the HF naming conventions (Llama/Mistral/Qwen ``model.layers.N``, GPT-2
``transformer.h.N``, GPT-NeoX, MPT ``blocks.N``, BERT ``encoder.layer.N``) and PEFT wrappers
(``base_model.model.``, ``.base_layer``, ``lora_A.default``), so the same module type groups
together across layers, models and adapters. Pure string work: no torch, no files.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple

from mergekit_fisher.choices import Grouping

# Containers whose next segment is the block (layer) index.
LAYER_CONTAINERS = ("layers", "h", "blocks", "layer", "block")
# Leading wrapper segments that say nothing about the module (model classes, PEFT, DDP,
# torch.compile).
ROOT_SEGMENTS = {
    "base_model",
    "model",
    "module",
    "_orig_mod",
    "transformer",
    "gpt_neox",
    "language_model",
    "decoder",
    "encoder",
    "bert",
    "roberta",
}
# Segments PEFT inserts into module names that do not change what the module is.
PEFT_NOISE = {"base_layer"}
LORA_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}
_INT = re.compile(r"^\d+$")


def _strip_peft(parts: list) -> list:
    out = []
    for i, part in enumerate(parts):
        if part in PEFT_NOISE:
            continue
        # `lora_A.default.weight`: the adapter name between the LoRA part and the leaf
        if i > 0 and parts[i - 1] in LORA_PARTS and part != "weight" and i < len(parts) - 1:
            continue
        out.append(part)
    return out


def _drop_leaf(parts: list) -> list:
    """Drop the parameter name (weight, bias, ...) unless it is itself the module (LoRA
    embeddings)."""
    if len(parts) > 1 and parts[-1] not in LORA_PARTS:
        return parts[:-1]
    return parts


def layer_and_module(name: str) -> Tuple[Optional[int], str]:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``(3, "self_attn.q_proj")``.

    Tensors outside the repeated blocks get ``None``: ``model.embed_tokens.weight`` ->
    ``(None, "embed_tokens")``, ``lm_head.weight`` -> ``(None, "lm_head")``. Weight and bias of one
    module share a module type. Deeper indices (MoE experts) become ``*`` so that
    ``mlp.experts.0.w1`` and ``mlp.experts.7.w1`` group together as ``mlp.experts.*.w1``.
    LoRA factors keep their part: ``...q_proj.lora_A.weight`` -> ``"self_attn.q_proj.lora_A"``.
    """
    parts = _strip_peft(name.split("."))
    layer: Optional[int] = None
    start = None
    for i in range(len(parts) - 1):
        if parts[i] in LAYER_CONTAINERS and _INT.match(parts[i + 1]):
            layer, start = int(parts[i + 1]), i + 2
            break
    if start is None:
        for i, part in enumerate(parts[:-1]):  # unknown container: the first integer segment
            if _INT.match(part) and i > 0:
                layer, start = int(part), i + 1
                break
    if start is None:
        rest = parts
        while len(rest) > 1 and rest[0] in ROOT_SEGMENTS:
            rest = rest[1:]
    else:
        rest = parts[start:]
    rest = _drop_leaf(rest)
    module = ".".join("*" if _INT.match(part) else part for part in rest)
    return layer, module or name


def group_label(name: str, by: str) -> str:
    """The row label of `name` when grouping: ``by`` is ``tensor``, ``layer`` or ``module``.

    ``layer``: ``"layer 3"`` for block tensors, the module type (``embed_tokens``, ``lm_head``,
    ``norm``) for the rest. ``module``: the module type, whatever the layer.
    """
    if by == Grouping.TENSOR:
        return name
    layer, module = layer_and_module(name)
    if by == Grouping.LAYER:
        return module if layer is None else f"layer {layer}"
    if by == Grouping.MODULE:
        return module
    raise ValueError(f"unknown grouping {by!r} ({', '.join(Grouping.values())})")


def group_sort_key(label: str) -> tuple:
    """Order for grouped rows: non-layer groups first, then ``layer 0, 1, 2, ...`` numerically."""
    match = re.fullmatch(r"layer (\d+)", label)
    return (1, int(match.group(1)), "") if match else (0, 0, label)
