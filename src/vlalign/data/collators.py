"""Collators: dataset rows -> training batches, skipping (and counting, by reason) rows that cannot be used, with the
state a training checkpoint keeps so that a resumed run collates and counts exactly what an uninterrupted one does.

Positives for the contrastive losses are expressed as integer `positive_ids`: items with equal ids are positives
(same label for labelled data such as digits, otherwise the same image).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..processing_vlalign import VLAlignProcessor
from .decoding import (
    DEFAULT_MAX_CAPTION_CHARS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DataIssueCounts,
    _check_positive_int,
    _preview,
    _time_to_warn,
    _usable_captions,
    decode_image,
)
from .sources import ROW_ID_COLUMN, DataArguments, MIVCDataArguments

__all__ = ["ImageTextCollator", "MultiImageCollator", "ResumableCollator"]

logger = logging.getLogger("vlalign.data")


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

    Output (all tensors unless noted): `pixel_values` (augmented unless `augment=False`), `pixel_values_view2` (a
    second augmentation, if `two_views`: train.py sets it from the model's `training_views`, since a second view
    that nothing uses doubles the collation work), `input_ids`,
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
        augment: bool = True,
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
        if two_views and not augment:
            raise ValueError("two_views=True needs augment=True (the second view is a second augmentation)")
        self.two_views = two_views
        self.augment = augment
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
        return {
            "num_refilled": self.num_refilled,
            "num_skipped_captions": self.num_skipped_captions,
            "issues": self.issues.state_dict(),
        }

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
                logger.warning(
                    "Skipped a row without a usable caption (%d so far): %s", self.num_skipped_captions, _preview(cell)
                )
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
            images=images,
            text=captions,
            two_views=self.two_views,
            augment=self.augment,
            rng=augment_rng,
            return_tensors="pt",
        )
        batch: dict[str, Any] = dict(encoded)
        batch["positive_ids"] = torch.tensor(ids, dtype=torch.long)
        if all(index is not None for index in rows_index):
            batch["sample_ids"] = torch.tensor(rows_index, dtype=torch.long)  # dataset row of each item
        batch["return_loss"] = True
        batch["num_skipped"] = skipped
        return batch


class MultiImageCollator(ResumableCollator):
    """Rows of multi-image items -> an `MIVCProcessor` training batch (prompt + answer, labels on the answer).

    Undecodable images (see `decode_image`; more than `max_image_pixels` pixels: refused before decoding) are
    dropped from their item, and an item left without images is skipped; every skip is counted
    (`num_skipped_images`, by reason in `issues`; `num_skipped_items`) and warned about (the first and every
    `log_every`-th). A bad image or item does not stop training, but a batch in which *no* item has a readable image
    raises RuntimeError: there is nothing to train on (usually a wrong images column, or missing files).
    """

    def __init__(
        self,
        processor,
        images_column: str = "images",
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        log_every: int = 100,
    ):
        _check_positive_int("max_image_pixels", max_image_pixels)
        _check_positive_int("log_every", log_every)
        self.processor = processor
        self.images_column, self.prompt_column, self.answer_column = images_column, prompt_column, answer_column
        self.max_image_pixels = max_image_pixels
        self.log_every = log_every
        self.issues = DataIssueCounts()
        self.num_skipped_items = 0

    @classmethod
    def from_data_args(cls, processor, args: MIVCDataArguments, **kwargs) -> MultiImageCollator:
        """Collator wired to the columns of `args`."""
        return cls(
            processor,
            args.images_column,
            args.prompt_column,
            args.answer_column,
            max_image_pixels=args.max_image_pixels,
            **kwargs,
        )

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
                    logger.warning(
                        "Skipped an undecodable image in a multi-image item (%d so far) [%s]: %s",
                        self.num_skipped_images,
                        reason,
                        error,
                    )
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
