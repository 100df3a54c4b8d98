"""vlalign.data.digits: the digits demo dataset (scikit-learn's scans, splits by index mod 5, captions that name the
right digit), its tokenizer (covers every caption and template) and processor."""

import re

import datasets
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from transformers import AutoTokenizer, ViTImageProcessorPil

from vlalign.data import (
    DIGIT_CAPTION_TEMPLATES,
    DIGIT_NAMES,
    DIGIT_ZERO_SHOT_TEMPLATES,
    GENERIC_ZERO_SHOT_TEMPLATES,
    build_digits_dataset,
    build_digits_processor,
    build_digits_tokenizer,
    digit_captions,
)


@pytest.fixture(scope="module")
def digits():
    return build_digits_dataset()


@pytest.fixture(scope="module")
def processor():
    return build_digits_processor()


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
