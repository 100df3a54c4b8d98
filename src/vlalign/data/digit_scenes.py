"""Digit scenes: an instance-level image-caption dataset built offline from real handwritten scans.

Every image is a small scene of two real scikit-learn digit scans, each in its own quadrant of the canvas, with
its own size and ink colour, and one caption that says all of it:

    "a large red 3 at the top left and a small blue 7 at the bottom right"

Unlike the digits demo (ten classes, captions that only name the class) each caption describes one image, so
retrieval must get the digits, their places, sizes and colours right together: the fine-grained alignment that
TCL's local mutual information and ALBEF's image-text matching are meant to help with. With 6 quadrant pairs,
10 x 10 digits, 4 x 4 colours and 2 x 2 sizes there are 38,400 distinct captions, so two random scenes almost never
share one.

Scans are split like the demo so that evaluation images are new handwriting: scans with `index % 10 == 0` are
drawn for "test", `index % 10 == 5` for "validation", the rest for "train". `noisy_fraction` swaps that fraction
of the *training* captions for another training image's caption (a random permutation of the chosen rows with
no fixed point), the noisy-pairs setting of web-scale image-text data; validation and test stay clean.

`python -m vlalign.data.digit_scenes OUT [--noisy_fraction 0.3]` writes the splits as an image folder
(`OUT/<split>/*.png` + `metadata.jsonl` with `file_name`, `caption`, `image_id`) that `datasets.load_dataset(
"imagefolder", data_dir=OUT)` reads, plus the matching processor (tokenizer + mild, caption-preserving augmentation)
in `OUT/processor`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..processing_vlalign import DEFAULT_AUGMENTATION, VLAlignProcessor
from .digits import build_digits_tokenizer

__all__ = [
    "SCENE_COLOURS",
    "SCENE_QUADRANTS",
    "SCENE_SIZES",
    "build_digit_scenes_dataset",
    "build_digit_scenes_processor",
    "scene_caption",
    "write_digit_scenes_imagefolder",
]

SCENE_QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SCENE_COLOURS = {"red": (200, 30, 30), "green": (20, 140, 40), "blue": (30, 60, 210), "black": (20, 20, 20)}
SCENE_SIZES = {"small": 10, "large": 16}  # edge in pixels of a 32 x 32 canvas (a quadrant is 16 x 16)
_PAPER = 245
_SPLIT_OF_SCAN = {0: "test", 5: "validation"}  # index % 10 -> split; every other scan is for "train"
DEFAULT_SPLIT_SIZES = {"train": 4000, "validation": 400, "test": 500}


def scene_caption(objects: list[tuple[int, str, str, int]]) -> str:
    """Caption of a scene from its objects (quadrant index, size name, colour name, digit), top left first."""
    parts = [
        f"a {size} {colour} {digit} at the {SCENE_QUADRANTS[quadrant]}"
        for quadrant, size, colour, digit in sorted(objects)
    ]
    return " and ".join(parts)


def _render_scene(objects, scans: np.ndarray, rng: np.random.Generator, canvas: int) -> Image.Image:
    """Paste each scan (8x8, ink 0..16) into its quadrant, resized to its size, as coloured ink on paper."""
    image = np.full((canvas, canvas, 3), float(_PAPER))
    half = canvas // 2
    for (quadrant, size, colour, _), scan in zip(objects, scans):
        edge = max(2, round(SCENE_SIZES[size] * canvas / 32))
        ink = Image.fromarray(np.clip(scan.reshape(8, 8) * (255.0 / 16.0), 0, 255).astype(np.uint8))
        alpha = np.asarray(ink.resize((edge, edge), resample=Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
        # a small random offset inside the quadrant: where a digit sits is never identical twice
        top = (quadrant // 2) * half + int(rng.integers(0, half - edge + 1))
        left = (quadrant % 2) * half + int(rng.integers(0, half - edge + 1))
        region = image[top : top + edge, left : left + edge]
        colour_rgb = np.asarray(SCENE_COLOURS[colour], dtype=np.float64)
        image[top : top + edge, left : left + edge] = region * (1 - alpha[..., None]) + colour_rgb * alpha[..., None]
    return Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _swap_captions(captions: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
    """Give `fraction` of the rows another chosen row's caption (a cyclic shift of the chosen rows: no fixed point)."""
    count = int(round(fraction * len(captions)))
    if count < 2:
        return list(captions)
    chosen = rng.choice(len(captions), size=count, replace=False)
    swapped = list(captions)
    for row, source in zip(chosen, np.roll(chosen, 1)):
        swapped[row] = captions[source]
    return swapped


