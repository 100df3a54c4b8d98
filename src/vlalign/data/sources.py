"""Where the data comes from: `DataArguments` / `MIVCDataArguments` and loading their splits (`datasets.load_dataset`
or the embedded demos), streaming, brace expansion of shard lists, the row keys of "same image" positives, the
training-data fingerprint kept in checkpoints, and the zero-shot class names.

Images stay *undecoded* in the datasets (`datasets.Image(decode=False)`) and are decoded in the collator, so a
corrupt file skips one row instead of crashing a training run hours in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
from PIL import Image

from .decoding import DEFAULT_MAX_CAPTION_CHARS, DEFAULT_MAX_IMAGE_PIXELS, _check_positive_int
from .digits import DIGIT_ZERO_SHOT_TEMPLATES, GENERIC_ZERO_SHOT_TEMPLATES, build_digits_dataset
from .multiview_digits import build_multiview_digits_dataset

__all__ = [
    "MAX_EXPANDED_DATA_FILES",
    "ROW_ID_COLUMN",
    "DataArguments",
    "MIVCDataArguments",
    "expand_braces",
    "expand_data_files",
    "load_image_text_datasets",
    "load_multi_image_datasets",
    "resolve_class_names",
    "training_data_fingerprint",
]

logger = logging.getLogger("vlalign.data")

# Column added by `load_image_text_datasets` when `image_id_column` is None: the row index in the split, so
# "same image" positives stay globally unique (needed once ids are compared against a momentum queue).
ROW_ID_COLUMN = "__vlalign_row_id__"


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
                    raise ValueError(
                        f"data_files pattern {pattern!r} expands to more than {MAX_EXPANDED_DATA_FILES} names"
                    )
                choices = [f"{i:0{width}d}" for i in range(int(first), int(last) + step, step)]
            elif "," in body:
                choices = body.split(",")
            else:
                continue
            head, tail = current[: match.start()], current[match.end() :]
            pending.extend(head + choice + tail for choice in reversed(choices))
            break
        else:
            expanded.append(current)
        if len(expanded) + len(pending) > MAX_EXPANDED_DATA_FILES:
            raise ValueError(f"data_files pattern {pattern!r} expands to more than {MAX_EXPANDED_DATA_FILES} names")
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
    loaded = datasets.load_dataset(
        args.dataset_name,
        args.dataset_config_name,
        data_dir=args.data_dir,
        data_files=expand_data_files(args.data_files),
        cache_dir=args.cache_dir,
        streaming=streaming,
    )
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
        _lift_fields,
        input_columns=heads,
        fn_kwargs={"heads": heads, "lifted": lifted},
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
    if "eval" in chosen and isinstance(chosen["eval"], datasets.IterableDataset) and args.max_eval_samples is None:
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
        _label_index,
        input_columns=[args.label_column],
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
# Multi-image items (MIVC)


@dataclass
class MIVCDataArguments:
    """Multi-image data for MIVC: "multiview_digits" (the embedded demo) or any `datasets.load_dataset` source with
    a column of image lists, a prompt column (with an image placeholder) and an answer column."""

    dataset_name: str = field(
        default="multiview_digits", metadata={"help": 'load_dataset name, or "multiview_digits".'}
    )
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
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={
            "help": "Images with more pixels are refused from their header, before decoding (decompression bombs)."
        },
    )

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
        splits = build_multiview_digits_dataset(
            image_size=args.image_size,
            num_train_items=args.num_train_items,
            num_test_items=args.num_test_items,
            min_images=args.min_images,
            max_images=args.max_images,
            degraded_fraction=args.degraded_fraction,
            seed=seed,
        )
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
        missing = [
            c for c in (args.images_column, args.prompt_column, args.answer_column) if c not in split.column_names
        ]
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
