"""`base+adapter` models for a dry run: W₀ + s·B·A computed tensor by tensor, nothing written.

mergekit builds a `base+adapter` model by merging the adapter into a full copy saved under
``--lora-merge-cache`` (`ModelReference.merged`). `explain` only reads: `AdaptedLoader` is a
`LazyTensorLoader` over the base checkpoint's own index that adds the adapter's delta to each tensor
it changes when that tensor is read (and serves a `modules_to_save` copy in place of the base's).
Placed in mergekit's `LoaderCache`, it is what the planner and `LoadTensor` see.

Plain LoRA on linear layers is read (scaling α/r, α/√r with rsLoRA, `rank_pattern` /
`alpha_pattern`, `fan_in_fan_out`); anything else (DoRA, LoRA on embeddings, trainable tokens, LoRA
biases, other PEFT types) is refused with one message, never approximated.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Tuple

import torch
from mergekit.io.lazy_tensor_loader import LazyTensorLoader

from mergekit_fisher.errors import FisherInputError

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"


UNSUPPORTED = (
    "only plain LoRA on linear layers is read without merging; merge this adapter into its base "
    "(peft's merge_and_unload) and use the merged model"
)
OTHER_BASE = "pair the adapter with the base model it was trained on"


def _refuse(adapter: str, problem: str, fix: str = UNSUPPORTED) -> FisherInputError:
    return FisherInputError(problem, file=adapter, kind="LoRA adapter", fix=fix)


def _config(adapter: str) -> dict:
    path = os.path.join(adapter, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as fp:
            config = json.load(fp)
    except (OSError, ValueError) as error:
        raise _refuse(adapter, f"cannot read adapter_config.json ({error})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(adapter, f"a {config.get('peft_type')} adapter, not LoRA")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise _refuse(adapter, f"the adapter uses {key}")
    if config.get("trainable_token_indices"):
        raise _refuse(adapter, "the adapter trains token embeddings (trainable_token_indices)")
    return config


def _pattern_value(patterns: dict, module: str, default):
    """peft's own `rank_pattern` / `alpha_pattern` lookup (`get_pattern_key`)."""
    from peft.utils.other import get_pattern_key

    if not patterns:
        return default
    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def _scaling(config: dict, module: str) -> float:
    """As peft's `LoraLayer.update_layer`: α/r, or α/√r with rsLoRA."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


class AdapterDeltas:
    """What one adapter changes, by the base checkpoint's tensor names."""

    def __init__(self, adapter: str):
        from safetensors import safe_open

        self.adapter = adapter
        self.config = _config(adapter)
        path = os.path.join(adapter, ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise _refuse(adapter, f"no {ADAPTER_WEIGHTS} (pickled adapters are never read)")
        self._file = safe_open(path, framework="pt")
        self.lora: Dict[str, Tuple[str, str, float]] = {}  # base name -> (A key, B key, scale)
        self.replaced: Dict[str, str] = {}  # base name -> key of the adapter's full copy
        for key in self._file.keys():
            self._add(key)

    def _add(self, key: str) -> None:
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts:
            index = parts.index("lora_A") if "lora_A" in parts else parts.index("lora_B")
            module = ".".join(parts[:index])
            if parts[index] == "lora_A":
                a_key = key
                b_key = key.replace(".lora_A.", ".lora_B.")
                self.lora[f"{module}.weight"] = (a_key, b_key, _scaling(self.config, module))
            return
        if any(part.startswith("lora_") for part in parts):
            raise _refuse(self.adapter, f"the adapter has {key} (not plain LoRA on a linear layer)")
        self.replaced[name] = key  # a modules_to_save copy, stored under the base's name

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name in self.replaced:
            return self._file.get_tensor(self.replaced[name])
        if name not in self.lora:
            return tensor
        a_key, b_key, scale = self.lora[name]
        a = self._file.get_tensor(a_key).float()
        b = self._file.get_tensor(b_key).float()
        delta = b @ a * scale
        if self.config.get("fan_in_fan_out"):
            delta = delta.T
        return tensor.float() + delta

    def unknown_targets(self, stored: List[str]) -> List[str]:
        known = set(stored)
        return [name for name in [*self.lora, *self.replaced] if name not in known]

    def check_fits(self, shapes: Dict[str, Tuple[int, ...]]) -> None:
        """Refuse, from headers only, an adapter whose tensors do not fit the base (`shapes`: the
        base checkpoint's tensor shapes): a module the base lacks, or B·A of another shape."""
        missing = self.unknown_targets(list(shapes))
        if missing:
            raise _refuse(
                self.adapter,
                f"the adapter changes {missing[0]}, which the base checkpoint does not store "
                f"({len(missing)} such tensor(s)): an adapter for another base?",
                OTHER_BASE,
            )
        for name, (a_key, b_key, _scale) in self.lora.items():
            rows = self._file.get_slice(b_key).get_shape()[0]
            cols = self._file.get_slice(a_key).get_shape()[-1]
            shape = (cols, rows) if self.config.get("fan_in_fan_out") else (rows, cols)
            if tuple(shapes[name]) != shape:
                raise _refuse(
                    self.adapter,
                    f"B·A of {name} is {shape}, the base's tensor is {tuple(shapes[name])}: an "
                    "adapter for another base?",
                    OTHER_BASE,
                )


def header_shapes(index) -> Dict[str, Tuple[int, ...]]:
    """{tensor: shape} of a mergekit `ShardedTensorIndex`, from the safetensors headers."""
    from safetensors import safe_open

    shapes: Dict[str, Tuple[int, ...]] = {}
    for shard in sorted(set(index.tensor_paths.values())):
        with safe_open(os.path.join(index.base_path, shard), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


class AdaptedLoader(LazyTensorLoader):
    """The base checkpoint's loader, each tensor read with the adapter applied (float32 where
    changed; `LoadTensor` casts to the recipe's dtype as for any model)."""

    def __init__(self, base: LazyTensorLoader, deltas: AdapterDeltas):
        super().__init__(base.index, lazy_unpickle=base.lazy_unpickle)
        self.deltas = deltas
        deltas.check_fits(header_shapes(base.index))

    def get_tensor(
        self,
        key: str,
        device: str = "cpu",
        aliases: Optional[List[str]] = None,
        raise_on_missing: bool = True,
    ) -> Optional[torch.Tensor]:
        if aliases and key not in self.index.tensor_paths:
            key = next((alias for alias in aliases if alias in self.index.tensor_paths), key)
        tensor = super().get_tensor(key, device="cpu", raise_on_missing=raise_on_missing)
        if tensor is None:
            return None
        return self.deltas.apply(key, tensor).to(device)


def install_adapted_loaders(models) -> None:
    """Put an `AdaptedLoader` in mergekit's `LoaderCache` for every `base+adapter` reference, so
    that nothing asks mergekit to build (and write) the merged model."""
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    for model in models:
        if model.lora is None or model in cache.loaders:
            continue
        base = cache.get(ModelReference(model=model.model))
        cache.loaders[model] = AdaptedLoader(base, AdapterDeltas(model.lora.path))
