"""Streaming training data: `data.streaming` with local parquet shards and WebDataset-style tar shards.

The shards are written here from scikit-learn's real handwritten digits (one undecodable image per format).
"""

import io
import json
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from fixtures import TINY_TRAIN_MODEL
from sklearn.datasets import load_digits

from vlalign.data import (
    DIGIT_NAMES,
    ROW_ID_COLUMN,
    DataArguments,
    ImageTextCollator,
    build_digits_processor,
    expand_braces,
    expand_data_files,
    load_image_text_datasets,
)
from vlalign.data.digits import _digit_to_png
from vlalign.data.sources import _row_key

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

NUM_SHARDS, ROWS_PER_SHARD, NUM_TEST = 3, 20, 12
CORRUPT = (1, 2)  # (shard, row): the 23rd row in file order
CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n not really a png"


def _rows():
    """(train shards, test rows): dicts with png bytes, caption, label (int) and label name."""
    digits = load_digits()
    rows = []
    for index in range(NUM_SHARDS * ROWS_PER_SHARD + NUM_TEST):
        label = int(digits.target[index])
        rows.append({"png": _digit_to_png(digits.data[index], 16), "caption": f"a handwritten digit {DIGIT_NAMES[label]}",
                     "label": label, "name": DIGIT_NAMES[label]})
    shards = [rows[s * ROWS_PER_SHARD:(s + 1) * ROWS_PER_SHARD] for s in range(NUM_SHARDS)]
    shards[CORRUPT[0]][CORRUPT[1]]["png"] = CORRUPT_BYTES
    return shards, rows[NUM_SHARDS * ROWS_PER_SHARD:]


def _write_parquet(path: Path, rows) -> None:
    """Image column as {"bytes", "path"} structs, as pyarrow writes them (no datasets Image feature)."""
    table = pa.Table.from_pylist([{"image": {"bytes": r["png"], "path": None}, "caption": r["caption"],
                                   "label": r["label"], "name": r["name"]} for r in rows])
    pq.write_table(table, path)


def _write_tar(path: Path, rows, prefix: str) -> None:
    """WebDataset layout: NNNN.png, NNNN.txt (caption), NNNN.cls (label) and NNNN.json ({"label": ...})."""
    with tarfile.open(path, "w") as tar:
        for i, r in enumerate(rows):
            files = {"png": r["png"], "txt": r["caption"].encode(), "cls": str(r["label"]).encode(),
                     "json": json.dumps({"label": r["label"]}).encode()}
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{prefix}{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(autouse=True)
def short_arrow_shutdown_pause(monkeypatch):
    """datasets pauses 5 s after each pass that interleaves parquet shards (shuffle reads up to 10 at a time) so
    pyarrow's reader threads can wind down; a fraction of that keeps these many short passes fast. (The setting is
    new in datasets 5.0; with older releases there is nothing to shorten.)"""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.2, raising=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train, test = _rows()
    (root / "parquet").mkdir()
    (root / "wds").mkdir()
    for s, rows in enumerate(train):
        _write_parquet(root / "parquet" / f"train-{s:05d}.parquet", rows)
        _write_tar(root / "wds" / f"train-{s:05d}.tar", rows, prefix=f"{s:02d}")
    _write_parquet(root / "parquet" / "test-00000.parquet", test)
    _write_tar(root / "wds" / "test-00000.tar", test, prefix="t")
    return root


def _parquet_args(root, **kwargs):
    files = {"train": str(root / "parquet" / "train-*.parquet"), "test": str(root / "parquet" / "test-*.parquet")}
    return DataArguments(dataset_name="parquet", data_files=files, image_id_column=None, streaming=True,
                         max_eval_samples=NUM_TEST, shuffle_buffer_size=16, **kwargs)


def _webdataset_args(root, **kwargs):
    files = {"train": str(root / "wds" / "train-*.tar"), "test": str(root / "wds" / "test-*.tar")}
    kwargs = {"image_column": "png", "caption_column": "txt", "label_column": "cls", **kwargs}
    return DataArguments(dataset_name="webdataset", data_files=files, image_id_column=None, streaming=True,
                         max_eval_samples=NUM_TEST, shuffle_buffer_size=16, **kwargs)


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
    in_file_order = [row for shard in _rows()[0] for row in shard][:25]
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
    assert expand_data_files({"train": "t-{0..1}.tar", "test": "x.tar"}) == {"train": ["t-0.tar", "t-1.tar"],
                                                                            "test": "x.tar"}
    assert expand_data_files(["a{1,2}", "b"]) == ["a1", "a2", "b"] and expand_data_files(None) is None
    with pytest.raises(ValueError, match="expands to more than"):
        expand_braces("{0..99999999}")


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_stream_shards_named_by_a_brace_range(shards, fmt):
    """Exactly the named shards are read: a range over 2 of the 3 shards streams their 40 rows."""
    folder, extension, make = (("parquet", "parquet", _parquet_args) if fmt == "parquet"
                               else ("wds", "tar", _webdataset_args))
    args = make(shards)
    args.data_files = {"train": str(shards / folder / f"train-{{00000..00001}}.{extension}"),
                       "test": args.data_files["test"]}
    train, evaluation = load_image_text_datasets(args, seed=0)
    assert len(evaluation) == NUM_TEST
    expected = {_row_key({"bytes": r["png"], "path": None}, r["caption"])[ROW_ID_COLUMN]
                for shard in _rows()[0][:2] for r in shard}
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
        lab if lab < 5 else -1 for lab in evaluation["label"]]


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
    shard_rows = _rows()[0][0]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": r["png"], "path": None} for r in shard_rows],
                                          "caption": [r["caption"] for r in shard_rows],
                                          "label": [r["label"] for r in shard_rows]}, features=features)
    dataset.to_parquet(str(tmp_path / "train-0.parquet"))
    args = DataArguments(dataset_name="parquet", data_files={"train": str(tmp_path / "*.parquet")},
                         image_id_column=None, eval_split=None, streaming=True)
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


