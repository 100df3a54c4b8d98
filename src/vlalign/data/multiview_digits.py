"""Multi-view handwritten digits: the demo task of MIVC (several images of one item, fused order-invariantly).

Each item is 2-5 *different* real scikit-learn scans of the same digit; about half of them are degraded (heavy
noise or a large occluder) but at least one stays clean, and the target text names the digit. A model that
looks at one image at a time is often misled by a degraded view; one that pools all views (and learns to weight
the informative ones) can recover the digit from the clean scan(s).

Degradations are applied to the 8x8 scan (sklearn ink scale 0..16, 16 = ink) *before* rendering, so the noise
and the occluder live at the digit's own resolution (noise at the rendered resolution would be partly averaged
away by any classifier looking at many pixels per scan cell). The degraded scan is then rendered exactly like
the single-image demo (`digits._digit_to_png`: inverted to dark ink on light paper, bicubic resize to `image_size`)
and converted to RGB.

- "noise": the scan is faded halfway towards mid-grey (ink 8) and Gaussian noise with a std drawn uniformly
  in [0.6, 0.8] of the intensity range (i.e. 9.6-12.8 ink units) is added, then clipped to 0..16.
- "occlusion": an axis-aligned rectangle covering 50-65% of the scan (4x8, 8x4, 5x7, 7x5, 6x6, 5x8 or 8x5
  cells of 8x8) at a random position is filled with a uniform value between mid-grey and black (ink 8..16).

On the 8x8 scans a nearest-centroid classifier fitted on clean training scans gets ~88% of clean test scans
right, but only ~30% of the noisy and ~30% of the occluded ones (chance: 10%).
"""

from __future__ import annotations

import io
import math
from numbers import Integral, Real

import datasets
import numpy as np
from PIL import Image

from ..processing_vlalign import MIVCProcessor
from .digits import DIGIT_NAMES, _digit_to_png, build_digits_tokenizer

__all__ = [
    "DEGRADATION_KINDS",
    "MIVC_DIGITS_PROMPT",
    "build_mivc_digits_processor",
    "build_multiview_digits_dataset",
    "multiview_digits_features",
]

MIVC_DIGITS_PROMPT = "<image> Which digit do these scans show?"  # one image placeholder per item

DEGRADATION_KINDS = ("clean", "noise", "occlusion")

_SPLITS = ("train", "test")
_INK_MAX = 16.0
_NOISE_FADE = 0.5  # contrast kept before noise is added (0.5: halfway to mid-grey)
_NOISE_STD_RANGE = (0.6, 0.8)  # fraction of the intensity range
# Occluder sizes (rows, cols) on the 8x8 scan covering 50-65% of its 64 cells.
_OCCLUDER_SHAPES = ((4, 8), (8, 4), (5, 7), (7, 5), (6, 6), (5, 8), (8, 5))
_OCCLUDER_FILL_RANGE = (8.0, 16.0)  # mid-grey .. black in ink units


