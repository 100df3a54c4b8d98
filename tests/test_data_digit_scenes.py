"""vlalign.data.digit_scenes: captions that describe their image, new handwriting in evaluation, exact caption noise."""

import json

import datasets
import numpy as np
import pytest

from vlalign.data.digit_scenes import (
    SCENE_COLOURS,
    SCENE_QUADRANTS,
    build_digit_scenes_dataset,
    build_digit_scenes_processor,
    scene_caption,
    write_digit_scenes_imagefolder,
)

SIZES = {"train": 60, "validation": 10, "test": 20}


@pytest.fixture(scope="module")
def scenes():
    return build_digit_scenes_dataset(SIZES, seed=3)


def _parse(caption):
    """[(quadrant, size, colour, digit)] from a caption."""
    objects = []
    for part in caption.split(" and "):
        _, size, colour, digit, _, _, *where = part.split()
        objects.append((SCENE_QUADRANTS.index(" ".join(where)), size, colour, int(digit)))
    return objects


def test_caption_lists_objects_in_reading_order():
    caption = scene_caption([(3, "small", "blue", 7), (0, "large", "red", 3)])
    assert caption == "a large red 3 at the top left and a small blue 7 at the bottom right"
    assert _parse(caption) == [(0, "large", "red", 3), (3, "small", "blue", 7)]


def test_each_described_digit_is_drawn_in_its_quadrant_and_colour_only(scenes):
    for row in scenes["test"]:
        pixels = np.asarray(row["image"].convert("RGB"), dtype=np.float64)
        assert pixels.shape == (32, 32, 3)
        objects = _parse(row["caption"])
        inked = {q for q, *_ in objects}
        for quadrant in range(4):
            top, left = (quadrant // 2) * 16, (quadrant % 2) * 16
            block = pixels[top : top + 16, left : left + 16]
            darkness = 245 - block.mean(axis=2)
            if quadrant not in inked:
                assert darkness.max() < 1.0  # an empty quadrant is blank paper
                continue
            ((_, size, colour, _),) = [o for o in objects if o[0] == quadrant]
            # ink blends colour into paper (pixel = paper + a (colour - paper)): compare the directions of the change
            change = (block[darkness > 0.5 * darkness.max()] - 245.0).sum(axis=0)

            def cosine(name, change=change):
                direction = np.asarray(SCENE_COLOURS[name], dtype=np.float64) - 245.0
                return change @ direction / (np.linalg.norm(change) * np.linalg.norm(direction))

            nearest = max(SCENE_COLOURS, key=cosine)
            assert nearest == colour
            rows, cols = np.nonzero(darkness > 20)
            extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
            assert extent <= (10 if size == "small" else 16)


def test_splits_are_deterministic_ids_unique_and_captions_instance_level(scenes):
    again = build_digit_scenes_dataset(SIZES, seed=3)
    assert again["train"]["caption"] == scenes["train"]["caption"]
    assert build_digit_scenes_dataset(SIZES, seed=4)["train"]["caption"] != scenes["train"]["caption"]
    ids = [i for split in scenes.values() for i in split["image_id"]]
    assert len(ids) == len(set(ids)) == sum(SIZES.values())
    assert len(set(scenes["train"]["caption"])) >= 0.95 * SIZES["train"]


def test_evaluation_scenes_use_scans_never_seen_in_training():
    from vlalign.data import digit_scenes

    # the split of every scan index is fixed; the scenes of a split draw only from that split's scans
    assert digit_scenes._SPLIT_OF_SCAN == {0: "test", 5: "validation"}
    rng = np.random.default_rng(0)
    drawn = {}
    original = digit_scenes._render_scene

    def spy(objects, scans, rng_, canvas):
        drawn.setdefault(id(rng_), []).extend(s.tobytes() for s in scans)
        return original(objects, scans, rng_, canvas)

    digit_scenes._render_scene = spy
    try:
        build_digit_scenes_dataset({"train": 200, "test": 50}, seed=int(rng.integers(100)))
    finally:
        digit_scenes._render_scene = original
    train_scans, test_scans = list(drawn.values())
    assert not set(train_scans) & set(test_scans)


def test_noisy_fraction_swaps_exactly_that_share_of_training_captions_only():
    clean = build_digit_scenes_dataset(SIZES, seed=3)
    noisy = build_digit_scenes_dataset(SIZES, noisy_fraction=0.3, seed=3)
    train = noisy["train"]
    assert train["clean_caption"] == clean["train"]["caption"]  # same scenes whatever the noise
    swapped = [i for i, (a, b) in enumerate(zip(train["caption"], train["clean_caption"])) if a != b]
    assert len(swapped) == round(0.3 * SIZES["train"])
    # each wrong caption is another training image's true caption: a permutation of the chosen rows
    assert sorted(train["caption"][i] for i in swapped) == sorted(train["clean_caption"][i] for i in swapped)
    for split in ("validation", "test"):
        assert noisy[split]["caption"] == noisy[split]["clean_caption"] == clean[split]["caption"]


def test_bad_arguments_raise_value_error():
    for kwargs, match in (
        ({"noisy_fraction": 1.0}, "noisy_fraction"),
        ({"split_sizes": {"dev": 3}}, "unknown"),
        ({"split_sizes": {"train": 0}}, "positive"),
        ({"canvas": 31}, "canvas"),
    ):
        with pytest.raises(ValueError, match=match):
            build_digit_scenes_dataset(**kwargs)


def test_processor_keeps_captions_true_and_tokenises_every_scene_word(scenes):
    processor = build_digit_scenes_processor()
    augmentation = processor.augmentation
    assert augmentation["hflip_p"] == augmentation["color_jitter_p"] == augmentation["grayscale_p"] == 0.0
    unk = processor.tokenizer.unk_token_id
    for caption in scenes["train"]["caption"]:
        ids = processor.tokenizer(caption)["input_ids"]
        assert unk not in ids and len(ids) <= processor.max_length


def test_written_image_folder_loads_back_with_load_dataset(tmp_path):
    from transformers import AutoProcessor

    folder = write_digit_scenes_imagefolder(tmp_path / "scenes", split_sizes={"train": 8, "test": 4}, seed=1)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder))
    expected = build_digit_scenes_dataset({"train": 8, "test": 4}, seed=1)
    for split in ("train", "test"):
        assert loaded[split]["caption"] == expected[split]["caption"]
        assert loaded[split]["image_id"] == expected[split]["image_id"]
        first = np.asarray(loaded[split][0]["image"].convert("RGB"))
        assert np.array_equal(first, np.asarray(expected[split][0]["image"].convert("RGB")))
    processor = AutoProcessor.from_pretrained(str(folder / "processor"))
    assert processor.max_length == 24 and processor.augmentation["hflip_p"] == 0.0
    lines = (folder / "train" / "metadata.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["file_name"] == f"{expected['train'][0]['image_id']:07d}.png"
