"""vlalign.data.multiview_digits: the multi-view digits demo of MIVC (several scans of one digit, about half
degraded): structure, scans and splits, degradation, determinism, argument validation."""

import io

import datasets
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from vlalign.data.digits import DIGIT_NAMES, _digit_to_png
from vlalign.data.multiview_digits import MIVC_DIGITS_PROMPT, build_multiview_digits_dataset

SIZE = 16


@pytest.fixture(scope="module")
def sk_digits():
    return load_digits()


@pytest.fixture(scope="module")
def mv():
    return build_multiview_digits_dataset(image_size=SIZE, num_train_items=400, num_test_items=300, seed=0)


def _image_bytes(split: datasets.Dataset) -> list[list[bytes]]:
    raw = split.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return [[image["bytes"] for image in row] for row in list(raw["images"])]


def _ink(image: Image.Image) -> np.ndarray:
    return 255.0 - np.asarray(image.convert("L"), dtype=np.float64).reshape(-1)


# ---------------------------------------------------------------- structure


def test_columns_features_and_row_consistency(mv):
    assert set(mv) == {"train", "test"}
    assert len(mv["train"]) == 400 and len(mv["test"]) == 300
    features = mv["train"].features
    assert features["images"] == datasets.List(datasets.Image())
    assert features["degraded"] == datasets.List(datasets.Value("bool"))
    assert features["scan_indices"] == datasets.List(datasets.Value("int64"))
    assert features["label"].names == DIGIT_NAMES
    assert features["prompt"] == datasets.Value("string") and features["answer"] == datasets.Value("string")
    assert features["num_images"] == datasets.Value("int64")
    for split in mv.values():
        assert split.features == features
        for row in split.select(range(20)):
            k = row["num_images"]
            assert (
                len(row["images"]) == len(row["degraded"]) == len(row["degradation"]) == len(row["scan_indices"]) == k
            )
            assert row["prompt"] == MIVC_DIGITS_PROMPT and row["prompt"].count("<image>") == 1
            assert row["answer"] == DIGIT_NAMES[row["label"]]
            for image in row["images"]:
                assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (SIZE, SIZE)
    for split in mv.values():  # answers for all rows, cheaply (no image decoding)
        assert [DIGIT_NAMES[label] for label in split["label"]] == list(split["answer"])


def test_image_counts_in_range_and_all_counts_used(mv):
    for split in mv.values():
        counts = np.array(list(split["num_images"]))
        assert counts.min() >= 2 and counts.max() <= 5
        assert set(counts.tolist()) == {2, 3, 4, 5}
    small = build_multiview_digits_dataset(
        image_size=8, num_train_items=50, num_test_items=20, min_images=3, max_images=3
    )
    assert set(small["train"]["num_images"]) == {3} and set(small["test"]["num_images"]) == {3}


def test_labels_cover_all_digits(mv):
    counts = np.bincount(list(mv["train"]["label"]), minlength=10)
    assert counts.min() > 15  # uniform over 10 digits, 400 items


# ---------------------------------------------------------------- scans and splits


def test_splits_use_disjoint_scans_by_index_mod_5(mv):
    train = {i for row in list(mv["train"]["scan_indices"]) for i in row}
    test = {i for row in list(mv["test"]["scan_indices"]) for i in row}
    assert all(i % 5 != 0 for i in train)
    assert all(i % 5 == 0 for i in test)
    assert not train & test
    assert min(train | test) >= 0 and max(train | test) < 1797


def test_scans_in_an_item_are_distinct_and_of_the_labelled_digit(mv, sk_digits):
    for split in mv.values():
        for label, indices in zip(list(split["label"]), list(split["scan_indices"])):
            assert len(set(indices)) == len(indices)
            assert all(int(sk_digits.target[i]) == label for i in indices)


def test_clean_images_are_the_rendered_scans_and_degraded_ones_are_not(mv, sk_digits):
    split = mv["test"]
    all_bytes = _image_bytes(split)
    for row_index in range(40):
        row = split[row_index]
        for image, _png, flag, index in zip(row["images"], all_bytes[row_index], row["degraded"], row["scan_indices"]):
            reference = Image.open(io.BytesIO(_digit_to_png(sk_digits.data[index], SIZE))).convert("RGB")
            same = np.array_equal(np.asarray(image), np.asarray(reference))
            assert same != flag
            if not flag:
                # Rendered like the single-image demo: dark ink on light paper, grey levels (R == G == B).
                pixels = np.asarray(image)
                assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
                assert pixels.mean() > 127


# ---------------------------------------------------------------- degradation


def test_degraded_counts(mv):
    total = degraded = 0
    kinds = set()
    for split in mv.values():
        for flags, kind, k in zip(list(split["degraded"]), list(split["degradation"]), list(split["num_images"])):
            assert sum(flags) == min(round(k * 0.5), k - 1)
            assert not all(flags)  # at least one clean view
            assert [kd != "clean" for kd in kind] == flags
            kinds.update(kind)
            total += k
            degraded += sum(flags)
    assert 0.35 <= degraded / total <= 0.55
    assert kinds == {"clean", "noise", "occlusion"}


