"""Hostile web data (issue 8): corrupt, truncated, empty and oversized files, unusual colour modes, and broken
captions are skipped or sanitised, counted by reason, and reported; a training run on such data completes."""

import functools
import io
import json
import logging
import os
import struct
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from fixtures import TINY_TRAIN_MODEL
from PIL import Image, ImageFile

from vlalign.data import (
    CAPTION_FIX_REASONS,
    CAPTION_SKIP_REASONS,
    DEFAULT_MAX_CAPTION_CHARS,
    DIGIT_NAMES,
    IMAGE_SKIP_REASONS,
    DataArguments,
    DataIssueCounts,
    ImageDecodeError,
    ImageTextCollator,
    MultiImageCollator,
    build_digits_processor,
    decode_image,
    sanitise_caption,
)
from vlalign.evaluation import build_eval_inputs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))  # training/train.py, run in-process by the end-to-end tests


# ---------------------------------------------------------------- hostile files


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_image(size=64, seed=0) -> Image.Image:
    """Incompressible pixels: the image data fills most of the file, so cutting the file cuts the pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncated_png() -> bytes:
    data = encode(noise_image())
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = encode(noise_image(), "JPEG", quality=95)
    return data[: len(data) // 2]


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (a decompression bomb as far as the header goes): IHDR is the
    first chunk, its width and height at bytes 16..23 and its CRC (over type + data) at 29..32."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(data[12:29]))
    return bytes(data)


def cmyk_jpeg(cmyk) -> bytes:
    return encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=100)


def rgba_png() -> bytes:
    """Row 0: fully transparent black, opaque red, half-transparent black."""
    pixels = np.array([[[0, 0, 0, 0], [200, 10, 10, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGBA"))


def palette_png_with_transparency() -> bytes:
    """Palette image: index 0 (black) is transparent, index 1 is opaque blue."""
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    return encode(image, transparency=0)


def gray16_png(values) -> bytes:
    image = Image.fromarray(np.array([values], dtype=np.uint16))
    assert image.mode == "I;16"
    return encode(image)


def one_by_one_png() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 200, 30)))


def one_bit_png() -> bytes:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    return encode(image)


def la_png() -> bytes:
    return encode(Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA"))


@functools.cache
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit_png(index: int, size: int = 16) -> bytes:
    pixels = (255 - sklearn_digits().images[index] * 255 / 16).astype(np.uint8)
    return encode(Image.fromarray(pixels).resize((size, size)))


def rgb(value, **kwargs) -> np.ndarray:
    image = decode_image(value, **kwargs)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ---------------------------------------------------------------- images: refusals, each with its reason


def refusal(value, **kwargs) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(value, **kwargs)
    assert caught.value.reason in IMAGE_SKIP_REASONS
    return caught.value.reason


def test_truncated_png_and_jpeg_are_refused_not_half_decoded(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # nothing in vlalign switched PIL to partial decoding
    assert refusal(truncated_png()) == "truncated"
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated_jpeg())
    assert refusal(str(path)) == "truncated"
    assert refusal({"bytes": None, "path": str(path)}) == "truncated"


def test_empty_missing_unreadable_and_non_image_values(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert refusal(str(empty)) == "empty_file"
    assert refusal({"bytes": b"", "path": None}) == "empty_file"
    assert refusal(str(tmp_path / "nowhere.png")) == "file_not_found"
    assert refusal(str(tmp_path)) == "unreadable_file"  # a directory
    assert refusal(b"<html>404 not found</html>" * 10) == "corrupt"
    named = tmp_path / "truncated.png"  # PIL's message names the file: the reason must not come from the name
    named.write_bytes(b"<html>404 not found</html>")
    assert refusal(str(named)) == "corrupt"
    assert refusal(encode(noise_image())[:40]) == "corrupt"  # cut inside the header: not identifiable
    assert refusal(None) == "missing"
    assert refusal({"bytes": None, "path": None}) == "missing"
    assert refusal(12345) == "unsupported"
    assert refusal(np.zeros((2, 3, 7))) == "unsupported"


def refusal_within(value, seconds: float = 10.0) -> ImageDecodeError:
    """decode_image(value) must refuse within `seconds`: run in a thread, so that a hang fails the test instead of
    hanging it."""
    outcome = {}

    def decode():
        try:
            outcome["image"] = decode_image(value)
        except Exception as error:  # noqa: BLE001 (reported below)
            outcome["error"] = error

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"decode_image({value!r}) still running after {seconds} s"
    assert "image" not in outcome, f"decode_image({value!r}) returned an image"
    assert isinstance(outcome["error"], ImageDecodeError), outcome["error"]
    return outcome["error"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifos_and_devices_are_refused_before_opening(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    try:
        for value in (str(fifo), fifo, {"bytes": None, "path": str(fifo)}):
            error = refusal_within(value)
            assert error.reason == "unreadable_file"
            assert "not a regular file (a FIFO)" in str(error) and str(fifo) in str(error)
    finally:  # a decode blocked in open() (a regression) gets its writer, and ends
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: nothing to release
            pass
    if os.path.exists("/dev/zero"):  # endless bytes, size 0: neither "empty_file" nor read
        error = refusal_within("/dev/zero")
        assert error.reason == "unreadable_file" and "not a regular file (a character device)" in str(error)
    error = refusal_within(str(tmp_path))
    assert error.reason == "unreadable_file" and "not a regular file (a directory)" in str(error)
    link = tmp_path / "link.png"  # a symbolic link to a regular file is that file
    link.symlink_to(tmp_path / "real.png")
    (tmp_path / "real.png").write_bytes(one_by_one_png())
    assert rgb(str(link))[0, 0].tolist() == [10, 200, 30]


@pytest.mark.parametrize("width, height, limit", [
    (30_000, 30_000, None),        # beyond PIL's own guard: its DecompressionBombError, reported as too_large
    (30_000, 30_000, 89_478_485),
    (10_000, 10_000, 89_478_485),  # between PIL's warning and error thresholds: our limit refuses it
    (2_000, 2_000, 1_000_000),     # a configured limit far below PIL's
])
def test_decompression_bomb_refused_from_its_header(width, height, limit, monkeypatch):
    loads = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original_load(self))
    bomb = png_claiming_size(width, height)
    assert len(bomb) < 100
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out either
        assert refusal(bomb, max_pixels=limit) == "too_large"
    assert time.perf_counter() - start < 0.5
    assert loads == []  # refused before any pixel was decoded (decoding this file would report "truncated")


def test_pixel_limit_applies_to_files_and_lazily_opened_images_and_allows_the_rest(tmp_path):
    lazy = Image.open(io.BytesIO(png_claiming_size(3_000, 3_000)))
    assert refusal(lazy, max_pixels=1_000_000) == "too_large"
    (tmp_path / "bomb.png").write_bytes(png_claiming_size(30_000, 30_000))
    assert refusal(str(tmp_path / "bomb.png")) == "too_large"
    assert decode_image(encode(Image.new("RGB", (100, 100))), max_pixels=10_000).size == (100, 100)  # = limit


# ---------------------------------------------------------------- images: colour modes converted faithfully


@pytest.mark.parametrize("cmyk, expected", [
    ((0, 0, 0, 0), (255, 255, 255)),    # no ink: paper white
    ((0, 0, 0, 255), (0, 0, 0)),        # full black ink
    ((255, 0, 0, 0), (0, 255, 255)),    # cyan
    ((0, 255, 255, 0), (255, 0, 0)),    # magenta + yellow = red
])
def test_cmyk_jpeg_converts_to_the_right_rgb(cmyk, expected):
    assert Image.open(io.BytesIO(cmyk_jpeg(cmyk))).mode == "CMYK"
    np.testing.assert_allclose(rgb(cmyk_jpeg(cmyk))[8, 8], expected, atol=3)


def test_transparency_is_composited_on_white():
    pixels = rgb(rgba_png())[0]
    assert pixels[0].tolist() == [255, 255, 255]  # transparent black -> white, not black
    assert pixels[1].tolist() == [200, 10, 10]
    np.testing.assert_allclose(pixels[2], [127, 127, 127], atol=1)  # half-transparent black over white
    assert rgb(palette_png_with_transparency())[0].tolist() == [[255, 255, 255], [0, 0, 255]]
    assert rgb(la_png())[0].tolist() == [[255, 255, 255], [50, 50, 50]]
    # a transparent colour key (tRNS chunk) of a grayscale or RGB PNG is transparency too
    gray = Image.new("L", (2, 1), 0)
    gray.putpixel((1, 0), 90)
    assert rgb(encode(gray, transparency=0))[0].tolist() == [[255, 255, 255], [90, 90, 90]]
    colour = Image.new("RGB", (2, 1), (1, 2, 3))
    colour.putpixel((1, 0), (40, 50, 60))
    assert rgb(encode(colour, transparency=(1, 2, 3)))[0].tolist() == [[255, 255, 255], [40, 50, 60]]


def test_16_bit_grayscale_scales_by_bit_depth_not_clipping():
    assert Image.open(io.BytesIO(gray16_png([0]))).mode == "I;16"
    assert rgb(gray16_png([0, 65535, 128 * 257, 257]))[0, :, 0].tolist() == [0, 255, 128, 1]
    # a dark 16-bit scan stays dark (a guess from its values would stretch 0..255 to full contrast)
    assert rgb(gray16_png([0, 255, 2570]))[0, :, 0].tolist() == [0, 1, 10]
    # 32-bit "I" images: 16-bit data as 16-bit, anything wider stretched from min to max
    wide16 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert wide16.mode == "I" and rgb(wide16)[0, :, 0].tolist() == [0, 255]
    signed = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert rgb(signed)[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("exif", [
    b"Exif\x00\x00garbage garbage",                          # not TIFF data: PIL raises SyntaxError on reading it
    b"Exif\x00\x00MM\x00\x2a\x00\x00",                       # cut inside the header: struct.error
    b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00"
    b"\x00\x00\x00\x00\x00\x00",                             # a well-formed tag with orientation 9 (no such one)
])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_broken_exif_block_is_ignored_and_the_pixels_kept_as_stored(exif, fmt, tmp_path):
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    data = encode(Image.fromarray(stored), fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    path = tmp_path / f"broken_exif.{fmt.lower()}"
    path.write_bytes(data)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert expected.shape == (4, 6, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL's own "Corrupt EXIF data" for the cut header
        for value in (data, str(path), Image.open(io.BytesIO(data))):
            np.testing.assert_array_equal(rgb(value), expected)


def test_1_bit_and_1x1_images_decode_and_pass_through_the_processor(digits_processor_16):
    assert rgb(one_bit_png())[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    tiny = decode_image(one_by_one_png())
    assert tiny.size == (1, 1) and np.asarray(tiny)[0, 0].tolist() == [10, 200, 30]
    out = digits_processor_16(images=[tiny, tiny], text=["a", "b"], two_views=True,
                              rng=np.random.default_rng(0), return_tensors="pt")
    assert out["pixel_values"].shape == out["pixel_values_view2"].shape == (2, 3, 16, 16)


# ---------------------------------------------------------------- captions


def test_sanitise_caption_drops_and_repairs_with_reasons():
    assert sanitise_caption(None) == (None, ("missing",))
    assert sanitise_caption("") == (None, ("empty",))
    assert sanitise_caption("  \t\n ") == (None, ("empty",))
    assert sanitise_caption("\x00\x07") == (None, ("empty",))  # nothing left once control characters go
    assert sanitise_caption(b"   ") == (None, ("empty",))
    assert sanitise_caption(42) == (None, ("not_text",))
    assert sanitise_caption("a digit\non paper\t") == ("a digit\non paper\t", ())  # whitespace is not hostile
    assert sanitise_caption("café".encode()) == ("café", ())  # valid UTF-8 bytes are simply decoded
    assert sanitise_caption(b"a \xff\xfe digit \xc3(") == ("a \ufffd\ufffd digit \ufffd(", ("invalid_utf8",))
    assert sanitise_caption("a lone \udcff surrogate") == ("a lone \ufffd surrogate", ("invalid_utf8",))
    assert sanitise_caption("a\x00 digit\x1b\x7f") == ("a digit", ("control_chars",))
    text, reasons = sanitise_caption(b"x\x00" + b"y" * 10, max_chars=5)
    assert text == "xyyy" and reasons == ("too_long", "control_chars")


def test_a_megabyte_caption_is_cut_cheaply(digits_processor_16):
    huge = "a handwritten digit " * 52_429  # ~1 MB
    start = time.perf_counter()
    text, reasons = sanitise_caption(huge)
    tokens = digits_processor_16.tokenizer(text, truncation=True, max_length=16)["input_ids"]
    assert time.perf_counter() - start < 0.5
    assert len(text) == DEFAULT_MAX_CAPTION_CHARS and reasons == ("too_long",) and len(tokens) == 16


def test_reason_names_are_disjoint_and_counts_report_flat_keys():
    assert not set(CAPTION_SKIP_REASONS) & set(CAPTION_FIX_REASONS)
    issues = DataIssueCounts()
    assert issues.report("train_") == {"train_images_skipped": 0, "train_captions_skipped": 0,
                                       "train_captions_sanitised": 0}
    for error in (ImageDecodeError("corrupt", "x"), OSError("broken data stream"), ImageDecodeError("too_large", "y")):
        issues.count_image_refusal(error)
    issues.count_caption(None, ("empty",))
    issues.count_caption("ok", ("too_long", "control_chars"))
    issues.count_caption("ok", ())
    assert issues.report() == {
        "images_skipped": 3, "images_skipped_corrupt": 2, "images_skipped_too_large": 1,
        "captions_skipped": 1, "captions_skipped_empty": 1,
        "captions_sanitised": 1, "captions_sanitised_control_chars": 1, "captions_sanitised_too_long": 1,
    }
    assert issues.summary() == ("3 images skipped (corrupt 2, too_large 1), 1 captions skipped (empty 1), "
                                "1 captions sanitised (control_chars 1, too_long 1)")


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


# ---------------------------------------------------------------- a hostile dataset


def hostile_rows(tmp_path: Path) -> tuple[list[dict], dict[str, int]]:
    """Rows with every hostile image and caption case (bad images carry good captions and vice versa), and the
    counts a collator must report for them. Images as datasets cells: embedded bytes or file paths."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    good_caption = "a handwritten digit one"
    bad_images = [
        {"bytes": truncated_png(), "path": None},
        {"bytes": None, "path": str(tmp_path / "cut.jpg")},
        {"bytes": None, "path": str(tmp_path / "empty.png")},
        {"bytes": b"\x89PNG\r\n\x1a\n but not really", "path": None},
        {"bytes": None, "path": str(tmp_path / "missing.png")},
        {"bytes": png_claiming_size(30_000, 30_000), "path": None},
    ]
    odd_images = [cmyk_jpeg((255, 0, 0, 0)), rgba_png(), palette_png_with_transparency(), gray16_png([0, 65535]),
                  one_by_one_png(), one_bit_png(), la_png()]
    bad_captions = [None, b"", b"   "]
    fixable_captions = [b"a handwritten digit one" * 50_000, b"a handwritten \xff digit one",
                        b"a handwritten\x00 digit one"]
    rows = [{"image": image, "caption": good_caption} for image in bad_images]
    rows += [{"image": {"bytes": data, "path": None}, "caption": good_caption} for data in odd_images]
    rows += [{"image": {"bytes": digit_png(1), "path": None}, "caption": caption}
             for caption in bad_captions + fixable_captions]
    expected = {
        "images_skipped": 6, "images_skipped_truncated": 2, "images_skipped_empty_file": 1,
        "images_skipped_corrupt": 1, "images_skipped_file_not_found": 1, "images_skipped_too_large": 1,
        "captions_skipped": 3, "captions_skipped_missing": 1, "captions_skipped_empty": 2,
        "captions_sanitised": 3, "captions_sanitised_too_long": 1, "captions_sanitised_invalid_utf8": 1,
        "captions_sanitised_control_chars": 1,
    }
    return rows, expected


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
    assert listed.data_report() == {"images_skipped": 0, "captions_skipped": 3, "captions_skipped_missing": 1,
                                    "captions_skipped_empty": 1, "captions_skipped_not_text": 1,
                                    "captions_sanitised": 1, "captions_sanitised_invalid_utf8": 1}


