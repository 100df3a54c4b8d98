"""Tests for the digits demo data, dataset loading, image decoding and the collators (vlalign.data); the eval split
decoded for evaluation: tests/test_evaluation.py."""

import io
import json
import logging
import re

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from transformers import AutoTokenizer, HfArgumentParser, ViTImageProcessorPil

from vlalign.data import (
    DIGIT_CAPTION_TEMPLATES,
    DIGIT_NAMES,
    DIGIT_ZERO_SHOT_TEMPLATES,
    GENERIC_ZERO_SHOT_TEMPLATES,
    ROW_ID_COLUMN,
    DataArguments,
    ImageTextCollator,
    build_digits_dataset,
    build_digits_processor,
    build_digits_tokenizer,
    decode_image,
    digit_captions,
    load_image_text_datasets,
    resolve_class_names,
)
from vlalign.evaluation import build_eval_inputs


@pytest.fixture(scope="module")
def digits():
    return build_digits_dataset()


@pytest.fixture(scope="module")
def processor():
    return build_digits_processor()


def png_bytes(value=128, size=(12, 10), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, value if mode != "RGB" else (value, 255 - value, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- digits dataset


def test_digits_splits_follow_index_mod_5(digits):
    assert len(digits["train"]) == 1437 and len(digits["test"]) == 360
    test_ids, train_ids = list(digits["test"]["image_id"]), list(digits["train"]["image_id"])
    assert all(i % 5 == 0 for i in test_ids)
    assert all(i % 5 != 0 for i in train_ids)
    assert sorted(test_ids + train_ids) == list(range(1797))
    assert digits["train"].features["label"].names == DIGIT_NAMES


def test_digits_images_are_the_sklearn_digits_inverted():
    sk = load_digits()
    small = build_digits_dataset(image_size=8)["test"]
    for row in small.select(range(20)):
        image = row["image"]
        assert image.mode == "L" and image.size == (8, 8)
        expected = 255 - np.round(sk.images[row["image_id"]] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(image), expected)  # dark ink on light paper
        assert row["label"] == sk.target[row["image_id"]]


def test_digits_upsampled_images_match_source(digits):
    sk = load_digits()
    for row in digits["train"].select(range(10)):
        image = row["image"]
        assert image.size == (32, 32)
        down = np.asarray(image.resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
        ink = sk.images[row["image_id"]]
        assert np.corrcoef(down.ravel(), ink.ravel())[0, 1] < -0.9


def test_digits_deterministic():
    a, b = build_digits_dataset(image_size=16), build_digits_dataset(image_size=16)
    for split in ("train", "test"):
        assert (
            a[split].cast_column("image", datasets.Image(decode=False))["image"][:50]
            == b[split].cast_column("image", datasets.Image(decode=False))["image"][:50]
        )
        assert a[split]["caption"] == b[split]["caption"]


def test_captions_name_the_right_digit(digits):
    number_words = set(DIGIT_NAMES)
    for row in digits["test"]:
        label = row["label"]
        assert len(row["caption"]) == len(DIGIT_CAPTION_TEMPLATES)
        assert row["caption"] == digit_captions(label)
        for caption in row["caption"]:
            words = re.findall(r"[a-z]+|\d", caption)
            mentioned = {w for w in words if w in number_words} | {DIGIT_NAMES[int(w)] for w in words if w.isdigit()}
            assert mentioned == {DIGIT_NAMES[label]}, caption


def test_templates_have_placeholders():
    assert len(DIGIT_CAPTION_TEMPLATES) >= 6 and len(set(DIGIT_CAPTION_TEMPLATES)) == len(DIGIT_CAPTION_TEMPLATES)
    for template in DIGIT_CAPTION_TEMPLATES + DIGIT_ZERO_SHOT_TEMPLATES:
        assert "{name}" in template or "{digit}" in template
        assert template.format(name="seven", digit=7) != template


# ---------------------------------------------------------------- tokenizer / processor


def all_digit_texts():
    return [
        t.format(name=DIGIT_NAMES[d], digit=d)
        for d in range(10)
        for t in DIGIT_CAPTION_TEMPLATES + DIGIT_ZERO_SHOT_TEMPLATES + GENERIC_ZERO_SHOT_TEMPLATES
    ]


def test_digits_tokenizer_covers_all_captions(tmp_path):
    tokenizer = build_digits_tokenizer()
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert tokenizer.pad_token_id == 0
    texts = all_digit_texts()
    ids = tokenizer(texts)["input_ids"]
    assert all(tokenizer.unk_token_id not in seq for seq in ids)
    assert max(len(seq) for seq in ids) <= build_digits_processor().max_length  # captions are never truncated
    # whole words, not character pieces, for caption vocabulary
    assert tokenizer.tokenize("a handwritten digit seven") == ["a", "handwritten", "digit", "seven"]
    # lowercasing is on
    assert tokenizer("A HANDWRITTEN Digit SEVEN")["input_ids"] == tokenizer("a handwritten digit seven")["input_ids"]
    # unseen lowercase words fall back to letters, not [UNK]
    assert tokenizer.unk_token_id not in tokenizer("a photo of a zebra")["input_ids"]
    # deterministic
    assert build_digits_tokenizer().get_vocab() == vocab

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == vocab
    assert loaded(texts)["input_ids"] == ids
    assert loaded.do_lower_case if hasattr(loaded, "do_lower_case") else True


def test_digits_processor_configuration(processor):
    assert processor.augmentation["hflip_p"] == 0.0
    assert processor.augmentation["crop_scale"] == [0.5, 1.0]
    assert processor.augmentation["blur_p"] == 0.5  # other defaults kept
    assert processor.max_length == 16
    image_processor = processor.image_processor
    assert isinstance(image_processor, ViTImageProcessorPil)
    assert image_processor.size == {"height": 32, "width": 32} and image_processor.do_resize
    assert list(image_processor.image_mean) == [0.5] * 3 and list(image_processor.image_std) == [0.5] * 3


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


# ---------------------------------------------------------------- decoding


def test_decode_image_accepts_all_forms(tmp_path):
    data = png_bytes(100)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    candidates = [
        Image.open(io.BytesIO(data)),
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
        str(path),
        path,
        data,
        reference,
        torch.from_numpy(reference.copy()).permute(2, 0, 1),  # channel-first tensor
    ]
    for value in candidates:
        image = decode_image(value)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), reference)
    grey = decode_image(np.full((4, 5), 0.5))  # float array in [0, 1]
    assert grey.size == (5, 4) and np.asarray(grey)[0, 0].tolist() == [128, 128, 128]
    palette = decode_image(Image.new("RGB", (3, 3), (200, 10, 10)).convert("P"))
    assert palette.mode == "RGB"


def oriented(fmt: str, orientation: int) -> tuple[bytes, np.ndarray]:
    """(an image file whose EXIF Orientation tag is `orientation`, the pixels as stored): 6x4 pixels, all different,
    so any turn or flip changes the array."""
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    exif = Image.Exif()
    exif[0x0112] = orientation  # ExifTags.Base.Orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format=fmt, exif=exif.tobytes())
    return buffer.getvalue(), stored


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation, turn", [(6, -1), (8, 1)])  # shown turned clockwise / anticlockwise
def test_decode_image_applies_the_exif_orientation_from_every_source(fmt, orientation, turn, tmp_path):
    from PIL import ImageOps
    from transformers.image_utils import load_image

    data, stored = oriented(fmt, orientation)
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(data)
    as_stored = Image.open(io.BytesIO(data)).convert("RGB")
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert upright.shape == (6, 4, 3) and np.asarray(as_stored).shape == (4, 6, 3)
    if fmt == "PNG":  # lossless: the turn itself, not only PIL's own idea of it
        np.testing.assert_array_equal(upright, np.rot90(stored, k=turn))
    # what training decodes is what `datasets` and inference (transformers' load_image) see
    np.testing.assert_array_equal(np.asarray(datasets.Image().decode_example({"bytes": data, "path": None})
                                             .convert("RGB")), upright)
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), upright)
    for value in (data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}, str(path), path,
                  Image.open(io.BytesIO(data))):
        image = decode_image(value)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), upright)