def build_digit_scenes_dataset(
    split_sizes: dict[str, int] | None = None,
    noisy_fraction: float = 0.0,
    seed: int = 0,
    canvas: int = 32,
) -> datasets.DatasetDict:
    """The digit scenes as a DatasetDict (`image` PNG, `caption` str, `image_id` int64, `clean_caption` str).

    `split_sizes` maps "train" / "validation" / "test" to a number of scenes (default `DEFAULT_SPLIT_SIZES`);
    `noisy_fraction` in [0, 1) of the training captions are swapped (see the module docstring); `clean_caption`
    keeps the true caption of every row. The same `seed` gives the same scenes whatever the noise.
    """
    sizes = dict(DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
    unknown = sorted(set(sizes) - set(DEFAULT_SPLIT_SIZES))
    if unknown:
        raise ValueError(f"split_sizes has unknown splits {unknown}; valid: {sorted(DEFAULT_SPLIT_SIZES)}")
    for split, count in sizes.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"split_sizes[{split!r}] must be a positive int, got {count!r}")
    if not 0.0 <= float(noisy_fraction) < 1.0:
        raise ValueError(f"noisy_fraction must lie in [0, 1), got {noisy_fraction!r}")
    if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas < 8 or canvas % 2:
        raise ValueError(f"canvas must be an even int >= 8, got {canvas!r}")

    from sklearn.datasets import load_digits  # ships its data with the wheel: no download

    digits = load_digits()
    scan_rows = {split: [] for split in DEFAULT_SPLIT_SIZES}
    for index in range(len(digits.target)):
        scan_rows[_SPLIT_OF_SCAN.get(index % 10, "train")].append(index)
    by_digit = {
        split: {d: [i for i in rows if digits.target[i] == d] for d in range(10)} for split, rows in scan_rows.items()
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "image_id": datasets.Value("int64"),
            "clean_caption": datasets.Value("string"),
        }
    )
    colours, size_names = list(SCENE_COLOURS), list(SCENE_SIZES)
    result = {}
    for split_index, (split, count) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, split_index])
        images, captions = [], []
        for _ in range(count):
            quadrants = sorted(rng.choice(4, size=2, replace=False).tolist())
            objects, scans = [], []
            for quadrant in quadrants:
                digit = int(rng.integers(10))
                objects.append((quadrant, size_names[rng.integers(2)], colours[rng.integers(4)], digit))
                scans.append(digits.data[by_digit[split][digit][rng.integers(len(by_digit[split][digit]))]])
            images.append({"bytes": _png(_render_scene(objects, scans, rng, canvas)), "path": None})
            captions.append(scene_caption(objects))
        offset = 1_000_000 * split_index  # ids unique over splits
        noisy = captions
        if split == "train" and noisy_fraction > 0:
            noisy = _swap_captions(captions, float(noisy_fraction), np.random.default_rng([seed, 99]))
        result[split] = datasets.Dataset.from_dict(
            {
                "image": images,
                "caption": noisy,
                "image_id": [offset + i for i in range(count)],
                "clean_caption": captions,
            },
            features=features,
        )
    return datasets.DatasetDict(result)


def build_digit_scenes_processor(image_size: int = 32) -> VLAlignProcessor:
    """Processor for the scenes: the digits tokenizer plus the scene words, max_length 24, and an augmentation
    that keeps every caption true (no flip, no colour jitter or grayscale, crops of 80-100% that keep quadrants)."""
    from transformers import ViTImageProcessorPil

    words = [w for name in list(SCENE_COLOURS) + list(SCENE_SIZES) + list(SCENE_QUADRANTS) for w in name.split()]
    augmentation = dict(
        DEFAULT_AUGMENTATION,
        hflip_p=0.0,
        color_jitter_p=0.0,
        grayscale_p=0.0,
        crop_scale=[0.8, 1.0],
        crop_ratio=[0.9, 1.1],
    )
    return VLAlignProcessor(
        image_processor=ViTImageProcessorPil(
            size={"height": int(image_size), "width": int(image_size)},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_resize=True,
        ),
        tokenizer=build_digits_tokenizer(extra_words=words + ["at", "and", "the", "a"]),
        augmentation=augmentation,
        max_length=24,
    )


def write_digit_scenes_imagefolder(output_dir: str | os.PathLike, **dataset_kwargs) -> Path:
    """Write `build_digit_scenes_dataset(**dataset_kwargs)` as an image folder plus `processor/`; returns the path."""
    output = Path(output_dir)
    scenes = build_digit_scenes_dataset(**dataset_kwargs)
    for split, dataset in scenes.items():
        folder = output / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as metadata:
            for row in dataset.cast_column("image", datasets.Image(decode=False)):
                name = f"{row['image_id']:07d}.png"
                (folder / name).write_bytes(row["image"]["bytes"])
                metadata.write(
                    json.dumps({"file_name": name, "caption": row["caption"], "image_id": row["image_id"]}) + "\n"
                )
    build_digit_scenes_processor().save_pretrained(str(output / "processor"))
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the digit scenes as an image folder (see the module doc).")
    parser.add_argument("output_dir")
    parser.add_argument("--noisy_fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    for split, count in DEFAULT_SPLIT_SIZES.items():
        parser.add_argument(f"--{split}_size", type=int, default=count)
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, f"{split}_size") for split in DEFAULT_SPLIT_SIZES}
    path = write_digit_scenes_imagefolder(
        args.output_dir, split_sizes=sizes, noisy_fraction=args.noisy_fraction, seed=args.seed
    )
    print(f"wrote {sum(sizes.values())} scenes ({sizes}) and the processor to {path}")


if __name__ == "__main__":
    main()