def multiview_digits_features() -> datasets.Features:
    """The features of every split of `build_multiview_digits_dataset`."""
    return datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "degraded": datasets.List(datasets.Value("bool")),
            "degradation": datasets.List(datasets.Value("string")),
            "scan_indices": datasets.List(datasets.Value("int64")),
            "label": datasets.ClassLabel(names=DIGIT_NAMES),
            "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "num_images": datasets.Value("int64"),
        }
    )


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _add_noise(scan: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    std = rng.uniform(*_NOISE_STD_RANGE) * _INK_MAX
    faded = _INK_MAX / 2 + _NOISE_FADE * (scan - _INK_MAX / 2)
    return np.clip(faded + rng.normal(0.0, std, size=scan.shape), 0.0, _INK_MAX)


def _occlude(scan: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rows, cols = _OCCLUDER_SHAPES[int(rng.integers(len(_OCCLUDER_SHAPES)))]
    top = int(rng.integers(0, 8 - rows + 1))
    left = int(rng.integers(0, 8 - cols + 1))
    out = scan.reshape(8, 8).copy()
    out[top : top + rows, left : left + cols] = rng.uniform(*_OCCLUDER_FILL_RANGE)
    return out.reshape(-1)


def _rgb_png(pixels: np.ndarray, image_size: int) -> bytes:
    """Render like the single-image demo (`_digit_to_png`), stored as RGB PNG bytes."""
    with Image.open(io.BytesIO(_digit_to_png(pixels, image_size))) as gray:
        rgb = gray.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", compress_level=1)  # lossless; fast for large image_size
    return buffer.getvalue()


def _build_split(
    scans: np.ndarray,
    pool: list[np.ndarray],
    num_items: int,
    image_size: int,
    min_images: int,
    max_images: int,
    degraded_fraction: float,
    rng: np.random.Generator,
    clean_cache: dict[int, bytes],
) -> dict[str, list]:
    columns: dict[str, list] = {name: [] for name in multiview_digits_features()}
    for _ in range(num_items):
        label = int(rng.integers(10))
        k = int(rng.integers(min_images, max_images + 1))
        indices = rng.choice(pool[label], size=k, replace=False)  # random order, all distinct
        num_degraded = min(round(k * degraded_fraction), k - 1)  # Python round: half to even
        degraded_positions = set(rng.choice(k, size=num_degraded, replace=False).tolist())
        images, degraded, kinds = [], [], []
        for position, index in enumerate(indices.tolist()):
            if position in degraded_positions:
                kind = DEGRADATION_KINDS[1 + int(rng.integers(2))]
                pixels = _add_noise(scans[index], rng) if kind == "noise" else _occlude(scans[index], rng)
                png = _rgb_png(pixels, image_size)
            else:
                kind = "clean"
                if index not in clean_cache:
                    clean_cache[index] = _rgb_png(scans[index], image_size)
                png = clean_cache[index]
            images.append({"bytes": png, "path": None})
            degraded.append(kind != "clean")
            kinds.append(kind)
        columns["images"].append(images)
        columns["degraded"].append(degraded)
        columns["degradation"].append(kinds)
        columns["scan_indices"].append([int(i) for i in indices])
        columns["label"].append(label)
        columns["prompt"].append(MIVC_DIGITS_PROMPT)
        columns["answer"].append(DIGIT_NAMES[label])
        columns["num_images"].append(k)
    return columns


def build_multiview_digits_dataset(
    image_size: int = 32,
    num_train_items: int = 2000,
    num_test_items: int = 400,
    min_images: int = 2,
    max_images: int = 5,
    degraded_fraction: float = 0.5,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Multi-view digits task of MIVC, built in memory from scikit-learn's 1797 real 8x8 digits.

    Splits "train" and "test". The underlying scans are split as in the single-image demo (sklearn index
    `% 5 == 0` -> test, else train) and an item only uses its split's scans, so no test scan is seen in training.

    Each item: a digit drawn uniformly; `k` uniform in [min_images, max_images]; `k` distinct scans of that digit
    from the split (without replacement, random order); `min(round(k * degraded_fraction), k - 1)` of them
    (Python `round`, half to even, so with 0.5 exactly half of all images are degraded on average when k is
    uniform in 2..5) at random positions are degraded, each by "noise" or "occlusion" with equal probability
    (see the module docstring: applied to the 8x8 scan before rendering). At least one image per item is clean.

    Columns:
        images        List(Image()) - RGB PIL images, `image_size` x `image_size`, dark ink on light paper
        degraded      List(Value("bool")) - aligned with `images`
        degradation   List(Value("string")) - "clean", "noise" or "occlusion", aligned with `images`
        scan_indices  List(Value("int64")) - sklearn index of each image's scan (for checks; not a model input)
        label         ClassLabel(names=DIGIT_NAMES) - the digit (an int)
        prompt        Value("string") - `MIVC_DIGITS_PROMPT` (one "<image>" placeholder for the whole item)
        answer        Value("string") - the digit's name, e.g. "seven"
        num_images    Value("int64") - `len(images)`

    Deterministic for a given `seed`; train and test draw from independent streams of it, so the test items do
    not change with `num_train_items` (and vice versa). Nothing is cached on disk.
    """
    image_size = _check_int("image_size", image_size, 1)
    num_train_items = _check_int("num_train_items", num_train_items, 1)
    num_test_items = _check_int("num_test_items", num_test_items, 1)
    min_images = _check_int("min_images", min_images, 1)
    max_images = _check_int("max_images", max_images, 1)
    if max_images < min_images:
        raise ValueError(f"max_images must be >= min_images ({min_images}), got {max_images}")
    if isinstance(degraded_fraction, bool) or not isinstance(degraded_fraction, Real):
        raise ValueError(f"degraded_fraction must be a number, got {degraded_fraction!r}")
    degraded_fraction = float(degraded_fraction)
    if not (math.isfinite(degraded_fraction) and 0.0 <= degraded_fraction < 1.0):
        raise ValueError(f"degraded_fraction must be in [0, 1), got {degraded_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")

    # scikit-learn ships the digits with the wheel: no download.
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = np.asarray(digits.data, dtype=np.float64)
    targets = np.asarray(digits.target, dtype=np.int64)
    index = np.arange(len(targets))
    split_of = {"test": index % 5 == 0, "train": index % 5 != 0}
    pools = {split: [index[split_of[split] & (targets == c)] for c in range(10)] for split in _SPLITS}
    rarest_test = min(len(p) for p in pools["test"])
    if max_images > rarest_test:
        raise ValueError(
            f"max_images must be <= {rarest_test} (scans of the rarest digit in the test split), got {max_images}"
        )

    train_seq, test_seq = np.random.SeedSequence(int(seed)).spawn(2)
    rngs = {"train": np.random.default_rng(train_seq), "test": np.random.default_rng(test_seq)}
    counts = {"train": num_train_items, "test": num_test_items}
    features = multiview_digits_features()
    clean_cache: dict[int, bytes] = {}
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                _build_split(
                    scans,
                    pools[split],
                    counts[split],
                    image_size,
                    min_images,
                    max_images,
                    degraded_fraction,
                    rngs[split],
                    clean_cache,
                ),
                features=features,
            )
            for split in _SPLITS
        }
    )


def build_mivc_digits_processor(image_seq_length: int, image_size: int = 32, concatenate_images: bool = False):
    """`MIVCProcessor` for the multi-view digits demo: the offline digits tokenizer plus an `<image>` placeholder,
    [CLS] as BOS and [SEP] as EOS, and a PIL ViT image processor (mean/std 0.5)."""
    from transformers import ViTImageProcessorPil

    tokenizer = build_digits_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "bos_token": "[CLS]", "eos_token": "[SEP]"})
    image_processor = ViTImageProcessorPil(
        size={"height": int(image_size), "width": int(image_size)},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return MIVCProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        image_token="<image>",
        concatenate_images=concatenate_images,
    )
