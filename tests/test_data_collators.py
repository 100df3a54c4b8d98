"""vlalign.data.collators: ImageTextCollator skips bad rows and counts them by reason, refills a batch with copies
of its good items, flags an all-bad batch, gives positive ids and two views, is seeded and reproducible (and
differs per dataloader worker); MultiImageCollator drops unreadable images and empty items."""

import logging

import datasets
import pytest
import torch
from fixtures import (
    cmyk_jpeg,
    corrupt_values,
    digit_png,
    gray16_png,
    hostile_rows,
    one_by_one_png,
    png_bytes,
    png_claiming_size,
    rgba_png,
    truncated_png,
)

from vlalign.data import (
    ImageTextCollator,
    MultiImageCollator,
    build_digits_dataset,
    build_digits_processor,
    decode_image,
)


@pytest.fixture(scope="module")
def digits():
    return build_digits_dataset()


@pytest.fixture(scope="module")
def processor():
    return build_digits_processor()


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

    plain = processor(images=[decode_image(r["image"]) for r in batch_rows])["pixel_values"]
    no_views = ImageTextCollator(processor, two_views=False, augment=False)(batch_rows)
    assert "pixel_values_view2" not in no_views
    torch.testing.assert_close(no_views["pixel_values"], plain)
    # one augmented view (a model whose objectives use no second view): augmented, seeded, and no second view built
    one_view = ImageTextCollator(processor, two_views=False)
    first, again = one_view(batch_rows), ImageTextCollator(processor, two_views=False)(batch_rows)
    assert "pixel_values_view2" not in first and not torch.equal(first["pixel_values"], plain)
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    with pytest.raises(ValueError, match="two_views=True needs augment=True"):
        ImageTextCollator(processor, augment=False)
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
        {"images": [corrupt], "prompt": "<image> which digit?", "answer": "two"},  # nothing readable: skipped
        {"images": [good], "prompt": "<image> which digit?", "answer": "three"},
    ]
    collator = MultiImageCollator(processor)
    with caplog.at_level("WARNING"):
        batch = collator(rows)
    assert collator.num_skipped_images == 2 and collator.num_skipped_items == 1
    assert "Skipped an undecodable image" in caplog.text
    assert batch["pixel_values"].shape[:2] == (2, 2)
    assert batch["image_mask"].tolist() == [[True, True], [True, False]]
    answers = processor.batch_decode(
        torch.where(batch["labels"] == -100, processor.tokenizer.pad_token_id, batch["labels"]),
        skip_special_tokens=True,
    )
    assert answers == ["one", "three"]
    with pytest.raises(RuntimeError, match="no item of this batch has a readable image"):
        collator([rows[1]])


# ---------------------------------------------------------------- hostile rows (fixtures.hostile_rows)


def test_collator_counts_every_hostile_row_by_reason(tmp_path, digits_processor_16, caplog):
    rows, expected = hostile_rows(tmp_path)
    collator = ImageTextCollator(digits_processor_16, seed=0, refill=False, log_every=2)
    with caplog.at_level(logging.WARNING, logger="vlalign.data"):
        batch = collator(rows)
    usable = len(rows) - 9
    assert batch["num_skipped"] == 9 and batch["pixel_values"].shape == (usable, 3, 16, 16)
    assert collator.num_skipped == 6 and collator.num_skipped_captions == 3
    assert collator.data_report() == expected
    # rate-limited warnings (the 1st, 2nd, 4th and 6th bad image), each naming its reason
    image_warnings = [r.getMessage() for r in caplog.records if "undecodable image" in r.getMessage()]
    assert len(image_warnings) == 4 and "[truncated]" in image_warnings[0]
    assert any("[too_large]" in message for message in image_warnings)
    # captions: sanitised ones went through; a list of candidates keeps only the good ones
    texts = digits_processor_16.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert texts.count("a handwritten digit one") >= usable - 3
    listed = ImageTextCollator(digits_processor_16, seed=0)
    one = listed([{"image": {"bytes": digit_png(2), "path": None}, "caption": [None, "", b"\xff two", 7, "two"]}])
    assert one["num_skipped"] == 0
    assert listed.data_report() == {
        "images_skipped": 0,
        "captions_skipped": 3,
        "captions_skipped_missing": 1,
        "captions_skipped_empty": 1,
        "captions_skipped_not_text": 1,
        "captions_sanitised": 1,
        "captions_sanitised_invalid_utf8": 1,
    }


def test_multi_image_collator_drops_hostile_images_from_items(tmp_path, caplog):
    from vlalign.data.multiview_digits import build_mivc_digits_processor

    processor = build_mivc_digits_processor(image_seq_length=4, image_size=16)
    (tmp_path / "empty.png").write_bytes(b"")
    good = {"bytes": digit_png(3), "path": None}
    rows = [
        {
            "images": [
                good,
                {"bytes": truncated_png(), "path": None},
                {"bytes": cmyk_jpeg((0, 0, 0, 0)), "path": None},
                {"bytes": png_claiming_size(30_000, 30_000), "path": None},
                {"bytes": one_by_one_png(), "path": None},
                {"bytes": rgba_png(), "path": None},
            ],
            "prompt": "<image> which digit?",
            "answer": "three",
        },
        {
            "images": [str(tmp_path / "empty.png"), str(tmp_path / "missing.png")],  # nothing readable: skipped
            "prompt": "<image> which digit?",
            "answer": "four",
        },
        {
            "images": [good, {"bytes": gray16_png([0, 65535]), "path": None}],
            "prompt": "<image> which digit?",
            "answer": "five",
        },
    ]
    collator = MultiImageCollator(processor)
    with caplog.at_level(logging.WARNING, logger="vlalign.data"):
        batch = collator(rows)
    assert batch["pixel_values"].shape[:2] == (2, 4)  # the first item keeps 4 of its 6 images
    assert batch["image_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert collator.num_skipped_images == 4 and collator.num_skipped_items == 1
    assert collator.take_data_report("train_") == {
        "train_images_skipped": 4,
        "train_images_skipped_truncated": 1,
        "train_images_skipped_too_large": 1,
        "train_images_skipped_empty_file": 1,
        "train_images_skipped_file_not_found": 1,
    }
    assert collator.num_skipped_images == 0  # counting afresh, e.g. for evaluation
    assert caplog.text.count("Skipped an undecodable image") == 1 and "[truncated]" in caplog.text  # rate-limited
