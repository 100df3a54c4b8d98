"""Image-text data: the embedded handwritten-digits demo, generic `datasets` loading, decoding and collation.

Design notes:
- Images stay *undecoded* in the datasets (`datasets.Image(decode=False)`) and are decoded in the collator, so
  a corrupt file skips one row instead of crashing a training run hours in.
- Positives for the contrastive losses are expressed as integer `positive_ids`: items with equal ids are
  positives (same label for labelled data such as digits, otherwise the same image).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import stat
import string
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .processing_vlalign import DEFAULT_AUGMENTATION, VLAlignProcessor, to_rgb

__all__ = [
    "CAPTION_FIX_REASONS",
    "CAPTION_SKIP_REASONS",
    "DEFAULT_MAX_CAPTION_CHARS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DIGIT_CAPTION_TEMPLATES",
    "DIGIT_NAMES",
    "DIGIT_ZERO_SHOT_TEMPLATES",
    "GENERIC_ZERO_SHOT_TEMPLATES",
    "IMAGE_SKIP_REASONS",
    "ROW_ID_COLUMN",
    "DataArguments",
    "DataIssueCounts",
    "EvalInputs",
    "ImageDecodeError",
    "ImageTextCollator",
    "build_digits_dataset",
    "build_digits_processor",
    "build_digits_tokenizer",
    "build_eval_inputs",
    "decode_image",
    "digit_captions",
    "expand_braces",
    "expand_data_files",
    "load_image_text_datasets",
    "resolve_class_names",
    "sanitise_caption",
]

logger = logging.getLogger("vlalign.data")

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

# Column added by `load_image_text_datasets` when `image_id_column` is None: the row index in the split, so
# "same image" positives stay globally unique (needed once ids are compared against a momentum queue).
ROW_ID_COLUMN = "__vlalign_row_id__"

_DIGITS_SPLITS = ("train", "test")

# PIL's own warning threshold (about 9459 x 9459 pixels, 256 MiB as RGB). PIL refuses at twice its
# `Image.MAX_IMAGE_PIXELS` by itself; our limit is checked first and can only be stricter than that.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Far above any tokenizer's max_length in characters, yet cheap: a 1 MB caption is cut before tokenising.
DEFAULT_MAX_CAPTION_CHARS = 4096


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


@dataclass
class DataArguments:
    """Which image-text data to train and evaluate on (HfArgumentParser-compatible).

    `dataset_name` is anything `datasets.load_dataset` takes (Hub name, "imagefolder", "parquet", "json", a
    local path) or "digits" for the embedded demo. `data_files` may be a str, list or dict when set from
    Python/YAML; on the command line pass a path or a JSON list/dict string. File patterns may use globs (`*`) and
    brace ranges or lists (`train-{00000..00099}.tar`, see `expand_braces`). Column names may name a field of a
    struct column with a dot (`label_column: json.label` for WebDataset `.json` files).

    `streaming: true` reads the training split as a `datasets.IterableDataset` (local parquet or WebDataset tar
    shards, Hub datasets...), shuffled with a buffer of `shuffle_buffer_size` rows; training then needs
    `max_steps`, and a streamed eval split is read up to `max_eval_samples` rows (required). See
    `load_image_text_datasets`.

    Hostile data: images with more than `max_image_pixels` pixels are refused from their header, before decoding;
    captions longer than `max_caption_chars` characters are cut before tokenising (see `decode_image`,
    `sanitise_caption`).
    """

    dataset_name: str = field(default="digits", metadata={"help": 'load_dataset name/path, or "digits".'})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir passed to load_dataset."})
    # Typed `str | None` for HfArgumentParser (it rejects wider unions); lists/dicts are accepted at runtime.
    data_files: str | None = field(default=None, metadata={"help": "data_files (str, JSON list or dict)."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    caption_column: str = field(default="caption", metadata={"help": "Column holding a caption or a list."})
    label_column: str | None = field(default="label", metadata={"help": "Class label column, or None."})
    image_id_column: str | None = field(default="image_id", metadata={"help": "Image id column; None: row."})
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    eval_split: str | None = field(default="test", metadata={"help": "Eval split name (None: no eval)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the eval split."})
    class_names: list[str] | None = field(default=None, metadata={"help": "Zero-shot class names."})
    zero_shot_templates: list[str] | None = field(
        default=None, metadata={"help": "Prompts with {name} and/or {digit} placeholders."}
    )
    positives_by: str = field(default="label", metadata={"help": '"label" or "image".'})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache directory."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream the training split (a datasets IterableDataset; needs max_steps)."}
    )
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "Streaming: rows in the shuffle buffer."})
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={"help": "Refuse images with more pixels, from their header before decoding (decompression bombs)."},
    )
    max_caption_chars: int = field(
        default=DEFAULT_MAX_CAPTION_CHARS, metadata={"help": "Cut longer captions (cheaply) before tokenising."}
    )

    def __post_init__(self):
        if not isinstance(self.dataset_name, str) or not self.dataset_name.strip():
            raise ValueError(f"dataset_name must be a non-empty string, got {self.dataset_name!r}")
        for name in ("image_column", "caption_column", "train_split"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        for name in ("label_column", "image_id_column", "eval_split", "dataset_config_name", "data_dir", "cache_dir"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
                # The command line cannot express None for a field with a non-None default; accept spellings of it.
                value = None
                setattr(self, name, None)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be None or a non-empty string, got {value!r}")
        if isinstance(self.data_files, str) and self.data_files.strip()[:1] in ("[", "{"):
            try:
                self.data_files = json.loads(self.data_files)
            except json.JSONDecodeError as error:
                raise ValueError(f"data_files looks like JSON but does not parse: {error}") from error
        if self.data_files is not None and not isinstance(self.data_files, (str, list, tuple, dict)):
            raise ValueError(f"data_files must be a str, list, dict or None, got {type(self.data_files).__name__}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if self.positives_by not in ("label", "image"):
            raise ValueError(f'positives_by must be "label" or "image", got {self.positives_by!r}')
        if not isinstance(self.streaming, bool):
            raise ValueError(f"streaming must be true or false, got {self.streaming!r}")
        value = self.shuffle_buffer_size
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"shuffle_buffer_size must be a positive int, got {value!r}")
        _check_positive_int("max_image_pixels", self.max_image_pixels)
        _check_positive_int("max_caption_chars", self.max_caption_chars)
        if self.class_names is not None:
            names = list(self.class_names)
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ValueError(f"class_names must be a non-empty list of unique non-empty strings, got {names!r}")
            self.class_names = names
        if self.zero_shot_templates is None:
            self.zero_shot_templates = list(
                DIGIT_ZERO_SHOT_TEMPLATES if self.dataset_name == "digits" else GENERIC_ZERO_SHOT_TEMPLATES
            )
        else:
            templates = list(self.zero_shot_templates)
            if not templates:
                raise ValueError("zero_shot_templates must not be empty")
            for template in templates:
                if not isinstance(template, str) or ("{name}" not in template and "{digit}" not in template):
                    raise ValueError(
                        f"zero_shot_templates entries need a {{name}} or {{digit}} placeholder: {template!r}"
                    )
                try:
                    template.format(name="x", digit=0)
                except (KeyError, IndexError, ValueError) as error:
                    raise ValueError(f"zero_shot_templates entry {template!r} does not format: {error!r}") from error
            self.zero_shot_templates = templates


def _check_columns(dataset: datasets.Dataset, args: DataArguments, split: str) -> None:
    required = {"image_column": args.image_column, "caption_column": args.caption_column}
    if args.label_column is not None:
        required["label_column"] = args.label_column
    if args.image_id_column is not None:
        required["image_id_column"] = args.image_id_column
    for field_name, column in required.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"{field_name}={column!r} not found in split {split!r}; available columns: {dataset.column_names}"
                + ("" if field_name in ("image_column", "caption_column") else f" (set {field_name}=None if absent)")
            )


def _prepare_split(dataset: datasets.Dataset, args: DataArguments, max_samples: int | None) -> datasets.Dataset:
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    feature = dataset.features.get(args.image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        # Decode lazily in the collator, where a corrupt image can be skipped instead of raising in __getitem__.
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    if ROW_ID_COLUMN not in dataset.column_names:
        # the row index: an image id when the data has none, and the sample index of per-sample statistics
        dataset = dataset.add_column(ROW_ID_COLUMN, list(range(len(dataset))))
    return dataset


def _encode_string_labels(splits: dict[str, datasets.Dataset], column: str) -> dict[str, datasets.Dataset]:
    """String labels -> one shared ClassLabel (sorted names) across splits, so ids agree between train and eval."""
    names = sorted({str(v) for ds in splits.values() for v in ds[column] if v is not None})
    class_label = datasets.ClassLabel(names=names)
    return {k: ds.cast_column(column, class_label) for k, ds in splits.items()}


_BRACE_GROUP = re.compile(r"\{([^{}]*)\}")
_BRACE_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
MAX_EXPANDED_DATA_FILES = 1_000_000


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion of one file pattern, the way WebDataset shard lists are written:
    `train-{00000..00099}.tar` gives the 100 names (zero-padded to the bounds' width when a bound has a leading
    zero, as bash does; descending ranges count down) and `{train,extra}-*.tar` the alternatives. Several groups
    expand left to right. A group that is neither a range nor a comma list (`{}`, `{name}`) is kept literally; glob
    characters are left for `datasets` to resolve. ValueError beyond `MAX_EXPANDED_DATA_FILES` names."""
    expanded: list[str] = []
    pending = [pattern]
    while pending:
        current = pending.pop()
        for match in _BRACE_GROUP.finditer(current):
            body = match.group(1)
            bounds = _BRACE_RANGE.fullmatch(body)
            if bounds:
                first, last = bounds.groups()
                padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (first, last))
                width = max(len(first), len(last)) if padded else 0
                step = 1 if int(last) >= int(first) else -1
                if abs(int(last) - int(first)) >= MAX_EXPANDED_DATA_FILES:
                    raise ValueError(f"data_files pattern {pattern!r} expands to more than "
                                     f"{MAX_EXPANDED_DATA_FILES} names")
                choices = [f"{i:0{width}d}" for i in range(int(first), int(last) + step, step)]
            elif "," in body:
                choices = body.split(",")
            else:
                continue
            head, tail = current[:match.start()], current[match.end():]
            pending.extend(head + choice + tail for choice in reversed(choices))
            break
        else:
            expanded.append(current)
        if len(expanded) + len(pending) > MAX_EXPANDED_DATA_FILES:
            raise ValueError(f"data_files pattern {pattern!r} expands to more than {MAX_EXPANDED_DATA_FILES} "
                             "names")
    return list(dict.fromkeys(expanded))  # nested groups can repeat a name