def corrupt_values():
    good = png_bytes(50, size=(40, 40))
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(noisy, "PNG")
    return {
        "truncated": noisy.getvalue()[: len(noisy.getvalue()) // 2],
        "zero-byte": b"",
        "garbage": b"definitely not an image" * 20,
        "header only": good[:24],
    }


@pytest.mark.parametrize("name", list(corrupt_values()))
def test_decode_image_rejects_corrupt_data(name, tmp_path):
    value = corrupt_values()[name]
    with pytest.raises((ValueError, OSError)):
        decode_image({"bytes": value, "path": None})
    path = tmp_path / "bad.png"
    path.write_bytes(value)
    with pytest.raises((ValueError, OSError)):
        decode_image(str(path))
    with pytest.raises((ValueError, OSError)):
        decode_image({"bytes": None, "path": str(tmp_path / "missing.png")})
    with pytest.raises(ValueError):
        decode_image(12345)


# ---------------------------------------------------------------- collator


def mixed_rows():
    bad = corrupt_values()
    rows = []
    for i, (value, caption) in enumerate(
        [
            (png_bytes(10), ["one caption", "another caption"]),
            (bad["truncated"], "x"),
            (png_bytes(90), "good caption"),
            (bad["zero-byte"], "x"),
            (bad["garbage"], ["x"]),
            (png_bytes(170), ""),  # empty caption
            (png_bytes(200), None),  # missing caption
            (png_bytes(250), ["", "  ", "last good"]),
        ]
    ):
        rows.append({"image": {"bytes": value, "path": None}, "caption": caption, "label": i % 3, "image_id": 100 + i})
    return rows


def test_collator_skips_bad_rows_and_counts(processor, caplog):
    collator = ImageTextCollator(processor, label_column="label", image_id_column="image_id", seed=0, refill=False)
    with caplog.at_level(logging.WARNING, logger="vlalign.data"):
        batch = collator(mixed_rows())
    good = [0, 2, 7]
    assert batch["pixel_values"].shape == batch["pixel_values_view2"].shape == (3, 3, 32, 32)
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == 3
    assert batch["positive_ids"].dtype == torch.long
    assert batch["positive_ids"].tolist() == [i % 3 for i in good]  # positives_by="label"
    assert batch["return_loss"] is True
    assert batch["num_skipped"] == 5
    assert collator.num_skipped == 3 and collator.num_skipped_captions == 2
    texts = processor.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert texts[0] in ("one caption", "another caption") and texts[1:] == ["good caption", "last good"]
    assert any("truncated" in r.getMessage() for r in caplog.records if r.name == "vlalign.data")

    # totals accumulate across calls; the per-batch count does not
    batch = collator(mixed_rows()[:2])
    assert batch["num_skipped"] == 1 and collator.num_skipped == 4


def test_collator_refills_dropped_rows_with_copies_of_the_batch_s_good_items(processor):
    collator = ImageTextCollator(processor, label_column="label", image_id_column="image_id", seed=0)
    first = collator(mixed_rows())  # 3 good rows, 5 bad ones replaced by copies of the good ones
    assert first["pixel_values"].shape[0] == len(mixed_rows()) == 8
    assert first["num_skipped"] == 5 and collator.num_refilled == 5
    good_ids = first["positive_ids"][:3].tolist()
    assert good_ids == [i % 3 for i in (0, 2, 7)] and set(first["positive_ids"][3:].tolist()) <= set(good_ids)
    # each copy is one of the good items (same caption and id; its pixels get their own augmentation)
    for row in range(3, 8):
        matches = [g for g in range(3) if torch.equal(first["input_ids"][row], first["input_ids"][g])]
        assert matches and first["positive_ids"][row] in [first["positive_ids"][g] for g in matches]
    # the refill depends on the batch index only, not on earlier batches: a fresh collator at the same index agrees
    second = collator(mixed_rows())
    fresh = ImageTextCollator(processor, label_column="label", image_id_column="image_id", seed=0)
    fresh.batches_collated = 1
    again = fresh(mixed_rows())
    for key in ("pixel_values", "input_ids", "positive_ids"):
        assert torch.equal(second[key], again[key]), key
    # an all-bad batch has nothing to copy: the trainer skips it
    bad_rows = [r for i, r in enumerate(mixed_rows()) if i in (1, 3, 4, 5)]
    assert collator(bad_rows) == {"num_skipped": 4, "empty_batch": True}


def test_collator_all_bad_batch_is_flagged_empty(processor):
    collator = ImageTextCollator(processor)
    rows = [r for i, r in enumerate(mixed_rows()) if i in (1, 3, 4, 5)]
    assert collator(rows) == {"num_skipped": 4, "empty_batch": True}


def test_collator_positive_ids_and_views(processor, digits):
    raw = digits["train"].cast_column("image", datasets.Image(decode=False)).select(range(16))
    batch_rows = list(raw)
    by_label = ImageTextCollator(processor, label_column="label", image_id_column="image_id")(batch_rows)
    by_image = ImageTextCollator(processor, label_column="label", image_id_column="image_id", positives_by="image")(
        batch_rows
    )
    assert by_label["positive_ids"].tolist() == raw["label"]
    assert by_image["positive_ids"].tolist() == raw["image_id"]
    # string ids are hashed stably: equal strings -> equal ids, different strings -> different ids
    str_rows = [dict(r, image_id=name) for r, name in zip(batch_rows[:3], ["a.png", "b.png", "a.png"])]
    ids = ImageTextCollator(processor, image_id_column="image_id", positives_by="image")(str_rows)["positive_ids"]
    assert ids[0] == ids[2] != ids[1]
    # without any id column each row gets its own id
    bare = [{"image": r["image"], "caption": r["caption"]} for r in batch_rows[:4]]
    assert len(set(ImageTextCollator(processor, positives_by="image")(bare)["positive_ids"].tolist())) == 4

    no_views = ImageTextCollator(processor, two_views=False)(batch_rows)
    assert "pixel_values_view2" not in no_views
    torch.testing.assert_close(
        no_views["pixel_values"], processor(images=[decode_image(r["image"]) for r in batch_rows])["pixel_values"]
    )
    assert not torch.equal(by_label["pixel_values"], by_label["pixel_values_view2"])


def test_collator_seeded_reproducible_and_caption_choice_varies(processor, digits):
    rows = list(digits["train"].cast_column("image", datasets.Image(decode=False)).select(range(8)))
    a = ImageTextCollator(processor, seed=7)(rows)
    b = ImageTextCollator(processor, seed=7)(rows)
    c = ImageTextCollator(processor, seed=8)(rows)
    for key in ("pixel_values", "pixel_values_view2", "input_ids"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    # captions are drawn from each row's own list, and different rows draw different templates
    chosen = []
    for ids, mask, row in zip(a["input_ids"], a["attention_mask"], rows):
        sequence = ids[mask.bool()].tolist()
        matches = [k for k, c in enumerate(row["caption"]) if processor.tokenizer(c)["input_ids"] == sequence]
        assert matches, row["caption"]
        chosen.append(matches[0])
    assert len(set(chosen)) > 1


def test_collator_dataloader_workers_get_different_augmentations(processor):
    """Workers hold copies of the collator; they must not replay the same random stream."""
    row = {"image": {"bytes": png_bytes(80, size=(24, 24)), "path": None}, "caption": "a digit", "label": 1}
    rows = [row] * 4
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=2,
        num_workers=2,
        collate_fn=ImageTextCollator(processor, label_column="label"),
        multiprocessing_context="fork",
    )
    batches = list(loader)
    assert len(batches) == 2
    assert not torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])


