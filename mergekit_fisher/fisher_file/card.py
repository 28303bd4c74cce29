"""The Fisher model card: `README.md` beside a Fisher directory, so a published Fisher says what it
is.

YAML front matter for the Hub (`library_name`, `base_model` / `datasets` where they are Hub ids,
`tags`), then what the Fisher is, how it was computed, a recipe that uses it, and how to cite the
method. Rendered from the file's own `fisher_config.json`: the card cannot disagree with the file.
"""

from __future__ import annotations

import re
from typing import Optional

import yaml

from mergekit_fisher.fisher_file.config import FisherConfig

CARD_NAME = "README.md"
TAGS = ["fisher-information", "mergekit", "mergekit-fisher", "model-merging"]
CITATION = """@inproceedings{matena2022merging,
  title     = {Merging Models with Fisher-Weighted Averaging},
  author    = {Matena, Michael and Raffel, Colin},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022},
  url       = {https://arxiv.org/abs/2111.09832}
}"""
GRAM_CITATION = """@inproceedings{jin2023dataless,
  title     = {Dataless Knowledge Fusion by Merging Weights of Language Models},
  author    = {Jin, Xisen and Ren, Xiang and Preotiuc-Pietro, Daniel and Cheng, Pengxiang},
  booktitle = {International Conference on Learning Representations},
  year      = {2023},
  url       = {https://arxiv.org/abs/2212.09849}
}"""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(value: Optional[str]) -> Optional[str]:
    return value if value and _HUB_ID.match(value) else None


def _is_gram(config: FisherConfig) -> bool:
    return getattr(config, "statistic", None) == "gram"


def recipe_snippet(config: FisherConfig, fisher_ref: str) -> str:
    model = config.model or "/path/to/this/model"
    if config.adapter:
        model = f"{model}+{config.adapter}"
    method, key = ("regmean", "gram") if _is_gram(config) else ("fisher", "fisher")
    return yaml.safe_dump(
        {
            "merge_method": method,
            "dtype": "bfloat16",
            "models": [
                {"model": model, "parameters": {"weight": 1.0, key: fisher_ref}},
                {
                    "model": "/path/to/another/fine-tune",
                    "parameters": {"weight": 1.0, key: f"/path/to/its/{key}"},
                },
            ],
        },
        sort_keys=False,
    )


def _about(config: FisherConfig) -> tuple:
    """(title, what it is, citation): a Gram file (RegMean) or a Fisher."""
    adapter = f" with the adapter `{config.adapter}`" if config.adapter else ""
    if _is_gram(config):
        return (
            f"Gram matrices (RegMean) of {config.model or 'a model'}",
            f"""The Gram matrices of `{config.model}`{adapter}: for every linear layer, the sum
over the data's non-padding tokens of xᵀx for the layer's inputs x, with the number of rows summed
(`gram_counts`). RegMean merges each linear layer by least squares on them (Jin et al., 2023).
Tensors are stored under the names of the layers' weights, as a Gram file (format v1,
`statistic: gram`) of [mergekit-fisher](https://github.com/mergekit-fisher/mergekit-fisher).""",
            GRAM_CITATION,
        )
    return (
        f"Fisher information of {config.model or 'a model'}",
        f"""The diagonal Fisher information of `{config.model}`{adapter}:
for every parameter, the mean over the data's examples of the squared gradient of the example's
log-likelihood. Fisher-weighted merging trusts each model where its Fisher is high (Matena & Raffel,
2022). Tensors are stored under the checkpoint's own names, in format v1 of
[mergekit-fisher](https://github.com/mergekit-fisher/mergekit-fisher).""",
        CITATION,
    )


def render_card(config: FisherConfig, fisher_ref: str) -> str:
    """The card for a Fisher whose recipe reference is `fisher_ref` (a path or a Hub id)."""
    meta = {"library_name": "mergekit-fisher", "tags": TAGS}
    if _hub_id(config.model):
        meta["base_model"] = config.model
    if _hub_id(config.dataset):
        meta["datasets"] = [config.dataset]
    rows = [
        ("model", config.model),
        ("model revision", getattr(config, "model_revision", None)),
        ("adapter", config.adapter),
        ("space", config.space),
        ("Fisher type", config.fisher_type),
        ("task", config.task),
        ("examples", config.num_examples),
        ("tokens", config.num_tokens),
        ("data", config.dataset),
        ("data subset", config.dataset_subset),
        ("data split", config.dataset_split),
        ("data revision", config.dataset_revision),
        ("text field", config.text_field),
        ("data shard", config.shard),
        ("data hash", config.dataset_hash),
        ("max length", getattr(config, "max_length", None)),
        ("samples per example", config.samples_per_example),
        ("seed", config.seed),
        ("stored dtype", config.dtype),
        ("accumulator dtype", config.accumulator_dtype),
        ("tool", f"mergekit-fisher {config.tool_version}" if config.tool_version else None),
        ("created", config.created),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows if value not in (None, ""))
    title, about, citation = _about(config)
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).rstrip()}
---
# {title}

{about}

## How it was computed

| | |
|---|---|
{table}

## Merge with it

With `pip install mergekit-fisher`, the stock `mergekit-yaml` runs:

```yaml
{recipe_snippet(config, fisher_ref).rstrip()}
```

## Citation

```bibtex
{citation}
```
"""
