"""Training data (training-only: never saved with a model): where it comes from, how it is decoded, how rows become
batches, and the embedded demos.

- `get_data` (below): the one entry point of a training run, in the manner of open_clip's `get_data`.
- `sources.py`: `DataArguments` / `MIVCDataArguments`, loading the splits (`datasets.load_dataset` or a demo),
  streaming, brace expansion of shard lists, row keys, the training-data fingerprint, zero-shot class names.
- `decoding.py`: hostile data: image decoding (size limits before decoding, EXIF orientation, colour modes through
  `processing_vlalign.to_rgb`), caption sanitising, and the counts of what was refused or repaired, by reason.
- `collators.py`: `ImageTextCollator` (contrastive batches, two views) and `MultiImageCollator` (MIVC), resumable.
- `tokenizer_training.py`: a tokenizer trained offline on the training captions (`train_caption_tokenizer`), and
  how well a tokenizer fits them (`measure_caption_fit`: unknown tokens, captions cut at max_length).
- `digits.py`, `multiview_digits.py`, `digit_scenes.py`: the offline demos built from scikit-learn's real scans
  (`python -m vlalign.data.digit_scenes OUT` writes the scenes as an image folder).

Images stay *undecoded* in the datasets (`datasets.Image(decode=False)`) and are decoded in the collator, so a corrupt
file skips one row instead of crashing a training run hours in. Decoding an eval split for retrieval / zero-shot
evaluation (`build_eval_inputs`) is in `vlalign.evaluation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .collators import ImageTextCollator, MultiImageCollator, ResumableCollator
from .decoding import (
    CAPTION_FIX_REASONS,
    CAPTION_SKIP_REASONS,
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_SKIP_REASONS,
    DataIssueCounts,
    ImageDecodeError,
    decode_image,
    image_skip_reason,
    sanitise_caption,
)
from .digit_scenes import build_digit_scenes_dataset, build_digit_scenes_processor, write_digit_scenes_imagefolder
from .digits import (
    DIGIT_CAPTION_TEMPLATES,
    DIGIT_NAMES,
    DIGIT_ZERO_SHOT_TEMPLATES,
    GENERIC_ZERO_SHOT_TEMPLATES,
    build_digits_dataset,
    build_digits_processor,
    build_digits_tokenizer,
    digit_captions,
)
from .multiview_digits import MIVC_DIGITS_PROMPT, build_mivc_digits_processor, build_multiview_digits_dataset
from .sources import (
    MAX_EXPANDED_DATA_FILES,
    ROW_ID_COLUMN,
    DataArguments,
    MIVCDataArguments,
    expand_braces,
    expand_data_files,
    load_image_text_datasets,
    load_multi_image_datasets,
    resolve_class_names,
    training_data_fingerprint,
)
from .tokenizer_training import (
    BPE_SPECIAL_TOKENS,
    MIN_TOKENIZER_VOCAB_SIZE,
    TOKENIZER_KINDS,
    WORDPIECE_SPECIAL_TOKENS,
    CaptionFit,
    caption_sample,
    captions_of_split,
    measure_caption_fit,
    train_caption_tokenizer,
)

__all__ = [
    "BPE_SPECIAL_TOKENS",
    "CAPTION_FIX_REASONS",
    "CAPTION_SKIP_REASONS",
    "DEFAULT_MAX_CAPTION_CHARS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DIGIT_CAPTION_TEMPLATES",
    "DIGIT_NAMES",
    "DIGIT_ZERO_SHOT_TEMPLATES",
    "GENERIC_ZERO_SHOT_TEMPLATES",
    "IMAGE_SKIP_REASONS",
    "MAX_EXPANDED_DATA_FILES",
    "MIN_TOKENIZER_VOCAB_SIZE",
    "MIVC_DIGITS_PROMPT",
    "ROW_ID_COLUMN",
    "TOKENIZER_KINDS",
    "WORDPIECE_SPECIAL_TOKENS",
    "CaptionFit",
    "DataArguments",
    "DataIssueCounts",
    "ImageDecodeError",
    "ImageTextCollator",
    "MIVCDataArguments",
    "MultiImageCollator",
    "ResumableCollator",
    "TrainingData",
    "build_digit_scenes_dataset",
    "build_digit_scenes_processor",
    "build_digits_dataset",
    "build_digits_processor",
    "build_digits_tokenizer",
    "build_mivc_digits_processor",
    "build_multiview_digits_dataset",
    "caption_sample",
    "captions_of_split",
    "decode_image",
    "digit_captions",
    "expand_braces",
    "expand_data_files",
    "get_data",
    "image_skip_reason",
    "load_image_text_datasets",
    "load_multi_image_datasets",
    "measure_caption_fit",
    "resolve_class_names",
    "sanitise_caption",
    "train_caption_tokenizer",
    "training_data_fingerprint",
    "write_digit_scenes_imagefolder",
]


@dataclass
class TrainingData:
    """What `get_data` returns for a training run.

    `train_dataset` / `eval_dataset`: the splits (images undecoded; `eval_dataset` None without an eval split; the
    training split of a stream is a `datasets.IterableDataset`). `collator`: turns training rows into batches for the
    processor. `class_names`: zero-shot class names (`resolve_class_names`; None for multi-image data).
    `train_fingerprint`: `training_data_fingerprint` of the training split (kept in checkpoints, None for a stream).
    `num_train_samples`: rows in the training split (None for a stream, whose length is unknown).
    """

    train_dataset: Any
    eval_dataset: Any
    collator: ImageTextCollator | MultiImageCollator
    class_names: list[str] | None
    train_fingerprint: str | None
    num_train_samples: int | None


def get_data(
    data_args: DataArguments | MIVCDataArguments, processor, seed: int = 0, collator_seed: int | None = None
) -> TrainingData:
    """The training data that `data_args` describe, ready for a Trainer.

    `DataArguments` (image-text pairs): `load_image_text_datasets(data_args, seed)` and an
    `ImageTextCollator.from_data_args(processor, data_args, seed=collator_seed)`. `MIVCDataArguments` (multi-image
    items): `load_multi_image_datasets(data_args, seed)` and a `MultiImageCollator` on its columns. `seed` seeds
    loading (a stream's shuffle buffer, the multi-view digits items); `collator_seed` (default: `seed`) the collator's
    caption choice and augmentation. The lower-level functions stay public for other uses.
    """
    if isinstance(data_args, MIVCDataArguments):
        train, evaluation = load_multi_image_datasets(data_args, seed=seed)
        collator = MultiImageCollator.from_data_args(processor, data_args)
        class_names = None
    elif isinstance(data_args, DataArguments):
        train, evaluation = load_image_text_datasets(data_args, seed=seed)
        collator = ImageTextCollator.from_data_args(
            processor, data_args, seed=seed if collator_seed is None else collator_seed
        )
        class_names = resolve_class_names(train, data_args)
    else:
        raise TypeError(f"data_args must be DataArguments or MIVCDataArguments, got {type(data_args).__name__}")
    streaming = getattr(data_args, "streaming", False)
    return TrainingData(
        train, evaluation, collator, class_names, training_data_fingerprint(train), None if streaming else len(train)
    )
