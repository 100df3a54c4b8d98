"""vlalign.data.sources: DataArguments (defaults, validation, HfArgumentParser), loading the digits demo, image
folders and parquet files (column checks, string labels), and streaming parquet / WebDataset shards (columns,
row ids, order, brace patterns, labels, the corrupt image left to the collator)."""

import json

import datasets
import numpy as np
import pytest
import torch
from fixtures import CORRUPT_BYTES, NUM_SHARDS, NUM_TEST, ROWS_PER_SHARD, digit_shard_rows, png_bytes
from PIL import Image
from sklearn.datasets import load_digits
from transformers import HfArgumentParser

from vlalign.data import (
    DIGIT_NAMES,
    DIGIT_ZERO_SHOT_TEMPLATES,
    GENERIC_ZERO_SHOT_TEMPLATES,
    ROW_ID_COLUMN,
    DataArguments,
    ImageTextCollator,
    build_digits_processor,
    decode_image,
    expand_braces,
    expand_data_files,
    load_image_text_datasets,
    resolve_class_names,
)
from vlalign.data.sources import _row_key
from vlalign.evaluation import build_eval_inputs

# datasets pauses after each pass that interleaves parquet shards (conftest.py's short_arrow_shutdown_pause)
pytestmark = pytest.mark.usefixtures("short_arrow_shutdown_pause")


@pytest.fixture(scope="module")
def processor():
    return build_digits_processor()


# ---------------------------------------------------------------- DataArguments


def test_data_arguments_defaults_and_validation():
    args = DataArguments()
    assert args.zero_shot_templates == DIGIT_ZERO_SHOT_TEMPLATES
    assert DataArguments(dataset_name="imagefolder").zero_shot_templates == GENERIC_ZERO_SHOT_TEMPLATES
    assert DataArguments(data_files='{"train": "a.parquet"}').data_files == {"train": "a.parquet"}
    assert DataArguments(data_files=["a.parquet", "b.parquet"]).data_files == ["a.parquet", "b.parquet"]
    bad = [
        ({"positives_by": "caption"}, "positives_by"),
        ({"max_train_samples": 0}, "max_train_samples"),
        ({"max_eval_samples": -3}, "max_eval_samples"),
        ({"zero_shot_templates": ["a photo"]}, "zero_shot_templates"),
        ({"zero_shot_templates": ["a {name} of {kind}"]}, "zero_shot_templates"),
        ({"class_names": ["a", "a"]}, "class_names"),
        ({"image_column": ""}, "image_column"),
        ({"dataset_name": ""}, "dataset_name"),
        ({"label_column": 3}, "label_column"),
        ({"data_files": 3}, "data_files"),
    ]
    for kwargs, field_name in bad:
        with pytest.raises(ValueError, match=field_name):
            DataArguments(**kwargs)


def test_data_arguments_work_with_hf_argument_parser():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        [
            "--dataset_name",
            "parquet",
            "--data_files",
            "x.parquet",
            "--class_names",
            "cat",
            "dog",
            "--positives_by",
            "image",
            "--max_train_samples",
            "5",
        ]
    )
    assert args.data_files == "x.parquet" and args.class_names == ["cat", "dog"]
    assert args.positives_by == "image" and args.max_train_samples == 5
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--label_column", "None", "--image_id_column", "none", "--eval_split", "null"]
    )
    assert args.label_column is None and args.image_id_column is None and args.eval_split is None


# ---------------------------------------------------------------- loading


def test_load_digits_splits_and_limits():
    args = DataArguments(max_train_samples=100, max_eval_samples=40)
    train, evaluation = load_image_text_datasets(args)
    assert (len(train), len(evaluation)) == (100, 40)
    assert train.features["image"] == datasets.Image(decode=False)  # decoding deferred to the collator
    assert isinstance(train[0]["image"], dict) and train[0]["image"]["bytes"][:4] == b"\x89PNG"
    assert all(i % 5 == 0 for i in evaluation["image_id"])
    assert resolve_class_names(train, args) == DIGIT_NAMES
    assert resolve_class_names(train, DataArguments(class_names=["a", "b"])) == ["a", "b"]


def test_bad_column_names_raise(tmp_path):
    with pytest.raises(ValueError, match=r"caption_column='text'.*available columns") as info:
        load_image_text_datasets(DataArguments(caption_column="text"))
    assert "image_id" in str(info.value)
    with pytest.raises(ValueError, match="label_column='cls'"):
        load_image_text_datasets(DataArguments(label_column="cls"))
    with pytest.raises(ValueError, match="train_split='validation'"):
        load_image_text_datasets(DataArguments(train_split="validation"))


