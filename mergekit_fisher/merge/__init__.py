"""The mergekit adapter room: method registration, lazy Fisher reads, validation.

- `registry`  -- the one visible place where methods are registered and the planner is hooked;
- `methods`   -- the merge methods (`fisher`, `fisher_ties`, ...): mergekit specs + kernels over `mergekit_fisher.math`;
- `planning`  -- graph tasks that load each *input's* Fisher tensor lazily and attach it to the merge task;
- `sources`   -- recipe-level validation of Fisher files against the models, before anything is merged;
- `cli`       -- `mergekit-fisher merge`, for environments that skip `.pth` start-up files.
"""
