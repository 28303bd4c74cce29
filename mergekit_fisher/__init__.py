"""Fisher-weighted merging for mergekit.

The rooms, importable on their own:

* ``mergekit_fisher.math``        -- the tensor math as small pure functions (no I/O, no mergekit);
* ``mergekit_fisher.merge``       -- the mergekit adapter: registration, Fisher resolution,
                                     lazy reads;
* ``mergekit_fisher.estimator``   -- the Fisher estimator: data -> hooks -> accumulators -> writer;
* ``mergekit_fisher.fisher_file`` -- the on-disk Fisher format (v1) that links them;
* ``mergekit_fisher.tools``       -- inspect, explain, combine, convert;
* ``mergekit_fisher.cli``         -- the thin command line.

The Python API (`mergekit_fisher.api`) is re-exported here: ``compute_fisher``, ``open_fisher``,
``register``. Importing this package imports neither torch nor mergekit (the ``.pth`` start-up hook
relies on that): the API functions load them when called.
"""

__version__ = "0.1.0"

from mergekit_fisher.api import compute_fisher, open_fisher, register  # noqa: E402

__all__ = ["__version__", "compute_fisher", "open_fisher", "register"]
