"""The closed sets of choices of the command line, as `str` enums.

Each member *is* its string (``Task.SEQ_CLS == "seq-cls"``, same hash, ``f"{member}"`` and
``str(member)`` give the value), so recipes, Fisher configs, fingerprints and JSON keep the plain
strings they always had, and Python callers may pass either. `mergekit_fisher.cli.EnumChoice` turns
one into a ``click.Choice`` that matches the values. Standard library only: importing this is free.
(The recipe's choices live with the merge: `mergekit_fisher.math.Normalization`,
`mergekit_fisher.merge.parameters`.)
"""

from __future__ import annotations

import enum


class StrChoice(str, enum.Enum):
    """Base of the choice enums: formats and prints as its value (plain `str, Enum` prints
    ``Task.SEQ_CLS``)."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple:
        return tuple(member.value for member in cls)


class Task(StrChoice):
    CAUSAL_LM = "causal-lm"
    SEQ_CLS = "seq-cls"


class FisherType(StrChoice):
    EMPIRICAL = "empirical"  # the data's own labels
    SAMPLED = "sampled"  # labels drawn from the model: the true Fisher by Monte Carlo
    EXACT = "exact"  # a sum over every class (classifiers only)


class Statistic(StrChoice):
    """What a `compute` output holds (`fisher_config.json` `statistic`; absent = fisher)."""

    FISHER = "fisher"  # the diagonal Fisher of every parameter
    GRAM = "gram"  # XᵀX of every linear layer's inputs, for RegMean


class Params(StrChoice):
    """With --lora: which base tensors get a Fisher."""

    ALL = "all"
    ADAPTER_TARGETS = "adapter-targets"


class Space(StrChoice):
    """Names a Fisher file is written under: the dense checkpoint's, or a LoRA adapter's
    lora_A/lora_B."""

    DENSE = "dense"
    ADAPTER = "adapter"


class Dtype(StrChoice):
    """Model dtype during `compute`."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT64 = "float64"


class SaveDtype(StrChoice):
    """dtype of the stored Fisher tensors (`compute --save-dtype`)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class AccumulatorDtype(StrChoice):
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class Grouping(StrChoice):
    """`inspect --by`: one row per tensor, per layer, or per module type."""

    TENSOR = "tensor"
    LAYER = "layer"
    MODULE = "module"


class Domain(StrChoice):
    """The demo's text domains (`demo.corpus.DOMAINS`)."""

    DOCS = "docs"
    ASYNCIO = "asyncio"
    EMAIL = "email"
