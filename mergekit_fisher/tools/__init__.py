"""Tools that read Fisher files without merging: inspect, combine, convert (and explain's helpers).

Module map (small, one job each):

* `grouping`   -- checkpoint name -> (layer index, module type); used by inspect `--by` and explain.
* `report`     -- plain-text tables and human-readable numbers.
* `plotting`   -- matplotlib heatmap of per-layer Fisher shares (optional extra ``[plot]``).
* `checkpoint` -- tensor names and shapes of a model checkpoint, from safetensors headers only.
* `stats`      -- per-tensor summary statistics and their aggregation into groups.
* `names`      -- mapping foreign tensor names (``module.``, PEFT, ``_orig_mod.``) onto checkpoint
                  names.
* `inspect`, `combine`, `convert`, `explain` -- the click commands.
"""
