"""The ``retrieval_recall`` `evaluate` metric: ``evaluate.load(vlalign.metrics.RETRIEVAL_METRIC_PATH)``."""
