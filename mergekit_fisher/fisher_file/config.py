"""`fisher_config.json`: provenance and global statistics of a Fisher file."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field

from mergekit_fisher.choices import Space, Statistic

FORMAT_NAME = "mergekit-fisher"
FORMAT_VERSION = 1
CONFIG_FILENAME = "fisher_config.json"
SINGLE_FILENAME = "fisher.safetensors"
INDEX_FILENAME = "fisher.safetensors.index.json"
SHARD_PATTERN = "fisher{suffix}.safetensors"
# key of the JSON config inside a standalone .safetensors file's header metadata
HEADER_CONFIG_KEY = "fisher_config"


STATS_CHUNK = 1 << 15  # elements: a 256 KB float64 chunk at a time


class GlobalStats(BaseModel):
    """Sum and sum of squares over every element of every tensor: enough for `mean` and `l2`."""

    model_config = ConfigDict(frozen=True)

    sum: float
    sum_sq: float
    num_elements: int

    @classmethod
    def of_tensor(cls, tensor) -> "GlobalStats":
        """In float64, without a float64 copy of the tensor (the reader's and the writer's one
        rule)."""
        import torch

        # in chunks: `vector_norm(dtype=float64)` upcasts its whole input internally (2x a
        # float32 tensor, measured by bench/bench_memory.py), which the writer cannot afford
        flat = tensor.reshape(-1)
        total = squares = 0.0
        for start in range(0, flat.numel(), STATS_CHUNK):
            chunk = flat[start : start + STATS_CHUNK].to(torch.float64)
            total += float(chunk.sum())
            squares += float(chunk.square_().sum())
            del chunk  # before the next one is made: one chunk alive at a time
        return cls(sum=total, sum_sq=squares, num_elements=tensor.numel())

    def __add__(self, other: "GlobalStats") -> "GlobalStats":
        return GlobalStats(
            sum=self.sum + other.sum,
            sum_sq=self.sum_sq + other.sum_sq,
            num_elements=self.num_elements + other.num_elements,
        )

    @property
    def mean(self) -> float:
        return self.sum / self.num_elements if self.num_elements else 0.0

    @property
    def l2(self) -> float:
        return math.sqrt(self.sum_sq)


class FisherConfig(BaseModel):
    """Provenance of a Fisher file. Unknown keys are kept, so newer writers stay readable."""

    model_config = ConfigDict(extra="allow", protected_namespaces=(), use_enum_values=True)

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    model: Optional[str] = Field(
        None, description="model the Fisher was computed for (path or hub id)"
    )
    model_path: Optional[str] = Field(
        None, description="`model` resolved: absolute, symlinks followed"
    )
    model_revision: Optional[str] = Field(
        None, description="Hub revision (commit) of `model`, for a Hub id"
    )
    model_fingerprint: Optional[str] = Field(
        None, description="identity of the model's weights (`tools.checkpoint.model_fingerprint`)"
    )
    adapter: Optional[str] = Field(
        None, description="PEFT adapter applied on top of `model`, if any"
    )
    adapter_path: Optional[str] = None
    adapter_fingerprint: Optional[str] = None
    space: Space = Field(
        Space.DENSE.value,
        description="dense: names/shapes of the (merged) checkpoint; adapter: lora_A/lora_B names",
    )
    statistic: Optional[Statistic] = Field(
        None,
        description="fisher (also when absent: files written before Gram files existed) | gram",
    )
    # Gram files only (statistic: gram, see fisher_file/gram.py)
    gram_counts: Optional[Dict[str, int]] = Field(
        None, description="per Gram tensor: the number of input rows (tokens) summed into it"
    )
    gram_transposed: Optional[List[str]] = Field(
        None, description="Gram tensors whose weight is stored [in, out] (HF Conv1D)"
    )
    gram_shared: Optional[Dict[str, str]] = Field(
        None,
        description="{layer weight: stored tensor}: layers whose input is another's (q/k/v, "
        "gate/up), whose Gram is stored once under that other name",
    )
    fisher_type: Optional[str] = Field(None, description="empirical | sampled | exact")
    task: Optional[str] = None
    num_examples: Optional[int] = None
    num_tokens: Optional[int] = None
    dataset: Optional[str] = None
    dataset_hash: Optional[str] = None
    dataset_subset: Optional[str] = Field(None, description="`datasets` config name (--subset)")
    dataset_split: Optional[str] = Field(None, description="`datasets` split read (--split)")
    dataset_revision: Optional[str] = Field(None, description="Hub revision of the dataset")
    text_field: Optional[str] = Field(None, description="column read as text (--text-field)")
    dataset_streamed: Optional[bool] = Field(None, description="read with --streaming")
    shard: Optional[str] = Field(None, description="`I/N`: the I-th of N disjoint data shards")
    samples_per_example: Optional[int] = None
    seed: Optional[int] = None
    dtype: Optional[str] = Field(None, description="dtype of the stored tensors")
    accumulator_dtype: Optional[str] = None
    sum: Optional[float] = Field(None, description="sum of all elements of all tensors")
    sum_sq: Optional[float] = Field(None, description="sum of squares of all elements")
    num_elements: Optional[int] = None
    tool_version: Optional[str] = None
    created: Optional[str] = None

    def global_stats(self) -> Optional[GlobalStats]:
        if self.sum is None or self.sum_sq is None or not self.num_elements:
            return None
        if not (math.isfinite(self.sum) and math.isfinite(self.sum_sq)):
            return None
        return GlobalStats(sum=self.sum, sum_sq=self.sum_sq, num_elements=self.num_elements)
