"""The end-to-end demo (`mergekit-fisher demo`) and held-out evaluation (`mergekit-fisher eval`).

corpus (stdlib text as domains) -> tokenizer -> train (base + specialists) -> pipeline (compute
Fisher, merge with mergekit-yaml, evaluate, plot). Only `evaluate` is meant for use outside the
demo.
"""