def write_imagefolder(root, n=5):
    folder = root / "train"
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as handle:
        for i in range(n):
            Image.new("RGB", (10 + i, 8), (40 * i, 10, 200)).save(folder / f"img{i}.png")
            handle.write(json.dumps({"file_name": f"img{i}.png", "caption": [f"picture {i}", f"photo {i}"]}) + "\n")
    return root


def test_load_imagefolder_with_captions_and_collate(tmp_path, processor):
    root = write_imagefolder(tmp_path / "folder")
    args = DataArguments(
        dataset_name="imagefolder",
        data_dir=str(root),
        label_column=None,
        image_id_column=None,
        positives_by="image",
        cache_dir=str(tmp_path / "cache"),
    )
    train, evaluation = load_image_text_datasets(args)
    assert evaluation is None  # no "test" split in the folder
    assert len(train) == 5 and train.features["image"] == datasets.Image(decode=False)
    assert train[ROW_ID_COLUMN] == [0, 1, 2, 3, 4]
    assert sorted(c for row in train["caption"] for c in row) == sorted(
        [f"picture {i}" for i in range(5)] + [f"photo {i}" for i in range(5)]
    )
    sizes = sorted(decode_image(v).size for v in train["image"])
    assert sizes == [(10 + i, 8) for i in range(5)]

    collator = ImageTextCollator.from_data_args(processor, args)
    batch = collator([train[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["positive_ids"].tolist() == [0, 1, 2, 3, 4]
    assert batch["num_skipped"] == 0

    inputs = build_eval_inputs(train, args)
    assert len(inputs.images) == 5 and len(inputs.texts) == 10 and inputs.labels is None
    assert inputs.image_ids == [0, 1, 2, 3, 4]
    assert inputs.text_ids == [i for i in range(5) for _ in range(2)]


def test_load_parquet_with_string_labels(tmp_path):
    features = datasets.Features(
        {"img": datasets.Image(), "text": datasets.Value("string"), "animal": datasets.Value("string")}
    )
    rows = {"img": [], "text": [], "animal": []}
    for i, animal in enumerate(["dog", "cat", "dog", "bird", "cat", "dog"]):
        rows["img"].append({"bytes": png_bytes(20 * i), "path": None})
        rows["text"].append(f"a photo of a {animal}")
        rows["animal"].append(animal)
    full = datasets.Dataset.from_dict(rows, features=features)
    full.select(range(4)).to_parquet(str(tmp_path / "train.parquet"))
    full.select([4, 5]).to_parquet(str(tmp_path / "test.parquet"))
    args = DataArguments(
        dataset_name="parquet",
        data_files={"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
        image_column="img",
        caption_column="text",
        label_column="animal",
        image_id_column=None,
        max_train_samples=3,
        cache_dir=str(tmp_path / "cache"),
    )
    train, evaluation = load_image_text_datasets(args)
    assert (len(train), len(evaluation)) == (3, 2)
    # string labels become one ClassLabel shared by both splits, so ids agree across splits
    names = train.features["animal"].names
    assert names == evaluation.features["animal"].names == ["bird", "cat", "dog"]
    assert [names[i] for i in train["animal"]] == ["dog", "cat", "dog"]
    assert [names[i] for i in evaluation["animal"]] == ["cat", "dog"]
    assert resolve_class_names(train, args) == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(np.asarray(decode_image(train[1]["img"]))[0, 0], [20, 235, 30])
    with pytest.raises(ValueError, match="label_column='label'.*set label_column=None"):
        load_image_text_datasets(
            DataArguments(
                dataset_name="parquet",
                data_files=args.data_files,
                image_column="img",
                caption_column="text",
                cache_dir=str(tmp_path / "cache"),
            )
        )


# ---------------------------------------------------------------- DataArguments: the hostile-data limits


@pytest.mark.parametrize("field", ["max_image_pixels", "max_caption_chars"])
@pytest.mark.parametrize("value", [0, -5, True, 1.5, "big", None])
def test_data_arguments_validate_the_limits(field, value):
    with pytest.raises(ValueError, match=field):
        DataArguments(**{field: value})
    assert getattr(DataArguments(**{field: 7}), field) == 7


@pytest.mark.parametrize("value", [0, -5, 2.5, True])
def test_mivc_data_arguments_validate_the_pixel_limit(value):
    from vlalign.data import MIVCDataArguments

    with pytest.raises(ValueError, match="max_image_pixels"):
        MIVCDataArguments(max_image_pixels=value)
    assert MIVCDataArguments(max_image_pixels=7).max_image_pixels == 7


# ---------------------------------------------------------------- streaming
# Streaming training data: `data.streaming` with local parquet shards and WebDataset-style tar shards.
#
# The shards are written by fixtures.write_digit_shards (conftest.py's `shards`) from scikit-learn's real handwritten
# digits (one undecodable image per format).


def _parquet_args(root, **kwargs):
    files = {"train": str(root / "parquet" / "train-*.parquet"), "test": str(root / "parquet" / "test-*.parquet")}
    return DataArguments(
        dataset_name="parquet",
        data_files=files,
        image_id_column=None,
        streaming=True,
        max_eval_samples=NUM_TEST,
        shuffle_buffer_size=16,
        **kwargs,
    )


def _webdataset_args(root, **kwargs):
    files = {"train": str(root / "wds" / "train-*.tar"), "test": str(root / "wds" / "test-*.tar")}
    kwargs = {"image_column": "png", "caption_column": "txt", "label_column": "cls", **kwargs}
    return DataArguments(
        dataset_name="webdataset",
        data_files=files,
        image_id_column=None,
        streaming=True,
        max_eval_samples=NUM_TEST,
        shuffle_buffer_size=16,
        **kwargs,
    )


def _keys(dataset, args):
    return [(row[args.caption_column], row[ROW_ID_COLUMN]) for row in dataset]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_stream_columns_row_ids_order_and_take(shards, fmt):
    make = _parquet_args if fmt == "parquet" else _webdataset_args
    args = make(shards)
    train, evaluation = load_image_text_datasets(args, seed=0)
    assert isinstance(train, datasets.IterableDataset)
    for column in (args.image_column, args.caption_column, args.label_column, ROW_ID_COLUMN):
        assert column in train.column_names
    rows = list(train)
    assert len(rows) == NUM_SHARDS * ROWS_PER_SHARD
    ids = [row[ROW_ID_COLUMN] for row in rows]
    assert all(isinstance(i, int) and 0 <= i < 2**56 for i in ids) and len(set(ids)) == len(ids)
    assert sum(row[args.image_column]["bytes"] == CORRUPT_BYTES for row in rows) == 1  # undecoded: the collator decodes
    if fmt == "webdataset":
        assert isinstance(train.features["png"], datasets.Image) and not train.features["png"].decode

    # the same seed gives the same order, another seed another order; row ids belong to rows, not positions
    again, _ = load_image_text_datasets(args, seed=0)
    other, _ = load_image_text_datasets(args, seed=1)
    first, second, third = _keys(train, args), _keys(again, args), _keys(other, args)
    assert first == second
    assert first != third and sorted(first) == sorted(third)
    train.set_epoch(1)  # a new epoch reshuffles; every row keeps its id
    assert sorted(_keys(train, args)) == sorted(first) and _keys(train, args) != first

    # DataLoader workers split the shards between them; ids stay those of the rows
    loader = torch.utils.data.DataLoader(train, batch_size=None, num_workers=2)
    assert sorted((row[args.caption_column], row[ROW_ID_COLUMN]) for row in loader) == sorted(first)

    # max_train_samples: the first rows in file order (a stable subset), shuffled
    limited, _ = load_image_text_datasets(make(shards, max_train_samples=25), seed=0)
    subset = list(limited)
    assert len(subset) == 25
    in_file_order = [row for shard in digit_shard_rows()[0] for row in shard][:25]
    expected = {_row_key({"bytes": r["png"], "path": None}, r["caption"])[ROW_ID_COLUMN] for r in in_file_order}
    assert {row[ROW_ID_COLUMN] for row in subset} == expected  # ids are content keys: the same for both formats

    # the eval split is materialised (map-style) with its own row indices
    assert isinstance(evaluation, datasets.Dataset) and len(evaluation) == NUM_TEST
    assert evaluation[ROW_ID_COLUMN] == list(range(NUM_TEST))


def test_webdataset_labels_from_cls_and_json_agree(shards):
    by_cls, _ = load_image_text_datasets(_webdataset_args(shards), seed=0)
    by_json, _ = load_image_text_datasets(_webdataset_args(shards, label_column="json.label"), seed=0)
    cls_rows, json_rows = list(by_cls), list(by_json)
    assert [r["cls"] for r in cls_rows] == [r["json.label"] for r in json_rows]
    assert [r["__key__"] for r in cls_rows] == [r["__key__"] for r in json_rows]
    digits = load_digits()
    for row in cls_rows:  # keys are <shard><index>: the label is that digit's
        shard, index = int(row["__key__"][:2]), int(row["__key__"][2:])
        assert row["cls"] == digits.target[shard * ROWS_PER_SHARD + index]


def test_brace_patterns_name_shards():
    """WebDataset shard lists are written with shell braces; `datasets` resolves globs but not braces."""
    assert expand_braces("train-{00000..00003}.tar") == [f"train-{i:05d}.tar" for i in range(4)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"] and expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{train,extra}-{0..1}.tar") == ["train-0.tar", "train-1.tar", "extra-0.tar", "extra-1.tar"]
    assert expand_braces("shards/*.tar") == ["shards/*.tar"] and expand_braces("a{}b{name}") == ["a{}b{name}"]
    assert expand_data_files({"train": "t-{0..1}.tar", "test": "x.tar"}) == {
        "train": ["t-0.tar", "t-1.tar"],
        "test": "x.tar",
    }
    assert expand_data_files(["a{1,2}", "b"]) == ["a1", "a2", "b"] and expand_data_files(None) is None
    with pytest.raises(ValueError, match="expands to more than"):
        expand_braces("{0..99999999}")


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_stream_shards_named_by_a_brace_range(shards, fmt):
    """Exactly the named shards are read: a range over 2 of the 3 shards streams their 40 rows."""
    folder, extension, make = (
        ("parquet", "parquet", _parquet_args) if fmt == "parquet" else ("wds", "tar", _webdataset_args)
    )
    args = make(shards)
    args.data_files = {
        "train": str(shards / folder / f"train-{{00000..00001}}.{extension}"),
        "test": args.data_files["test"],
    }
    train, evaluation = load_image_text_datasets(args, seed=0)
    assert len(evaluation) == NUM_TEST
    expected = {
        _row_key({"bytes": r["png"], "path": None}, r["caption"])[ROW_ID_COLUMN]
        for shard in digit_shard_rows()[0][:2]
        for r in shard
    }
    ids = [row[ROW_ID_COLUMN] for row in train]
    assert len(ids) == 2 * ROWS_PER_SHARD and set(ids) == expected


def test_stream_string_labels_need_class_names(shards):
    with pytest.raises(ValueError, match="set class_names"):
        load_image_text_datasets(_parquet_args(shards, label_column="name"), seed=0)
    args = _parquet_args(shards, label_column="name", class_names=DIGIT_NAMES[:5])  # 5..9 are unknown -> None
    train, evaluation = load_image_text_datasets(args, seed=0)
    assert isinstance(train.features["name"], datasets.ClassLabel)
    for row in train:
        assert row["name"] == (row["label"] if row["label"] < 5 else None)
    assert [n if n is not None else -1 for n in evaluation["name"]] == [
        lab if lab < 5 else -1 for lab in evaluation["label"]
    ]


def test_stream_eval_split_needs_a_row_limit(shards):
    args = _parquet_args(shards)
    args.max_eval_samples = None
    with pytest.raises(ValueError, match="set max_eval_samples"):
        load_image_text_datasets(args)
    args.eval_split = None
    train, evaluation = load_image_text_datasets(args)
    assert evaluation is None and isinstance(train, datasets.IterableDataset)


def test_parquet_with_image_feature_and_digits_demo_stream(tmp_path):
    """Parquet written by `datasets` (an Image feature in the schema) and the embedded demo, streamed."""
    shard_rows = digit_shard_rows()[0][0]
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    dataset = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": r["png"], "path": None} for r in shard_rows],
            "caption": [r["caption"] for r in shard_rows],
            "label": [r["label"] for r in shard_rows],
        },
        features=features,
    )
    dataset.to_parquet(str(tmp_path / "train-0.parquet"))
    args = DataArguments(
        dataset_name="parquet",
        data_files={"train": str(tmp_path / "*.parquet")},
        image_id_column=None,
        eval_split=None,
        streaming=True,
    )
    train, _ = load_image_text_datasets(args)
    assert train.features["image"] == datasets.Image(decode=False)
    assert len(list(train)) == ROWS_PER_SHARD

    demo = DataArguments(streaming=True, max_train_samples=50, max_eval_samples=30)
    train, evaluation = load_image_text_datasets(demo, seed=3)
    assert isinstance(train, datasets.IterableDataset) and len(list(train)) == 50
    assert isinstance(evaluation, datasets.Dataset) and len(evaluation) == 30
    assert train.features["label"].names == DIGIT_NAMES


def test_collator_skips_and_counts_the_corrupt_streamed_image(shards):
    args = _webdataset_args(shards)
    train, _ = load_image_text_datasets(args, seed=0)
    collator = ImageTextCollator.from_data_args(build_digits_processor(image_size=16), args)
    loader = torch.utils.data.DataLoader(train, batch_size=8, collate_fn=collator)
    batches = list(loader)
    assert collator.num_skipped == 1 and sum(b["num_skipped"] for b in batches) == 1
    assert sum(len(b["positive_ids"]) for b in batches) >= NUM_SHARDS * ROWS_PER_SHARD - 1
    assert all(len(b["sample_ids"]) == len(b["positive_ids"]) for b in batches)