def _train_config(root: Path, fmt: str) -> dict:
    if fmt == "parquet":
        data = {"dataset_name": "parquet", "data_files": {"train": str(root / "parquet" / "train-*.parquet"),
                                                          "test": str(root / "parquet" / "test-*.parquet")}}
    else:
        data = {"dataset_name": "webdataset", "data_files": {"train": str(root / "wds" / "train-*.tar"),
                                                             "test": str(root / "wds" / "test-*.tar")},
                "image_column": "png", "caption_column": "txt", "label_column": "cls"}
    data.update({"image_id_column": None, "max_eval_samples": NUM_TEST, "max_train_samples": 24,
                 "shuffle_buffer_size": 32, "class_names": DIGIT_NAMES,
                 "zero_shot_templates": ["a handwritten digit {name}"]})
    return {"model": TINY_TRAIN_MODEL, "data": data,
            "training": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                         "save_strategy": "no", "report_to": "none", "use_cpu": True, "seed": 0},
            "run": {"processor_name_or_path": str(root / "processor")}}


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_train_script_streams_shards_with_max_steps(shards, tmp_path, fmt):
    import train

    if not (shards / "processor").exists():
        build_digits_processor(image_size=16).save_pretrained(shards / "processor")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(_train_config(shards, fmt)))
    out = tmp_path / "out"
    # 24 rows (one corrupt) in 3 batches of 8: one pass over the limited stream
    results = train.main(["--config", str(config_path), "--streaming", "true", "--output_dir", str(out)])
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["train_steps"] == 3 and np.isfinite(saved["train_loss"])
    assert saved["train_items_skipped"] == 1
    assert saved["num_eval_images"] == NUM_TEST
    for key in ("zero_shot_accuracy", "i2t_recall@1", "t2i_recall@1"):
        assert 0.0 <= saved[key] <= 100.0, key
    assert results["train_items_skipped"] == 1
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()


def test_streaming_without_max_steps_is_refused(shards, tmp_path):
    import train

    config = _train_config(shards, "parquet")
    del config["training"]["max_steps"]
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="set training.max_steps"):
        train.main(["--config", str(config_path), "--streaming", "true", "--output_dir", str(tmp_path / "out")])


def test_streaming_refuses_running_z(shards, tmp_path):
    import train

    config = _train_config(shards, "parquet")
    config["model"] = {**TINY_TRAIN_MODEL, "use_momentum": False, "contrastive_loss": "decomposable",
                       "z_estimate": "running", "num_train_samples": 60}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit, match="running"):
        train.main(["--config", str(config_path), "--streaming", "true", "--output_dir", str(tmp_path / "out")])
