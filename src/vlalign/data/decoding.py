"""Hostile data: image decoding (size limits before decoding, truncated and special files refused, EXIF orientation,
colour modes through `processing_vlalign.to_rgb`), caption sanitising, and the counts of what was refused or
repaired, by reason."""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..processing_vlalign import to_rgb

__all__ = [
    "CAPTION_FIX_REASONS",
    "CAPTION_SKIP_REASONS",
    "DEFAULT_MAX_CAPTION_CHARS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_SKIP_REASONS",
    "DataIssueCounts",
    "ImageDecodeError",
    "decode_image",
    "image_skip_reason",
    "sanitise_caption",
]

# PIL's own warning threshold (about 9459 x 9459 pixels, 256 MiB as RGB). PIL refuses at twice its
# `Image.MAX_IMAGE_PIXELS` by itself; our limit is checked first and can only be stricter than that.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Far above any tokenizer's max_length in characters, yet cheap: a 1 MB caption is cut before tokenising.
DEFAULT_MAX_CAPTION_CHARS = 4096

IMAGE_SKIP_REASONS = (
    "missing",  # no image in the cell (None, or a dict with neither bytes nor path)
    "empty_file",  # zero bytes
    "file_not_found",  # a path that does not exist
    "unreadable_file",  # a path that cannot be opened or read (no permission, ...) or is not a regular file (a
    # directory, FIFO or device: refused before opening, where a FIFO would block)
    "too_large",  # more pixels than max_image_pixels: refused before decoding (decompression bombs)
    "truncated",  # the pixel data ends early: refused rather than half-decoded
    "corrupt",  # not an image PIL can identify, or broken data inside
    "unsupported",  # a value that is no kind of image (a number, an array that is not an image, ...)
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
    faithfully (see `processing_vlalign.to_rgb`).

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


_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


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
    """A loaded image turned upright (EXIF) and converted by `to_rgb`, the one RGB conversion that processor inputs
    also go through, as an image of its own."""
    rgb = to_rgb(_exif_upright(image))
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
    # printable text (most captions) holds neither control characters nor surrogates: one C-level check
    if not value.isprintable():
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
        return {
            "images_skipped_by_reason": dict(self.images_skipped_by_reason),
            "captions_skipped_by_reason": dict(self.captions_skipped_by_reason),
            "captions_sanitised_by_reason": dict(self.captions_sanitised_by_reason),
            "captions_sanitised": self.captions_sanitised,
        }

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
