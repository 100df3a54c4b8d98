"""The ``retrieval_recall`` `evaluate` metric: ``evaluate.load(vlalign.evaluation.RETRIEVAL_METRIC_PATH)``."""