def test_degraded_positions_vary_within_items(mv):
    positions = {flags.index(True) for flags in list(mv["train"]["degraded"]) if any(flags)}
    assert len(positions) >= 3


@pytest.mark.parametrize("fraction", [0.0, 0.9])
def test_degraded_fraction_extremes(fraction):
    ds = build_multiview_digits_dataset(image_size=8, num_train_items=60, num_test_items=10, degraded_fraction=fraction)
    for flags, k in zip(list(ds["train"]["degraded"]), list(ds["train"]["num_images"])):
        assert sum(flags) == (0 if fraction == 0.0 else k - 1)


def test_single_view_items_are_never_degraded():
    ds = build_multiview_digits_dataset(
        image_size=8, num_train_items=30, num_test_items=10, min_images=1, max_images=1, degraded_fraction=0.99
    )
    assert all(flags == [False] for flags in list(ds["train"]["degraded"]) + list(ds["test"]["degraded"]))


def test_degradation_destroys_most_digit_information(mv):
    """Nearest-centroid on pixels, fitted on the clean training scans: good on clean test scans, poor on
    degraded ones."""
    clean_train = {}
    for row in mv["train"]:
        for image, flag, index in zip(row["images"], row["degraded"], row["scan_indices"]):
            if not flag:
                clean_train[index] = (_ink(image), row["label"])
    x = np.stack([v[0] for v in clean_train.values()])
    y = np.array([v[1] for v in clean_train.values()])
    centroids = np.stack([x[y == c].mean(0) for c in range(10)])

    correct = {"clean": [], "noise": [], "occlusion": []}
    seen = set()
    for row in mv["test"]:
        for image, kind, index in zip(row["images"], row["degradation"], row["scan_indices"]):
            if kind == "clean":
                if index in seen:
                    continue
                seen.add(index)
            prediction = int(((_ink(image) - centroids) ** 2).sum(1).argmin())
            correct[kind].append(prediction == row["label"])
    assert all(len(v) > 150 for v in correct.values())
    accuracy = {kind: float(np.mean(v)) for kind, v in correct.items()}
    degraded = float(np.mean(correct["noise"] + correct["occlusion"]))
    assert accuracy["clean"] > 0.85, accuracy
    assert degraded < 0.45 and accuracy["noise"] < 0.5 and accuracy["occlusion"] < 0.5, accuracy
    assert accuracy["clean"] - degraded > 0.4, accuracy


# ---------------------------------------------------------------- determinism


def _small(seed, **kwargs):
    kwargs = dict({"image_size": SIZE, "num_train_items": 40, "num_test_items": 20, "seed": seed}, **kwargs)
    return build_multiview_digits_dataset(**kwargs)


def test_same_seed_same_items_and_pixels():
    a, b = _small(3), _small(3)
    for split in ("train", "test"):
        for column in ("scan_indices", "degraded", "degradation", "label", "num_images"):
            assert list(a[split][column]) == list(b[split][column])
        assert _image_bytes(a[split]) == _image_bytes(b[split])


def test_different_seeds_give_different_items():
    a, b = _small(0), _small(1)
    for split in ("train", "test"):
        assert list(a[split]["scan_indices"]) != list(b[split]["scan_indices"])


def test_test_items_do_not_depend_on_number_of_train_items():
    a, b = _small(5), _small(5, num_train_items=7)
    assert list(a["test"]["scan_indices"]) == list(b["test"]["scan_indices"])
    assert _image_bytes(a["test"]) == _image_bytes(b["test"])
    assert list(a["train"]["scan_indices"])[:7] == list(b["train"]["scan_indices"])


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"min_images": 0}, "min_images"),
        ({"min_images": 3, "max_images": 2}, "max_images"),
        ({"max_images": 10_000}, "max_images"),
        ({"degraded_fraction": 1.0}, "degraded_fraction"),
        ({"degraded_fraction": -0.1}, "degraded_fraction"),
        ({"degraded_fraction": float("nan")}, "degraded_fraction"),
        ({"num_train_items": 0}, "num_train_items"),
        ({"num_test_items": -1}, "num_test_items"),
        ({"num_train_items": 2.5}, "num_train_items"),
        ({"image_size": 0}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_argument_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_multiview_digits_dataset(**kwargs)


def test_max_images_bound_is_the_rarest_test_digit(sk_digits):
    test_targets = sk_digits.target[np.arange(len(sk_digits.target)) % 5 == 0]
    rarest = int(np.bincount(test_targets, minlength=10).min())
    ds = build_multiview_digits_dataset(
        image_size=8, num_train_items=5, num_test_items=5, min_images=rarest, max_images=rarest
    )
    assert set(ds["test"]["num_images"]) == {rarest}
    with pytest.raises(ValueError, match="max_images"):
        build_multiview_digits_dataset(max_images=rarest + 1)
