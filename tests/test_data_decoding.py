"""vlalign.data.decoding: decode_image takes every form a dataset cell arrives in and applies the EXIF orientation;
hostile files (corrupt, truncated, empty, FIFOs and devices, decompression bombs) are refused with their reason,
unusual colour modes (CMYK, transparency, 16-bit, 1-bit, 1x1) converted faithfully; captions are sanitised or
dropped with reasons; DataIssueCounts reports the counts by reason."""

import io
import os
import threading
import time
import warnings

import datasets
import numpy as np
import pytest
import torch
from fixtures import (
    cmyk_jpeg,
    corrupt_values,
    encode,
    gray16_png,
    la_png,
    noise_image,
    one_bit_png,
    one_by_one_png,
    palette_png_with_transparency,
    png_bytes,
    png_claiming_size,
    rgba_png,
    truncated_jpeg,
    truncated_png,
)
from PIL import Image, ImageFile

from vlalign.data import (
    CAPTION_FIX_REASONS,
    CAPTION_SKIP_REASONS,
    DEFAULT_MAX_CAPTION_CHARS,
    IMAGE_SKIP_REASONS,
    DataIssueCounts,
    ImageDecodeError,
    decode_image,
    sanitise_caption,
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
    np.testing.assert_array_equal(
        np.asarray(datasets.Image().decode_example({"bytes": data, "path": None}).convert("RGB")), upright
    )
    np.testing.assert_array_equal(np.asarray(load_image(str(path))), upright)
    for value in (
        data,
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
        str(path),
        path,
        Image.open(io.BytesIO(data)),
    ):
        image = decode_image(value)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), upright)


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


# ---------------------------------------------------------------- hostile images (fixtures.py builds the files)


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


@pytest.mark.parametrize(
    "width, height, limit",
    [
        (30_000, 30_000, None),  # beyond PIL's own guard: its DecompressionBombError, reported as too_large
        (30_000, 30_000, 89_478_485),
        (10_000, 10_000, 89_478_485),  # between PIL's warning and error thresholds: our limit refuses it
        (2_000, 2_000, 1_000_000),  # a configured limit far below PIL's
    ],
)
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


@pytest.mark.parametrize(
    "cmyk, expected",
    [
        ((0, 0, 0, 0), (255, 255, 255)),  # no ink: paper white
        ((0, 0, 0, 255), (0, 0, 0)),  # full black ink
        ((255, 0, 0, 0), (0, 255, 255)),  # cyan
        ((0, 255, 255, 0), (255, 0, 0)),  # magenta + yellow = red
    ],
)
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


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00garbage garbage",  # not TIFF data: PIL raises SyntaxError on reading it
        b"Exif\x00\x00MM\x00\x2a\x00\x00",  # cut inside the header: struct.error
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00"
        b"\x00\x00\x00\x00\x00\x00",  # a well-formed tag with orientation 9 (no such one)
    ],
)
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
    out = digits_processor_16(
        images=[tiny, tiny], text=["a", "b"], two_views=True, rng=np.random.default_rng(0), return_tensors="pt"
    )
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


def test_the_printable_shortcut_skips_no_repair():
    """`sanitise_caption` looks for control characters and surrogates only in text that is not printable: every
    code point either repair acts on is non-printable, so the shortcut never lets one through."""
    from vlalign.data.decoding import _CONTROL_CHARS, _SURROGATES

    acted_on = [c for c in map(chr, range(0x110000)) if _CONTROL_CHARS.match(c) or _SURROGATES.match(c)]
    assert len(acted_on) == 0x09 + 0x12 + 0x21 + 0x800
    assert not any(c.isprintable() for c in acted_on)


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
    assert issues.report("train_") == {
        "train_images_skipped": 0,
        "train_captions_skipped": 0,
        "train_captions_sanitised": 0,
    }
    for error in (ImageDecodeError("corrupt", "x"), OSError("broken data stream"), ImageDecodeError("too_large", "y")):
        issues.count_image_refusal(error)
    issues.count_caption(None, ("empty",))
    issues.count_caption("ok", ("too_long", "control_chars"))
    issues.count_caption("ok", ())
    assert issues.report() == {
        "images_skipped": 3,
        "images_skipped_corrupt": 2,
        "images_skipped_too_large": 1,
        "captions_skipped": 1,
        "captions_skipped_empty": 1,
        "captions_sanitised": 1,
        "captions_sanitised_control_chars": 1,
        "captions_sanitised_too_long": 1,
    }
    assert issues.summary() == (
        "3 images skipped (corrupt 2, too_large 1), 1 captions skipped (empty 1), "
        "1 captions sanitised (control_chars 1, too_long 1)"
    )