def expand_data_files(data_files: Any) -> Any:
    """`data_files` (a str, list or dict of either) with brace patterns expanded (`expand_braces`); `datasets`
    itself resolves globs (`*`) but not braces. A str without braces is returned unchanged."""
    if data_files is None:
        return None
    if isinstance(data_files, dict):
        return {split: expand_data_files(files) for split, files in data_files.items()}
    if isinstance(data_files, str):
        names = expand_braces(data_files)
        return names[0] if names == [data_files] else names
    return [name for files in data_files for name in expand_braces(files)]


def _load_splits(args: DataArguments, streaming: bool) -> dict:
    """All splits of the configured source: the embedded digits demo (always in memory) or `load_dataset`."""
    if args.dataset_name == "digits":
        return build_digits_dataset(cache_dir=args.cache_dir)
    loaded = datasets.load_dataset(args.dataset_name, args.dataset_config_name, data_dir=args.data_dir,
                                   data_files=expand_data_files(args.data_files), cache_dir=args.cache_dir,
                                   streaming=streaming)
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return dict(loaded)
    return {"train": loaded}


def load_image_text_datasets(
    args: DataArguments, seed: int = 0
) -> tuple[datasets.Dataset | datasets.IterableDataset, datasets.Dataset | None]:
    """Load (train, eval) splits described by `args`; eval is None when `eval_split` is None or missing.

    Checks the configured columns exist (ValueError listing the available ones), casts Image columns to
    `Image(decode=False)`, encodes string labels as a ClassLabel shared by both splits, adds `ROW_ID_COLUMN`
    when `image_id_column` is None, and applies `max_train_samples`/`max_eval_samples`. A column name with a dot
    (`json.label`) that is not a column itself names a field of a struct column (WebDataset `.json` files) and is
    copied to a top-level column of that name.

    With `args.streaming` the training split is a `datasets.IterableDataset` (`load_dataset(..., streaming=True)`;
    the digits demo is converted with `to_iterable_dataset`), see `_load_streaming_datasets`; `seed` seeds its
    shuffle buffer (map-style splits are shuffled by the Trainer's sampler instead).
    """
    if args.streaming:
        return _load_streaming_datasets(args, seed)
    all_splits = _load_splits(args, streaming=False)
    chosen = _choose_splits(all_splits, args)
    for split_name, dataset in chosen.items():
        chosen[split_name] = dataset = _lift_nested_columns(dataset, args)
        _check_columns(dataset, args, args.train_split if split_name == "train" else args.eval_split)
    if args.label_column is not None:
        feature = chosen["train"].features[args.label_column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            chosen = _encode_string_labels(chosen, args.label_column)
    train = _prepare_split(chosen["train"], args, args.max_train_samples)
    evaluation = _prepare_split(chosen["eval"], args, args.max_eval_samples) if "eval" in chosen else None
    return train, evaluation


def _choose_splits(all_splits, args: DataArguments) -> dict:
    """{"train": ..., "eval": ...} from a split mapping (eval left out, with a warning, when it does not exist)."""
    if args.train_split not in all_splits:
        raise ValueError(f"train_split={args.train_split!r} not found; available splits: {list(all_splits)}")
    chosen = {"train": all_splits[args.train_split]}
    if args.eval_split is not None:
        if args.eval_split in all_splits:
            chosen["eval"] = all_splits[args.eval_split]
        else:
            logger.warning("eval_split=%r not found (splits: %s); no eval set", args.eval_split, list(all_splits))
    return chosen


def _lift_nested_columns(dataset, args: DataArguments):
    """Copy `struct.field` columns named in `args` (e.g. `label_column: json.label`) to top-level columns."""
    features = dataset.features
    lifted: dict[str, tuple[str, tuple[str, ...]]] = {}
    new_features = {}
    for name in (args.image_column, args.caption_column, args.label_column, args.image_id_column):
        if not name or "." not in name or name in features or name in lifted:
            continue
        head, *path = name.split(".")
        feature = features.get(head)
        for key in path:
            feature = feature.get(key) if isinstance(feature, dict) else None
        if feature is not None:  # otherwise `_check_columns` reports the missing column
            lifted[name] = (head, tuple(path))
            new_features[name] = feature
    if not lifted:
        return dataset
    heads = sorted({head for head, _ in lifted.values()})
    # input_columns: only the struct columns are read, so no image is decoded here
    return dataset.map(
        _lift_fields, input_columns=heads, fn_kwargs={"heads": heads, "lifted": lifted},
        features=datasets.Features({**features, **new_features}),
    )


def _lift_fields(*values, heads: list[str], lifted: dict) -> dict:
    structs = dict(zip(heads, values))
    out = {}
    for name, (head, path) in lifted.items():
        value = structs[head]
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out[name] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Streaming


def _load_streaming_datasets(
    args: DataArguments, seed: int
) -> tuple[datasets.IterableDataset, datasets.Dataset | None]:
    """Streaming (train, eval): the training split as a shuffled `datasets.IterableDataset`, the eval split
    materialised as a map-style `Dataset` (evaluation ranks all its rows at once).

    Training stream, in order: Image columns cast to `Image(decode=False)` (the collator decodes and skips bad
    files), dotted struct fields lifted, string labels mapped to the indices of `class_names` (a stream cannot be
    scanned for its label names; labels not in `class_names` become None and the row falls back to image
    positives), `ROW_ID_COLUMN` added, `take(max_train_samples)` (the first rows in file order), then
    `shuffle(seed, shuffle_buffer_size)` (shard order + a buffer of rows; `set_epoch` reshuffles each epoch).

    `ROW_ID_COLUMN` of a stream is not a row index (a stream has none that survives shard shuffling, DataLoader
    workers and per-process sharding: a running `map(with_indices=True)` counter restarts in every shard/worker)
    but a stable 56-bit key of the row's content (image bytes or path, and caption): the same in every epoch,
    process and worker, and shared only by rows with the same image and caption. It serves as the image id of
    "same image" positives (and as `sample_ids`); it is not a dense index, so per-sample statistics sized by a row
    count (TCL's running-Z) are not available.

    The eval split (not for "digits", whose test split is in memory) is read up to `max_eval_samples` rows; without
    that limit a ValueError asks for one (or `eval_split: null`).
    """
    all_splits = _load_splits(args, streaming=True)
    chosen = _choose_splits(all_splits, args)
    if isinstance(chosen["train"], datasets.Dataset):  # the in-memory demo, streamed from 8 shards
        chosen["train"] = chosen["train"].to_iterable_dataset(num_shards=8)
    if (
        "eval" in chosen
        and isinstance(chosen["eval"], datasets.IterableDataset)
        and args.max_eval_samples is None
    ):
        raise ValueError(
            f"streaming: evaluation holds the whole eval split {args.eval_split!r} in memory, and a stream's length "
            "is unknown; set max_eval_samples (the number of rows to read from it, e.g. 5000) or eval_split: null"
        )
    for split_name, dataset in chosen.items():
        if isinstance(dataset, datasets.IterableDataset) and dataset.features is None:
            dataset = dataset._resolve_features()  # e.g. json/csv streams: read the first rows for the schema
        feature = dataset.features.get(args.image_column)
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
        dataset = _lift_nested_columns(dataset, args)
        _check_columns(dataset, args, args.train_split if split_name == "train" else args.eval_split)
        chosen[split_name] = dataset
    if args.label_column is not None:
        chosen = {k: _stream_string_labels(ds, args) for k, ds in chosen.items()}

    train = _add_row_keys(chosen["train"], args)
    if args.max_train_samples is not None:
        train = train.take(args.max_train_samples)
    train = train.shuffle(seed=int(seed), buffer_size=args.shuffle_buffer_size)

    evaluation = None
    if "eval" in chosen:
        evaluation = chosen["eval"]
        max_eval = args.max_eval_samples
        if isinstance(evaluation, datasets.IterableDataset):
            rows = list(evaluation.take(max_eval))
            evaluation = datasets.Dataset.from_list(rows, features=evaluation.features)
            max_eval = None
        evaluation = _prepare_split(evaluation, args, max_eval)
    return train, evaluation


def _stream_string_labels(dataset, args: DataArguments):
    """String labels -> indices of `args.class_names` (ClassLabel); other label types unchanged."""
    feature = dataset.features[args.label_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return dataset
    if args.class_names is None:
        raise ValueError(
            f"label_column={args.label_column!r} holds strings: with streaming, set class_names (the label names, "
            "in class-index order), since a stream cannot be scanned for them; or set label_column: null"
        )
    features = datasets.Features({**dataset.features, args.label_column: datasets.ClassLabel(names=args.class_names)})
    return dataset.map(
        _label_index, input_columns=[args.label_column],
        fn_kwargs={"column": args.label_column, "index": {name: i for i, name in enumerate(args.class_names)}},
        features=features,
    )


def _label_index(label, column: str, index: dict[str, int]) -> dict:
    return {column: index.get(str(label)) if label is not None else None}


def _add_row_keys(dataset: datasets.IterableDataset, args: DataArguments) -> datasets.IterableDataset:
    """Add `ROW_ID_COLUMN` (a content key, see `_load_streaming_datasets`) to a stream."""
    if ROW_ID_COLUMN in dataset.column_names:
        return dataset
    features = datasets.Features({**dataset.features, ROW_ID_COLUMN: datasets.Value("int64")})
    return dataset.map(_row_key, input_columns=[args.image_column, args.caption_column], features=features)


def _row_key(image: Any, caption: Any) -> dict:
    digest = hashlib.blake2b(digest_size=7)  # 56 bits: a non-negative int64, like `_to_id`'s hashes
    digest.update(_image_identity(image))
    digest.update(b"\0")
    digest.update(json.dumps(caption, default=str).encode("utf-8"))
    return {ROW_ID_COLUMN: int.from_bytes(digest.digest(), "big")}


def _image_identity(value: Any) -> bytes:
    """Bytes identifying an (undecoded) image cell: its encoded bytes, else its path."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return bytes(data)
        return f"path:{path}".encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Image.Image):
        return value.tobytes()
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return f"{type(value).__name__}:{value}".encode()


def training_data_fingerprint(dataset: Any, sample_rows: int = 64) -> str | None:
    """A short hash of a map-style dataset's length, columns and a sample of evenly spaced rows (as stored: image
    bytes or paths, not decoded), kept in training checkpoints so that resuming on other data is noticed. None for
    a stream or a plain sequence."""
    if not isinstance(dataset, datasets.Dataset):
        return None
    size = len(dataset)
    indices = sorted({int(i) for i in np.linspace(0, size - 1, num=min(size, sample_rows))}) if size else []
    table = dataset.with_format("arrow").select(indices)[:] if indices else None
    digest = hashlib.sha256(f"{size}|{sorted(dataset.column_names)}".encode())
    if table is not None:
        for name in sorted(table.column_names):
            digest.update(name.encode())
            digest.update(repr(table.column(name).to_pylist()).encode())
    return digest.hexdigest()[:16]


def resolve_class_names(dataset: datasets.Dataset | None, args: DataArguments) -> list[str] | None:
    """Zero-shot class names: `args.class_names`, else the names of a ClassLabel label column, else None."""
    if args.class_names is not None:
        return list(args.class_names)
    if dataset is not None and args.label_column is not None and args.label_column in dataset.features:
        feature = dataset.features[args.label_column]
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
    return None


# --------------------------------------------------------------------------------------------------------------
# Hostile data: image decoding, caption sanitising and the counts of what was refused or repaired

IMAGE_SKIP_REASONS = (
    "missing",          # no image in the cell (None, or a dict with neither bytes nor path)
    "empty_file",       # zero bytes
    "file_not_found",   # a path that does not exist
    "unreadable_file",  # a path that cannot be opened or read (no permission, ...) or is not a regular file (a
                        # directory, FIFO or device: refused before opening, where a FIFO would block)
    "too_large",        # more pixels than max_image_pixels: refused before decoding (decompression bombs)
    "truncated",        # the pixel data ends early: refused rather than half-decoded
    "corrupt",          # not an image PIL can identify, or broken data inside
    "unsupported",      # a value that is no kind of image (a number, an array that is not an image, ...)
)
CAPTION_SKIP_REASONS = ("missing", "empty", "not_text")  # None / blank or whitespace-only / not str or bytes
CAPTION_FIX_REASONS = ("invalid_utf8", "control_chars", "too_long")  # repaired and kept


class ImageDecodeError(ValueError):
    """An image that cannot be used; `reason` (one of `IMAGE_SKIP_REASONS`) feeds the skip counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def image_skip_reason(error: BaseException) -> str:
    """The `IMAGE_SKIP_REASONS` entry for an error raised while decoding an image."""
    if isinstance(error, ImageDecodeError):
        return error.reason
    if isinstance(error, (Image.DecompressionBombError, MemoryError)):
        return "too_large"
    if isinstance(error, UnidentifiedImageError):  # its message names the file, which may say "truncated"
        return "corrupt"
    if "truncated" in str(error).lower():  # PIL: "image file is truncated", "Truncated File Read"
        return "truncated"
    return "corrupt"


def decode_image(value: Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode anything an image column may hold into a fully loaded 8-bit RGB PIL image.

    Accepts a PIL image, a datasets-style dict (`{"bytes": ..., "path": ...}`), a file path, raw bytes, or a
    numpy array / torch tensor. Encoded images with more than `max_pixels` pixels (None: no limit of ours) are
    refused from their header, before any pixel is decoded. Pixels are then loaded eagerly, so truncated files
    fail here instead of yielding half an image. The EXIF Orientation tag is applied, as `datasets` and transformers'
    `load_image` apply it (a broken EXIF block is ignored, see `_exif_upright`). Colour modes are converted
    faithfully (see `_pil_to_rgb`).

    Every failure is raised as `ImageDecodeError` (a ValueError) whose `reason` is one of `IMAGE_SKIP_REASONS`.
    """
    try:
        return _decode_value(value, max_pixels)
    except ImageDecodeError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, EOFError, struct.error, ... on broken files
        raise _as_decode_error(error) from error


def _as_decode_error(error: Exception) -> ImageDecodeError:
    return ImageDecodeError(image_skip_reason(error), f"cannot decode image: {type(error).__name__}: {error}")


def _decode_value(value: Any, max_pixels: int | None) -> Image.Image:
    if value is None:
        raise ImageDecodeError("missing", "no image (None)")
    if isinstance(value, Image.Image):
        _check_pixel_count(value.size, max_pixels)  # a lazily opened image is not decoded yet
        value.load()
        return _owned_rgb(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        try:
            return to_rgb(value)
        except (ValueError, TypeError) as error:
            raise ImageDecodeError("unsupported", f"array is not an image: {error}") from error
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return _decode_bytes(bytes(data), max_pixels)
        if path:
            return _decode_path(path, max_pixels)
        raise ImageDecodeError("missing", "image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(value), max_pixels)
    if isinstance(value, (str, os.PathLike)):
        return _decode_path(value, max_pixels)
    raise ImageDecodeError("unsupported", f"unsupported image value of type {type(value).__name__}")


def _check_pixel_count(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError("corrupt", f"image has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            "too_large", f"{width}x{height} = {width * height} pixels exceeds max_image_pixels={max_pixels}"
        )


def _open_checked(stream, max_pixels: int | None) -> Image.Image:
    """`Image.open` reads only the header: refuse oversized images there, before `load` allocates pixels."""
    with warnings.catch_warnings():
        # Our limit decides (and is reported with its reason); PIL's warning at its own threshold would repeat it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(stream)
    try:
        _check_pixel_count(image.size, max_pixels)
    except ImageDecodeError:
        image.close()
        raise
    return image


def _decode_stream(stream, max_pixels: int | None) -> Image.Image:
    try:
        with _open_checked(stream, max_pixels) as image:
            image.load()
            return _owned_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as error:  # classified here, so that no decoding OSError passes for a file-system one
        raise _as_decode_error(error) from error


def _decode_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty_file", "empty image bytes")
    return _decode_stream(io.BytesIO(data), max_pixels)


_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_regular_file(mode: int, path: str | os.PathLike) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "special")
        raise ImageDecodeError("unreadable_file", f"image path is not a regular file ({kind}): {path}")


def _open_nonblocking(path: str | os.PathLike, flags: int) -> int:
    # a path turned into a FIFO after the stat check must not block `open` until a writer comes
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def _decode_path(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    try:
        # Only regular files are opened: opening a FIFO blocks until a writer comes, a device may never end.
        _check_regular_file(os.stat(path).st_mode, path)
        with open(path, "rb", opener=_open_nonblocking) as handle:  # PIL reads only what it needs (a bomb's header)
            info = os.fstat(handle.fileno())
            _check_regular_file(info.st_mode, path)
            if info.st_size == 0:
                raise ImageDecodeError("empty_file", f"empty image file: {path}")
            return _decode_stream(handle, max_pixels)
    except FileNotFoundError as error:
        raise ImageDecodeError("file_not_found", f"image file not found: {path}") from error
    except OSError as error:  # decoding errors are ImageDecodeErrors by now: this is the file system
        raise ImageDecodeError("unreadable_file", f"cannot read image file {path}: {error}") from error


def _owned_rgb(image: Image.Image) -> Image.Image:
    rgb = _pil_to_rgb(_exif_upright(image))
    # RGB inputs come back unchanged; copy so closing the source file cannot invalidate the result.
    return rgb.copy() if rgb is image else rgb


# EXIF Orientation values that ask for a turn or flip (1 is upright; anything else is not a valid value)
_EXIF_TURNS = range(2, 9)


def _exif_upright(image: Image.Image) -> Image.Image:
    """The image turned or flipped as its EXIF Orientation tag says (`ImageOps.exif_transpose`), as `datasets` and
    transformers' `load_image` do: phone photos are often stored sideways with the tag, and training must see them
    the way inference will. A broken EXIF block is ignored (the pixels are fine): the image is kept as stored."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in _EXIF_TURNS:
            return image  # no copy, as `exif_transpose` would make
        return ImageOps.exif_transpose(image)
    except Exception:  # PIL raises SyntaxError, struct.error, ... on malformed EXIF data
        return image


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. On top of `to_rgb` (alpha composited on white, palettes, CMYK, 1-bit):
    16-bit grayscale is scaled by its bit depth, and a transparent colour key (`info["transparency"]` of an
    L / RGB / 1-bit PNG) becomes white like any other transparent pixel instead of keeping its colour."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        return _wide_gray_to_rgb(image)
    if image.mode in ("1", "L", "RGB") and image.info.get("transparency") is not None:
        image = image.convert("RGBA")
    return to_rgb(image)


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> RGB. 16-bit data maps 0..65535 onto 0..255 whatever the image's own range (a dark
    16-bit scan stays dark; a value-based guess would stretch it to full contrast); 32-bit "I" data within the
    16-bit range is read as 16-bit (PNG, most TIFFs), anything wider is stretched from its min to its max."""
    pixels = np.asarray(image).astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if image.mode.startswith("I;16") or (low >= 0 and high <= 65535):
        scaled = pixels / 257.0  # 65535 / 257 = 255 exactly
    else:
        scaled = (pixels - low) / max(high - low, 1.0) * 255.0
    gray = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


# C0 / C1 control characters other than whitespace (\t \n \v \f \r), and lone surrogates (invalid in UTF-8:
# tokenizers refuse them).
_CONTROL_CHARS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def sanitise_caption(value: Any, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> tuple[str | None, tuple[str, ...]]:
    """One caption candidate -> (clean text, or None when unusable; what was wrong with it).

    Unusable (text None, one reason from `CAPTION_SKIP_REASONS`): None, not text, empty or whitespace-only.
    Repaired and kept (reasons from `CAPTION_FIX_REASONS`): bytes that are not valid UTF-8 are decoded with
    U+FFFD replacements (as are lone surrogates in a str), text longer than `max_chars` is cut (cheaply, before
    tokenising; the tokenizer then truncates to max_length), and control characters such as NUL are removed.
    """
    if value is None:
        return None, ("missing",)
    fixes = []
    if isinstance(value, (bytes, bytearray, memoryview)):
        value, repaired = _decode_caption_bytes(bytes(value))
        if repaired:
            fixes.append("invalid_utf8")
    if not isinstance(value, str):
        return None, ("not_text",)
    if len(value) > max_chars:
        value = value[:max_chars]
        fixes.append("too_long")
    if _SURROGATES.search(value):
        value = _SURROGATES.sub("\ufffd", value)
        if "invalid_utf8" not in fixes:
            fixes.append("invalid_utf8")
    if _CONTROL_CHARS.search(value):
        value = _CONTROL_CHARS.sub("", value)
        fixes.append("control_chars")
    if not value.strip():
        return None, ("empty",)
    return value, tuple(fixes)


def _decode_caption_bytes(data: bytes) -> tuple[str, bool]:
    """UTF-8 bytes -> (text, whether invalid sequences had to be replaced)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


@dataclass
class DataIssueCounts:
    """Running counts of hostile data: images refused (by `IMAGE_SKIP_REASONS`), caption candidates dropped
    (by `CAPTION_SKIP_REASONS`) and caption candidates repaired and kept (by `CAPTION_FIX_REASONS`; one caption
    may have several fixes, so `captions_sanitised` counts captions, not fixes). Counts are per row read: a row
    read in two epochs counts twice."""

    images_skipped_by_reason: Counter = field(default_factory=Counter)
    captions_skipped_by_reason: Counter = field(default_factory=Counter)
    captions_sanitised_by_reason: Counter = field(default_factory=Counter)
    captions_sanitised: int = 0

    @property
    def images_skipped(self) -> int:
        return sum(self.images_skipped_by_reason.values())

    @property
    def captions_skipped(self) -> int:
        return sum(self.captions_skipped_by_reason.values())

    def count_image_refusal(self, error: BaseException) -> str:
        """Count an image that failed to decode; returns the reason."""
        reason = image_skip_reason(error)
        self.images_skipped_by_reason[reason] += 1
        return reason

    def count_caption(self, text: str | None, reasons: tuple[str, ...]) -> None:
        if text is None:
            self.captions_skipped_by_reason.update(reasons)
        elif reasons:
            self.captions_sanitised += 1
            self.captions_sanitised_by_reason.update(reasons)

    def report(self, prefix: str = "") -> dict[str, int]:
        """Flat counts for eval_results.json: the three totals always, a `<total>_<reason>` key per reason seen."""
        report = {}
        for name, total, by_reason in (
            ("images_skipped", self.images_skipped, self.images_skipped_by_reason),
            ("captions_skipped", self.captions_skipped, self.captions_skipped_by_reason),
            ("captions_sanitised", self.captions_sanitised, self.captions_sanitised_by_reason),
        ):
            report[f"{prefix}{name}"] = int(total)
            report.update({f"{prefix}{name}_{reason}": int(n) for reason, n in sorted(by_reason.items()) if n})
        return report

    def state_dict(self) -> dict[str, Any]:
        """JSON-able counts (kept in training checkpoints so that a resumed run reports the whole run)."""
        return {"images_skipped_by_reason": dict(self.images_skipped_by_reason),
                "captions_skipped_by_reason": dict(self.captions_skipped_by_reason),
                "captions_sanitised_by_reason": dict(self.captions_sanitised_by_reason),
                "captions_sanitised": self.captions_sanitised}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images_skipped_by_reason = Counter(state.get("images_skipped_by_reason", {}))
        self.captions_skipped_by_reason = Counter(state.get("captions_skipped_by_reason", {}))
        self.captions_sanitised_by_reason = Counter(state.get("captions_sanitised_by_reason", {}))
        self.captions_sanitised = int(state.get("captions_sanitised", 0))

    def summary(self) -> str:
        """One line for logs, e.g. "2 images skipped (corrupt 1, truncated 1), 0 captions skipped, ..."."""
        parts = []
        for name, total, by_reason in (
            ("images skipped", self.images_skipped, self.images_skipped_by_reason),
            ("captions skipped", self.captions_skipped, self.captions_skipped_by_reason),
            ("captions sanitised", self.captions_sanitised, self.captions_sanitised_by_reason),
        ):
            detail = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items()) if n)
            parts.append(f"{total} {name}" + (f" ({detail})" if detail else ""))
        return ", ".join(parts)