def as_bytes(caption):
    """Captions of a binary column (web data often arrives as bytes; str and bytes cannot share an Arrow column)."""
    return caption.encode() if isinstance(caption, str) else caption


def test_build_eval_inputs_counts_by_reason(tmp_path):
    rows, expected = hostile_rows(tmp_path)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("binary")})
    binary_rows = [dict(row, caption=as_bytes(row["caption"])) for row in rows]
    dataset = datasets.Dataset.from_list(binary_rows, features=features)
    inputs = build_eval_inputs(dataset, DataArguments(dataset_name="x", label_column=None, image_id_column=None,
                                                      positives_by="image"))
    assert inputs.num_skipped == 6 and len(inputs.images) == len(rows) - 6
    assert all(image.mode == "RGB" for image in inputs.images)
    assert inputs.issues.report() == expected
    # images whose captions were all unusable stay retrieval candidates; repaired captions are texts
    assert len(inputs.texts) == len(rows) - 6 - 3
    assert max(len(text) for text in inputs.texts) == DEFAULT_MAX_CAPTION_CHARS


def test_multi_image_collator_drops_hostile_images_from_items(tmp_path, caplog):
    from vlalign.data.multiview_digits import build_mivc_digits_processor

    processor = build_mivc_digits_processor(image_seq_length=4, image_size=16)
    (tmp_path / "empty.png").write_bytes(b"")
    good = {"bytes": digit_png(3), "path": None}
    rows = [
        {"images": [good, {"bytes": truncated_png(), "path": None}, {"bytes": cmyk_jpeg((0, 0, 0, 0)), "path": None},
                    {"bytes": png_claiming_size(30_000, 30_000), "path": None},
                    {"bytes": one_by_one_png(), "path": None}, {"bytes": rgba_png(), "path": None}],
         "prompt": "<image> which digit?", "answer": "three"},
        {"images": [str(tmp_path / "empty.png"), str(tmp_path / "missing.png")],  # nothing readable: skipped
         "prompt": "<image> which digit?", "answer": "four"},
        {"images": [good, {"bytes": gray16_png([0, 65535]), "path": None}], "prompt": "<image> which digit?",
         "answer": "five"},
    ]
    collator = MultiImageCollator(processor)
    with caplog.at_level(logging.WARNING, logger="vlalign.data"):
        batch = collator(rows)
    assert batch["pixel_values"].shape[:2] == (2, 4)  # the first item keeps 4 of its 6 images
    assert batch["image_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert collator.num_skipped_images == 4 and collator.num_skipped_items == 1
    assert collator.take_data_report("train_") == {
        "train_images_skipped": 4, "train_images_skipped_truncated": 1, "train_images_skipped_too_large": 1,
        "train_images_skipped_empty_file": 1, "train_images_skipped_file_not_found": 1}
    assert collator.num_skipped_images == 0  # counting afresh, e.g. for evaluation
    assert caplog.text.count("Skipped an undecodable image") == 1 and "[truncated]" in caplog.text  # rate-limited


# ---------------------------------------------------------------- end to end: a training run on hostile data


def write_split(path: Path, rows: list[dict], num_good: int, first_digit: int) -> None:
    """A parquet split: `num_good` real digit scans with byte captions, then `rows` (labels cycle 0..9)."""
    target = sklearn_digits().target
    good = [{"image": {"bytes": digit_png(first_digit + i), "path": None},
             "caption": f"a handwritten digit {DIGIT_NAMES[target[first_digit + i]]}".encode(),
             "label": int(target[first_digit + i])} for i in range(num_good)]
    hostile = [{"image": row["image"], "label": i % 10,
                "caption": as_bytes(row["caption"])} for i, row in enumerate(rows)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("binary"),
                                  "label": datasets.Value("int64")})
    # an explicit batch size: datasets would otherwise stat every image path (one is missing) to estimate it
    datasets.Dataset.from_list(good + hostile, features=features).to_parquet(str(path), batch_size=1000)


