"""Fisher file format v1: what `compute` writes and the merge methods read.

A Fisher file is either

* one ``.safetensors`` file (its provenance as JSON in the header metadata key ``fisher_config``),
  or
* a directory holding ``fisher_config.json`` and either ``fisher.safetensors`` or HF-style shards
  ``fisher-00001-of-0000N.safetensors`` with ``fisher.safetensors.index.json``
  (the schema of ``model.safetensors.index.json``).

Tensor names are the model checkpoint's own names; values are float32 or bfloat16, finite, >= 0.
"""

from mergekit_fisher.fisher_file.config import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FisherConfig,
    GlobalStats,
)
from mergekit_fisher.fisher_file.reader import FisherFile, check_fisher_values, open_fisher
from mergekit_fisher.fisher_file.writer import (
    FisherWriter,
    check_output_free,
    parse_shard_size,
    write_fisher,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FisherConfig",
    "FisherFile",
    "FisherWriter",
    "GlobalStats",
    "check_fisher_values",
    "check_output_free",
    "open_fisher",
    "parse_shard_size",
    "write_fisher",
]
