"""pytest set-up for the suite: offline Hub, thread count, the deprecation-notice guard and shared pytest fixtures.
The tiny configurations and data builders themselves are in fixtures.py."""

import logging
import os

import pytest
import torch
from fixtures import tiny_tcl_config, write_digit_shards

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


class _DeprecationNotices(logging.Handler):
    """Collects the deprecation notices that transformers logs (instead of warning) while a test runs."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.messages.append(f"{record.name}: {message}")


@pytest.fixture(autouse=True)
def _no_transformers_deprecation_notices():
    """A test during which transformers logs a deprecation notice fails, as the FutureWarning / DeprecationWarning
    filters in pyproject.toml make its warnings fail (transformers logs some deprecations once per process, so the
    first test that triggers one is the one that fails)."""
    handler = _DeprecationNotices()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.messages:
        pytest.fail("transformers logged a deprecation notice:\n" + "\n".join(handler.messages), pytrace=False)


@pytest.fixture
def tiny_config():
    return tiny_tcl_config()


@pytest.fixture(scope="session")
def digits_processor_16():
    from vlalign.data import build_digits_processor

    return build_digits_processor(image_size=16)


@pytest.fixture(scope="module")
def digits_small():
    """(DataArguments, train split, eval split) of the digits demo, 256 / 60 rows."""
    from vlalign.data import DataArguments, load_image_text_datasets

    args = DataArguments(max_train_samples=256, max_eval_samples=60)
    return args, *load_image_text_datasets(args)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Parquet and WebDataset-style tar shards of real digit scans, one undecodable image per format
    (fixtures.write_digit_shards)."""
    return write_digit_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def short_arrow_shutdown_pause(monkeypatch):
    """datasets pauses 5 s after each pass that interleaves parquet shards (shuffle reads up to 10 at a time) so
    pyarrow's reader threads can wind down; a fraction of that keeps many short passes fast. (The setting is
    new in datasets 5.0; with older releases there is nothing to shorten.)"""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.2, raising=False)