def test_training_run_on_hostile_data_completes_and_reports_counts(tmp_path, caplog):
    import train

    (tmp_path / "files").mkdir()
    rows, expected = hostile_rows(tmp_path / "files")
    eval_rows = [rows[0], rows[2], rows[3], rows[5], rows[13], rows[17]]  # 4 bad images, caption None / bad UTF-8
    write_split(tmp_path / "train.parquet", rows, num_good=48 - len(rows), first_digit=0)
    write_split(tmp_path / "test.parquet", eval_rows, num_good=10, first_digit=100)
    build_digits_processor(image_size=16).save_pretrained(tmp_path / "processor")
    config = {
        "model": TINY_TRAIN_MODEL,
        "data": {"dataset_name": "parquet", "cache_dir": str(tmp_path / "cache"), "image_id_column": None,
                 "data_files": {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")},
                 "class_names": DIGIT_NAMES, "zero_shot_templates": ["a handwritten digit {name}"]},
        # 48 rows, batch 16, 3 steps: every training row is read exactly once, so the counts are exact
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 16,
                     "learning_rate": 1e-3, "save_strategy": "no", "report_to": "none", "use_cpu": True,
                     "seed": 0},
        "run": {"processor_name_or_path": str(tmp_path / "processor"), "eval_batch_size": 32},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO):
        results = train.main(["--config", str(tmp_path / "config.yaml")])
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["train_steps"] == 3 and np.isfinite(saved["train_loss"])
    assert saved["train_items_skipped"] == 9
    assert {k: v for k, v in saved.items() if k.startswith(("train_images", "train_captions"))} == {
        f"train_{k}": v for k, v in expected.items()}
    assert {k: v for k, v in saved.items() if k.startswith(("eval_images", "eval_captions"))} == {
        "eval_images_skipped": 4, "eval_images_skipped_truncated": 1, "eval_images_skipped_empty_file": 1,
        "eval_images_skipped_corrupt": 1, "eval_images_skipped_too_large": 1, "eval_captions_skipped": 1,
        "eval_captions_skipped_missing": 1, "eval_captions_sanitised": 1, "eval_captions_sanitised_invalid_utf8": 1}
    assert saved["num_eval_images_skipped"] == 4 and saved["num_eval_images"] == 12
    assert results["train_images_skipped"] == 6
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data issues:")]
    assert summary == [(
        "Data issues: training: 6 images skipped (corrupt 1, empty_file 1, file_not_found 1, too_large 1, "
        "truncated 2), 3 captions skipped (empty 2, missing 1), 3 captions sanitised (control_chars 1, "
        "invalid_utf8 1, too_long 1); evaluation: 4 images skipped (corrupt 1, empty_file 1, too_large 1, "
        "truncated 1), 1 captions skipped (missing 1), 1 captions sanitised (invalid_utf8 1)")]


