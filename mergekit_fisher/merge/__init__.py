"""The mergekit adapter room: method registration, Fisher resolution, lazy Fisher reads.

- `registry`   -- the one visible place where methods are registered and the planner is hooked;
- `methods`    -- the merge methods (`fisher`, `fisher_ties`, ...): mergekit specs + kernels over
                  `mergekit_fisher.math`; each input's Fisher arrives as its `fisher` parameter;
- `parameters` -- the Fisher recipe parameters and their allowed values;
- `resolution` -- which Fisher file and tensor serves each input, validated at plan time;
- `tasks`      -- the graph tasks that load those Fishers lazily and bind them to the kernel;
- `cli`        -- `mergekit-fisher merge`, for environments that skip `.pth` start-up files.
"""

# mergekit's method package first, before any module of this room: with the start-up hook on, its
# completion registers our methods (importing `methods` from scratch). Were a room module to
# trigger that import itself, the hook would find it half-initialized. See `registry`.
import mergekit.merge_methods  # noqa: F401
