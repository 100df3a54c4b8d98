"""Shared tiny configurations: every test builds random tiny models, nothing is downloaded."""

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_VISION = dict(
    model_type="vit", image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64,
)
TINY_TEXT = dict(
    model_type="bert", vocab_size=144, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=32, pad_token_id=0,
)


# A script prefix that makes `import vlalign` fail, so a subprocess proves that a saved folder loads through
# transformers' remote code alone (the script can end by importing vlalign and expect the ImportError).
BLOCK_VLALIGN = """import sys
sys.path = [p for p in sys.path if 'vlalign' not in p and not p.endswith('/src')]
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'vlalign' or name.startswith('vlalign.'):
            raise ImportError('vlalign is blocked in this test')
sys.meta_path.insert(0, Block())
"""

# The `model` section of a training-script config for a tiny TCL model (training/train.py tests).
TINY_TRAIN_MODEL = {
    "vision_config": {"model_type": "vit", "image_size": 16, "patch_size": 4, "hidden_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
    "text_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "intermediate_size": 64, "max_position_embeddings": 32},
    "num_fusion_layers": 1, "embed_dim": 16, "queue_size": 64, "lmi_image_grid": 2,
}


def tiny_tcl_config(**overrides):
    from vlalign import TCLConfig

    kwargs = dict(
        vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT), num_fusion_layers=1, embed_dim=16,
        queue_size=32, mask_token_id=4, lmi_image_grid=2,
    )
    kwargs.update(overrides)
    return TCLConfig(**kwargs)


def tiny_codis_config(**overrides):
    from vlalign import CODISConfig

    kwargs = dict(
        vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT), num_fusion_layers=1, embed_dim=16,
        queue_size=32, mask_token_id=4, codebook_size=12,
    )
    kwargs.update(overrides)
    return CODISConfig(**kwargs)


def tiny_batch(batch=4, length=8, seed=0, image_size=16):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 144, (batch, length), generator=g)
    input_ids[:, 0] = 2
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(batch, 3, image_size, image_size, generator=g),
        pixel_values_view2=torch.randn(batch, 3, image_size, image_size, generator=g),
    )


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
