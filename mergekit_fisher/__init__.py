"""Fisher-weighted merging for mergekit.

Three rooms, importable on their own:

* ``mergekit_fisher.math``      -- the tensor math as small pure functions (no I/O, no mergekit);
* ``mergekit_fisher.merge``     -- the mergekit adapter: method registration, lazy Fisher reads, validation;
* ``mergekit_fisher.estimator`` -- the Fisher estimator: data -> hooks -> accumulators -> writer.

``mergekit_fisher.fisher_file`` holds the on-disk Fisher format (v1) that links them, and
``mergekit_fisher.cli`` the thin command line. Importing this package imports neither torch nor
mergekit: the ``.pth`` start-up hook relies on that.
"""

__version__ = "0.1.0"
