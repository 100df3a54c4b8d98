"""`evaluate` metric scripts shipped with vlalign; load them by path, e.g.
``evaluate.load(vlalign.metrics.RETRIEVAL_METRIC_PATH)``."""