def test_mivc_run_on_items_with_hostile_images_counts_train_and_eval_apart(tmp_path):
    """A list-of-images parquet column is read undecoded, so a bad file drops one image, not the run; evaluation
    decodes with the training collator, and its skips are reported apart."""
    import train
    from test_train_script import TINY_MIVC

    from vlalign.data.multiview_digits import build_mivc_digits_processor

    (tmp_path / "empty.png").write_bytes(b"")
    good = [{"bytes": digit_png(i), "path": None} for i in range(10)]
    bad = {"truncated": {"bytes": truncated_png(), "path": None},
           "bomb": {"bytes": png_claiming_size(30_000, 30_000), "path": None},
           "empty": {"bytes": None, "path": str(tmp_path / "empty.png")},
           "missing": {"bytes": None, "path": str(tmp_path / "missing.png")},
           "corrupt": {"bytes": b"GIF89a but no more", "path": None}}
    odd = [{"bytes": data, "path": None} for data in (cmyk_jpeg((0, 0, 0, 255)), rgba_png(), one_by_one_png())]
    train_items = [[good[0], bad["truncated"], bad["bomb"]], [bad["empty"], bad["missing"]], odd,
                   *[[good[i], good[i + 1]] for i in range(1, 6)]]
    eval_items = [[good[6], bad["corrupt"]], [good[7]], [good[8], good[9]]]
    features = datasets.Features({"images": datasets.List(datasets.Image()), "prompt": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    for name, items in (("train", train_items), ("test", eval_items)):
        rows = [{"images": images, "prompt": "<image> which digit?", "answer": "one"} for images in items]
        datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / f"{name}.parquet"),
                                                                       batch_size=1000)
    build_mivc_digits_processor(image_seq_length=1, image_size=16).save_pretrained(tmp_path / "processor")
    config = {"model": TINY_MIVC,
              "data": {"dataset_name": "parquet", "data_files": {"train": str(tmp_path / "train.parquet"),
                                                                 "test": str(tmp_path / "test.parquet")}},
              "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 8,
                           "save_strategy": "no", "report_to": "none", "use_cpu": True},
              "run": {"processor_name_or_path": str(tmp_path / "processor")}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    train.main(["--config", str(tmp_path / "config.yaml")])
    saved = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert saved["train_steps"] == 1 and saved["num_eval_items"] == 3
    assert {k: v for k, v in saved.items() if "_skipped" in k} == {
        "train_images_skipped": 4, "train_images_skipped_truncated": 1, "train_images_skipped_too_large": 1,
        "train_images_skipped_empty_file": 1, "train_images_skipped_file_not_found": 1, "train_items_skipped": 1,
        "eval_images_skipped": 1, "eval_images_skipped_corrupt": 1, "train_nonfinite_steps_skipped": 0}