def test_multi_image_collator_drops_unreadable_images_and_empty_items(caplog):
    import io as _io

    from PIL import Image as _Image

    from vlalign.data import MultiImageCollator, build_mivc_digits_processor

    processor = build_mivc_digits_processor(image_seq_length=4, image_size=16)
    buffer = _io.BytesIO()
    _Image.new("RGB", (16, 16), "white").save(buffer, format="PNG")
    good = {"bytes": buffer.getvalue(), "path": None}
    corrupt = {"bytes": b"\x89PNG\r\n\x1a\n not a png", "path": None}
    rows = [
        {"images": [good, corrupt, good], "prompt": "<image> which digit?", "answer": "one"},
        {"images": [corrupt], "prompt": "<image> which digit?", "answer": "two"},   # nothing readable: skipped
        {"images": [good], "prompt": "<image> which digit?", "answer": "three"},
    ]
    collator = MultiImageCollator(processor)
    with caplog.at_level("WARNING"):
        batch = collator(rows)
    assert collator.num_skipped_images == 2 and collator.num_skipped_items == 1
    assert "Skipped an undecodable image" in caplog.text
    assert batch["pixel_values"].shape[:2] == (2, 2)
    assert batch["image_mask"].tolist() == [[True, True], [True, False]]
    answers = processor.batch_decode(torch.where(batch["labels"] == -100, processor.tokenizer.pad_token_id,
                                                 batch["labels"]), skip_special_tokens=True)
    assert answers == ["one", "three"]
    with pytest.raises(RuntimeError, match="no item of this batch has a readable image"):
        collator([rows[1]])
