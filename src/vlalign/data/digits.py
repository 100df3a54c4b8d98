"""The embedded handwritten-digits demo: scikit-learn's 1797 real 8x8 scans as an image-caption dataset, with an
offline tokenizer and processor that cover its captions and zero-shot templates (the MIVC and instance-level demos
built from the same scans are `multiview_digits.py` and `digit_scenes.py`)."""

from __future__ import annotations

import io
import os
import string

import datasets
import numpy as np
from PIL import Image

from ..processing_vlalign import DEFAULT_AUGMENTATION, VLAlignProcessor

__all__ = [
    "DIGIT_CAPTION_TEMPLATES",
    "DIGIT_NAMES",
    "DIGIT_ZERO_SHOT_TEMPLATES",
    "GENERIC_ZERO_SHOT_TEMPLATES",
    "build_digits_dataset",
    "build_digits_processor",
    "build_digits_tokenizer",
    "digit_captions",
]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

DIGIT_CAPTION_TEMPLATES = [
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a scan of a handwritten {name}",
    "a pen drawing of the digit {digit}",
    "a low resolution image of the number {name}",
    "a blurry photo of a handwritten {digit}",
    "the digit {name}, written in dark ink on paper",
    "a small picture showing the numeral {digit} ({name})",
]

DIGIT_ZERO_SHOT_TEMPLATES = [
    "a handwritten digit {name}",
    "the number {digit} written by hand",
    "a scan of a handwritten {name}",
]

GENERIC_ZERO_SHOT_TEMPLATES = ["a photo of a {name}."]

_DIGITS_SPLITS = ("train", "test")


def digit_captions(label: int) -> list[str]:
    """All caption templates filled in for one digit."""
    return [t.format(name=DIGIT_NAMES[label], digit=label) for t in DIGIT_CAPTION_TEMPLATES]


def _digit_to_png(pixels: np.ndarray, image_size: int) -> bytes:
    """8x8 sklearn digit (0..16, 16 = ink) -> PNG bytes of a dark-ink-on-light-paper grayscale image."""
    ink = np.clip(np.round(pixels.reshape(8, 8) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    paper = Image.fromarray(255 - ink)  # invert: looks like a scan of pen on paper
    if image_size != 8:
        paper = paper.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    paper.save(buffer, format="PNG")
    return buffer.getvalue()


def build_digits_dataset(image_size: int = 32, cache_dir: str | None = None) -> datasets.DatasetDict:
    """The embedded demo: scikit-learn's 1797 real 8x8 handwritten digits as an image-caption dataset.

    Splits: rows with `index % 5 == 0` -> "test" (360), the rest -> "train" (1437). Columns: `image`
    (PNG, `datasets.Image()`), `caption` (list of all `DIGIT_CAPTION_TEMPLATES` for the digit), `label`
    (`ClassLabel(names=DIGIT_NAMES)`), `image_id` (sklearn index). Built in memory; with `cache_dir` the result
    is saved there with `save_to_disk` and reused.
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    image_size = int(image_size)
    cache_path = os.path.join(cache_dir, f"vlalign_digits_{image_size}") if cache_dir else None
    if cache_path and os.path.isdir(cache_path):
        return datasets.load_from_disk(cache_path)

    from sklearn.datasets import load_digits  # ships its data with the wheel: no download

    digits = load_digits()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.List(datasets.Value("string")),
            "label": datasets.ClassLabel(names=DIGIT_NAMES),
            "image_id": datasets.Value("int64"),
        }
    )
    columns: dict[str, dict[str, list]] = {split: {k: [] for k in features} for split in _DIGITS_SPLITS}
    for index, (pixels, label) in enumerate(zip(digits.data, digits.target)):
        split = "test" if index % 5 == 0 else "train"
        columns[split]["image"].append({"bytes": _digit_to_png(pixels, image_size), "path": None})
        columns[split]["caption"].append(digit_captions(int(label)))
        columns[split]["label"].append(int(label))
        columns[split]["image_id"].append(index)
    result = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(columns[split], features=features) for split in _DIGITS_SPLITS}
    )
    if cache_path:
        result.save_to_disk(cache_path)
    return result


def _digits_vocabulary_words() -> list[str]:
    """Every pre-token (lowercased) of the digit captions, zero-shot templates and the generic template."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = []
    for label in range(10):
        for template in DIGIT_CAPTION_TEMPLATES + DIGIT_ZERO_SHOT_TEMPLATES + GENERIC_ZERO_SHOT_TEMPLATES:
            texts.append(template.format(name=DIGIT_NAMES[label], digit=label))
    words = set()
    for text in texts:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return sorted(words)


def build_digits_tokenizer(model_max_length: int = 64, extra_words: list[str] | tuple[str, ...] = ()):
    """An offline BERT WordPiece tokenizer whose vocabulary covers the digit captions and templates.

    Vocabulary (deterministic order): [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, digits 0-9, ASCII
    punctuation, single letters a-z plus their `##` continuations (so unseen lowercase words split into letters
    instead of becoming [UNK]), then all caption/template words sorted, then `extra_words` not yet present (sorted,
    lowercased). Lowercasing is on.
    """
    from transformers import BertTokenizer  # the tokenizers-backed ("fast") BERT tokenizer in transformers 5

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(string.digits) + list(string.punctuation)
    tokens += list(string.ascii_lowercase)
    tokens += ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(tokens)
    for word in _digits_vocabulary_words() + sorted({w.lower() for w in extra_words}):
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    vocab = {token: index for index, token in enumerate(tokens)}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)


def build_digits_processor(image_size: int = 32) -> VLAlignProcessor:
    """Processor for the digits demo: PIL ViT image processor (mean/std 0.5), digits tokenizer, default
    augmentation except no horizontal flip (a mirrored digit is not that digit) and a milder crop (0.5, 1.0)
    so the digit mostly stays in view; max_length 16."""
    from transformers import ViTImageProcessorPil

    image_processor = ViTImageProcessorPil(
        size={"height": int(image_size), "width": int(image_size)},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_resize=True,
    )
    augmentation = dict(DEFAULT_AUGMENTATION, hflip_p=0.0, crop_scale=[0.5, 1.0])
    return VLAlignProcessor(
        image_processor=image_processor,
        tokenizer=build_digits_tokenizer(),
        augmentation=augmentation,
        max_length=16,
    )