def _usable_captions(cell: Any, max_chars: int, issues: DataIssueCounts) -> list[str]:
    """Sanitised captions of a row (a cell may hold a caption or a list of them); bad candidates are counted and
    dropped."""
    candidates = list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else [cell]
    usable = []
    for candidate in candidates or [None]:  # an empty list is a missing caption
        text, reasons = sanitise_caption(candidate, max_chars)
        issues.count_caption(text, reasons)
        if text is not None:
            usable.append(text)
    return usable


def _time_to_warn(count: int, log_every: int) -> bool:
    """Warn for the first occurrence and every `log_every`-th one: a bad shard must not flood the log."""
    return count == 1 or count % log_every == 0


def _preview(value: Any, limit: int = 60) -> str:
    """A short repr for log messages (never the whole of a 1 MB caption)."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} long)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _to_id(value: Any) -> int:
    """Integer id for equality-based positives: ints as-is, anything else by a stable 56-bit hash."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value.item())
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=7).digest()
    return int.from_bytes(digest, "big")


class ResumableCollator:
    """What a training checkpoint keeps of a collator (`state_dict` / `load_state_dict`, JSON-able): its batch index
    and its running data-issue counts. The data loader collates ahead of training, so the counts are also kept as
    they stood before each of the last few batches: `state_dict(batches_trained=n)` gives the counts of exactly
    the n batches trained on, and a run resumed from it counts every batch once. Subclasses call `_begin_batch()`
    first in `__call__` and define `_counts_state` / `_load_counts_state`."""

    _SNAPSHOTS_KEPT = 8
    batches_collated: int = 0

    def _counts_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_counts_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _begin_batch(self) -> int:
        """The index of the batch being collated (then counted)."""
        snapshots = self.__dict__.setdefault("_counts_before", {})
        index = self.batches_collated
        snapshots[index] = self._counts_state()
        snapshots.pop(index - self._SNAPSHOTS_KEPT, None)
        self.batches_collated = index + 1
        return index

    def state_dict(self, batches_trained: int | None = None) -> dict[str, Any]:
        current = self._counts_state()
        if batches_trained is None:
            return {"batches_collated": self.batches_collated, "counts": current}
        counts = self.__dict__.get("_counts_before", {}).get(batches_trained, current)
        return {"batches_collated": int(batches_trained), "counts": counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_collated = int(state["batches_collated"])
        self._load_counts_state(state["counts"])
        self._counts_before = {}

    def rewind_to(self, batches_trained: int) -> None:
        """Forget the batches collated after the first `batches_trained` ones: the data loader collates ahead, and
        those batches were never trained on, so their skipped rows must not be counted as skipped in training."""
        self.load_state_dict(self.state_dict(batches_trained=batches_trained))


class ImageTextCollator(ResumableCollator):
    """Turns dataset rows into a contrastive training batch, skipping rows that cannot be used.

    Output (all tensors unless noted): `pixel_values`, `pixel_values_view2` (if `two_views`), `input_ids`,
    `attention_mask`, `positive_ids` (LongTensor; equal ids are positives), `sample_ids` (the dataset row of
    each item, when the rows carry `ROW_ID_COLUMN` as `load_image_text_datasets` adds it), `return_loss=True` and
    `num_skipped` (int, rows dropped from *this* batch for a bad image or caption, so a trainer can accumulate
    it even when collation runs in dataloader workers). With ``refill=True`` (default) the dropped rows are
    replaced by copies of good items of the same batch, drawn at random, so batches keep their size (equal
    batches on every process); `num_refilled` counts them. If no row of the batch is usable the result is
    `{"num_skipped": n, "empty_batch": True}` and the trainer must skip the step.

    Positive ids: the label when `positives_by == "label"` and the label column exists in the row; otherwise
    the image id from `image_id_column`, else `ROW_ID_COLUMN` if present, else a running counter (unique per
    collator call and worker). Non-integer ids (e.g. file names) are hashed stably.

    Rows should come from a dataset whose image column is `datasets.Image(decode=False)` (as returned by
    `load_image_text_datasets`); otherwise `datasets` decodes, and may fail, before the collator sees the row.

    Hostile data: images are decoded by `decode_image` (refused above `max_image_pixels`, truncated files refused,
    colour modes converted faithfully) and every caption candidate goes through `sanitise_caption` (cut to
    `max_caption_chars`, invalid UTF-8 replaced, control characters removed; None / empty / whitespace-only
    dropped); a row keeps the candidates that survive.

    Running totals: `num_skipped` (rows dropped for an unusable image), `num_skipped_captions` (rows dropped for
    having no usable caption) and `issues` (a `DataIssueCounts`: images refused by reason, caption candidates
    dropped or repaired by reason; `data_report()` flattens it). In dataloader worker processes these live in the
    worker's copy. A warning (logger "vlalign.data") is logged for the first bad image and then every
    `log_every`-th one, with the reason; likewise for rows without a usable caption.
    """

    def __init__(
        self,
        processor: VLAlignProcessor,
        image_column: str = "image",
        caption_column: str = "caption",
        label_column: str | None = None,
        image_id_column: str | None = None,
        positives_by: str = "label",
        two_views: bool = True,
        seed: int = 0,
        log_every: int = 100,
        refill: bool = True,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
    ):
        if positives_by not in ("label", "image"):
            raise ValueError(f'positives_by must be "label" or "image", got {positives_by!r}')
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every!r}")
        _check_positive_int("max_image_pixels", max_image_pixels)
        _check_positive_int("max_caption_chars", max_caption_chars)
        self.max_image_pixels = max_image_pixels
        self.max_caption_chars = max_caption_chars
        self.processor = processor
        self.image_column = image_column
        self.caption_column = caption_column
        self.label_column = label_column
        self.image_id_column = image_id_column
        self.positives_by = positives_by
        self.two_views = two_views
        self.seed = int(seed)
        self.log_every = int(log_every)
        # Rows dropped for a bad image/caption are replaced by copies of good items of the same batch, so every batch
        # keeps its size: processes then hold equal batches (their losses weigh the same) and queues stay aligned.
        self.refill = bool(refill)
        self.num_refilled = 0
        self.num_skipped_captions = 0
        self.issues = DataIssueCounts()
        self._fallback_counter = 0
        self._worker_seed: int | None = None
        self._reseed(None)

    @classmethod
    def from_data_args(cls, processor: VLAlignProcessor, args: DataArguments, **kwargs) -> ImageTextCollator:
        """Collator wired to the columns of `args` (uses `ROW_ID_COLUMN` when `image_id_column` is None)."""
        return cls(
            processor,
            image_column=args.image_column,
            caption_column=args.caption_column,
            label_column=args.label_column,
            image_id_column=args.image_id_column or ROW_ID_COLUMN,
            positives_by=args.positives_by,
            max_image_pixels=args.max_image_pixels,
            max_caption_chars=args.max_caption_chars,
            **kwargs,
        )

    @property
    def num_skipped(self) -> int:
        """Rows dropped for an unusable image (all reasons)."""
        return self.issues.images_skipped

    def data_report(self, prefix: str = "") -> dict[str, int]:
        """The running counts as flat keys (see `DataIssueCounts.report`)."""
        return self.issues.report(prefix)

    def _reseed(self, worker_seed: int | None) -> None:
        self._worker_seed = worker_seed
        self.batches_collated = 0

    def _batch_rngs(self) -> tuple[np.random.Generator, np.random.Generator]:
        """The random streams of the next batch: caption choice and augmentation (separate, so changing one does
        not shift the other), a function of (seed, worker seed, batch index) only. A resumed run sets
        `batches_collated` to the batches already trained on (`load_state_dict`) and gets the same batches as an
        uninterrupted run, although the skipped batches are never collated."""
        entropy = [self.seed, self._begin_batch()]
        if self._worker_seed is not None:
            entropy.append(self._worker_seed)
        caption_seq, augment_seq = np.random.SeedSequence(entropy).spawn(2)
        return np.random.default_rng(caption_seq), np.random.default_rng(augment_seq)

    def _counts_state(self) -> dict[str, Any]:
        return {"num_refilled": self.num_refilled, "num_skipped_captions": self.num_skipped_captions,
                "issues": self.issues.state_dict()}

    def _load_counts_state(self, state: dict[str, Any]) -> None:
        self.num_refilled = int(state["num_refilled"])
        self.num_skipped_captions = int(state["num_skipped_captions"])
        self.issues.load_state_dict(state["issues"])

    def _maybe_reseed_for_worker(self) -> tuple[int, int]:
        """Dataloader workers each get a copy of this object: without reseeding they would all produce the
        same augmentations. torch gives every worker a distinct seed (new each epoch), which we mix in."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return 0, 1
        if self._worker_seed != info.seed:
            self._reseed(int(info.seed))
        return int(info.id), int(info.num_workers)

    def _positive_id(self, row: dict, worker_id: int, num_workers: int) -> int:
        if self.positives_by == "label" and self.label_column is not None and row.get(self.label_column) is not None:
            return _to_id(row[self.label_column])
        for column in (self.image_id_column, ROW_ID_COLUMN):
            if column is not None and row.get(column) is not None:
                return _to_id(row[column])
        # No id available: a fresh id per row (interleaved across workers) so distinct rows never collide.
        self._fallback_counter += 1
        return (1 << 56) + self._fallback_counter * num_workers + worker_id

    def _decode_or_count(self, value: Any) -> Image.Image | None:
        """The decoded image, or None after counting and (rate-limited) warning about why it was refused."""
        try:
            return decode_image(value, self.max_image_pixels)
        except (ValueError, OSError) as error:
            reason = self.issues.count_image_refusal(error)
            if _time_to_warn(self.num_skipped, self.log_every):
                logger.warning("Skipped an undecodable image (%d so far) [%s]: %s", self.num_skipped, reason, error)
            return None

    def _captions_or_count(self, cell: Any) -> list[str]:
        choices = _usable_captions(cell, self.max_caption_chars, self.issues)
        if not choices:
            self.num_skipped_captions += 1
            if _time_to_warn(self.num_skipped_captions, self.log_every):
                logger.warning("Skipped a row without a usable caption (%d so far): %s", self.num_skipped_captions,
                               _preview(cell))
        return choices

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        worker_id, num_workers = self._maybe_reseed_for_worker()
        caption_rng, augment_rng = self._batch_rngs()
        images, captions, ids, rows_index = [], [], [], []
        skipped = 0
        for row in rows:
            # captions first: they are cheap, and a row without one needs no image decoded
            choices = self._captions_or_count(row.get(self.caption_column))
            image = self._decode_or_count(row.get(self.image_column)) if choices else None
            if image is None:
                skipped += 1
                continue
            images.append(image)
            captions.append(choices[int(caption_rng.integers(len(choices)))] if len(choices) > 1 else choices[0])
            ids.append(self._positive_id(row, worker_id, num_workers))
            rows_index.append(row.get(ROW_ID_COLUMN))
        missing = len(rows) - len(images)
        if self.refill and missing and images:
            # copies of this batch's own good items: nothing depends on earlier batches, so a resumed run collates
            # exactly what an uninterrupted one does (a copy shares its positive id: it is never a negative)
            for index in caption_rng.integers(len(images), size=missing):
                for column in (images, captions, ids, rows_index):
                    column.append(column[int(index)])
            self.num_refilled += missing
        if not images:
            return {"num_skipped": skipped, "empty_batch": True}
        encoded = self.processor(
            images=images, text=captions, two_views=self.two_views, rng=augment_rng, return_tensors="pt"
        )
        batch: dict[str, Any] = dict(encoded)
        batch["positive_ids"] = torch.tensor(ids, dtype=torch.long)
        if all(index is not None for index in rows_index):
            batch["sample_ids"] = torch.tensor(rows_index, dtype=torch.long)  # dataset row of each item
        batch["return_loss"] = True
        batch["num_skipped"] = skipped
        return batch


@dataclass
class EvalInputs:
    """What retrieval / zero-shot evaluation needs, already decoded.

    `image_ids[i]` / `text_ids[j]`: positive ids (equal ids = a match; labels when positives are by label).
    `labels`: per-image class labels, or None without a label column. `num_skipped`: undecodable images dropped
    (their captions are dropped too, since they have no image to retrieve). `issues`: those images by reason,
    and the caption candidates dropped or repaired (an image whose captions are all unusable is kept: it is
    still a retrieval candidate and a zero-shot example).
    """

    images: list[Image.Image]
    image_ids: list[int]
    texts: list[str]
    text_ids: list[int]
    labels: list[int] | None
    num_skipped: int
    issues: DataIssueCounts = field(default_factory=DataIssueCounts)


def build_eval_inputs(
    dataset: datasets.Dataset, processor: VLAlignProcessor | None, args: DataArguments, batch_size: int = 256
) -> EvalInputs:
    """Decode an eval split into `EvalInputs` (all captions of every image, flattened).

    `processor` is accepted for interface symmetry with training and is not needed to decode; `batch_size`
    only controls how many rows are read from the Arrow table at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    feature = dataset.features.get(args.image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        # Slicing a decoding Image column would raise inside `datasets` on the first corrupt file.
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    use_labels = args.label_column is not None and args.label_column in dataset.column_names
    id_column = args.image_id_column if args.image_id_column in dataset.column_names else None
    if id_column is None and ROW_ID_COLUMN in dataset.column_names:
        id_column = ROW_ID_COLUMN
    images, image_ids, texts, text_ids = [], [], [], []
    labels: list[int] | None = [] if use_labels else None
    issues = DataIssueCounts()
    for start in range(0, len(dataset), batch_size):
        chunk = dataset[start : start + batch_size]
        for offset in range(len(chunk[args.image_column])):
            index = start + offset
            try:
                image = decode_image(chunk[args.image_column][offset], args.max_image_pixels)
            except (ValueError, OSError) as error:
                reason = issues.count_image_refusal(error)
                if _time_to_warn(issues.images_skipped, 100):
                    logger.warning("Eval row %d: skipped an undecodable image [%s]: %s", index, reason, error)
                continue
            label = chunk[args.label_column][offset] if use_labels else None
            if args.positives_by == "label" and use_labels and label is not None:
                positive = _to_id(label)
            elif id_column is not None:
                positive = _to_id(chunk[id_column][offset])
            else:
                positive = index
            images.append(image)
            image_ids.append(positive)
            if labels is not None:
                labels.append(int(label) if label is not None else -1)
            for caption in _usable_captions(chunk[args.caption_column][offset], args.max_caption_chars, issues):
                texts.append(caption)
                text_ids.append(positive)
    if issues.images_skipped or issues.captions_skipped or issues.captions_sanitised:
        logger.warning("Eval split: %s", issues.summary())
    return EvalInputs(images, image_ids, texts, text_ids, labels, issues.images_skipped, issues)


# --------------------------------------------------------------------------------------------------------------
# Multi-image items (MIVC)


@dataclass
class MIVCDataArguments:
    """Multi-image data for MIVC: "multiview_digits" (the embedded demo) or any `datasets.load_dataset` source with
    a column of image lists, a prompt column (with an image placeholder) and an answer column."""

    dataset_name: str = field(default="multiview_digits", metadata={"help": 'load_dataset name, or "multiview_digits".'})
    data_files: str | None = field(default=None, metadata={"help": "data_files passed to load_dataset."})
    images_column: str = field(default="images", metadata={"help": "Column holding each item's list of images."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    answer_column: str = field(default="answer", metadata={"help": "Column holding the target text."})
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    eval_split: str | None = field(default="test", metadata={"help": "Eval split name (None: no eval)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the eval split."})
    num_train_items: int = field(default=2000, metadata={"help": "multiview_digits: training items."})
    num_test_items: int = field(default=400, metadata={"help": "multiview_digits: test items."})
    min_images: int = field(default=2, metadata={"help": "multiview_digits: fewest images per item."})
    max_images: int = field(default=5, metadata={"help": "multiview_digits: most images per item."})
    degraded_fraction: float = field(default=0.5, metadata={"help": "multiview_digits: share of degraded images."})
    image_size: int = field(default=32, metadata={"help": "multiview_digits: image side in pixels."})
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={
        "help": "Images with more pixels are refused from their header, before decoding (decompression bombs)."})

    def __post_init__(self):
        _check_positive_int("max_image_pixels", self.max_image_pixels)
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if isinstance(self.eval_split, str) and self.eval_split.strip().lower() in ("", "none", "null"):
            self.eval_split = None


def load_multi_image_datasets(args: MIVCDataArguments, seed: int = 0):
    """(train, eval or None) splits of multi-image items."""
    if args.dataset_name == "multiview_digits":
        from .multiview_digits import build_multiview_digits_dataset

        splits = build_multiview_digits_dataset(
            image_size=args.image_size, num_train_items=args.num_train_items, num_test_items=args.num_test_items,
            min_images=args.min_images, max_images=args.max_images, degraded_fraction=args.degraded_fraction,
            seed=seed)
    else:
        splits = datasets.load_dataset(args.dataset_name, data_files=expand_data_files(args.data_files))
    train = splits[args.train_split]
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    evaluation = None
    if args.eval_split:
        evaluation = splits[args.eval_split]
        if args.max_eval_samples:
            evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    for split in (train, evaluation):
        if split is None:
            continue
        missing = [c for c in (args.images_column, args.prompt_column, args.answer_column)
                   if c not in split.column_names]
        if missing:
            raise ValueError(f"multi-image dataset lacks columns {missing} (has {split.column_names})")
    return _undecoded_images(train, args.images_column), _undecoded_images(evaluation, args.images_column)


def _undecoded_images(dataset, column: str):
    """A list-of-Image column read without decoding: the collator decodes and skips a bad file, where `datasets`
    would raise on it while reading the row."""
    feature = None if dataset is None else dataset.features.get(column)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image) and inner.decode:
        return dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset


class MultiImageCollator(ResumableCollator):
    """Rows of multi-image items -> an `MIVCProcessor` training batch (prompt + answer, labels on the answer).

    Undecodable images (see `decode_image`; more than `max_image_pixels` pixels: refused before decoding) are
    dropped from their item, and an item left without images is skipped; every skip is counted
    (`num_skipped_images`, by reason in `issues`; `num_skipped_items`) and warned about (the first and every
    `log_every`-th), never a crash.
    """

    def __init__(self, processor, images_column: str = "images", prompt_column: str = "prompt",
                 answer_column: str = "answer", max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 log_every: int = 100):
        _check_positive_int("max_image_pixels", max_image_pixels)
        _check_positive_int("log_every", log_every)
        self.processor = processor
        self.images_column, self.prompt_column, self.answer_column = images_column, prompt_column, answer_column
        self.max_image_pixels = max_image_pixels
        self.log_every = log_every
        self.issues = DataIssueCounts()
        self.num_skipped_items = 0

    @property
    def num_skipped_images(self) -> int:
        return self.issues.images_skipped

    def _counts_state(self) -> dict[str, Any]:  # (its batches have no random part)
        return {"num_skipped_items": self.num_skipped_items, "issues": self.issues.state_dict()}

    def _load_counts_state(self, state: dict[str, Any]) -> None:
        self.num_skipped_items = int(state["num_skipped_items"])
        self.issues.load_state_dict(state["issues"])

    def data_report(self, prefix: str = "") -> dict[str, int]:
        """The running counts as flat keys (see `DataIssueCounts.report`; captions are not inspected here)."""
        report = self.issues.report(prefix)
        return {k: v for k, v in report.items() if k.startswith(f"{prefix}images_skipped")}

    def take_data_report(self, prefix: str = "") -> dict[str, int]:
        """`data_report`, then start counting afresh: evaluation decodes with the training collator, and its
        skips must not be added to the training ones."""
        report = self.data_report(prefix)
        self.issues = DataIssueCounts()
        return report

    def decoded_images(self, row: dict) -> list[Image.Image]:
        images = []
        for value in row[self.images_column] or []:
            try:
                images.append(decode_image(value, self.max_image_pixels))
            except (ValueError, OSError) as error:
                reason = self.issues.count_image_refusal(error)
                if _time_to_warn(self.num_skipped_images, self.log_every):
                    logger.warning("Skipped an undecodable image in a multi-image item (%d so far) [%s]: %s",
                                   self.num_skipped_images, reason, error)
        return images

    def __call__(self, rows: list[dict]) -> dict:
        self._begin_batch()
        images, prompts, answers = [], [], []
        for row in rows:
            item_images = self.decoded_images(row)
            if not item_images:
                self.num_skipped_items += 1
                continue
            images.append(item_images)
            prompts.append(row[self.prompt_column])
            answers.append(row[self.answer_column])
        if not images:
            raise RuntimeError("no item of this batch has a readable image: check the images column and files")
        return dict(self.processor(images=images, text=prompts, answers=answers))
