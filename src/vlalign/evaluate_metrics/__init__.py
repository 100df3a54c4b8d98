"""`evaluate` metric scripts shipped with vlalign; load them by path, e.g.
``evaluate.load(vlalign.evaluation.RETRIEVAL_METRIC_PATH)``."""
