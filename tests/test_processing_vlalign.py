"""Tests for VLAlignProcessor and the PIL/numpy two-view augmentation."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BertTokenizer, ViTImageProcessorPil

from vlalign.processing_vlalign import (
    DEFAULT_AUGMENTATION,
    VLAlignProcessor,
    _adjust_contrast,
    _adjust_hue,
    augment_image,
    to_rgb,
)

SIZE = 32
WORDS = ["a", "handwritten", "digit", "one", "two", "three", "the", "number", "written", "by", "hand", "."]


def make_tokenizer():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def make_processor(**kwargs):
    image_processor = ViTImageProcessorPil(
        size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_resize=True
    )
    return VLAlignProcessor(image_processor=image_processor, tokenizer=make_tokenizer(), **kwargs)


def colour_image(height=48, width=40, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth structure + noise, so crops/flips/jitter all change the pixels.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def ramp_image(height=40, width=40):
    """Grey image whose brightness increases strictly from left to right: flips reverse the order."""
    row = np.linspace(0, 255, width)
    return Image.fromarray(np.tile(row, (height, 1)).astype(np.uint8))


@pytest.fixture(scope="module")
def processor():
    return make_processor()


def test_two_views_shapes_range_and_independence(processor):
    image = colour_image()
    out = processor(images=[image, image, image], two_views=True, rng=np.random.default_rng(0))
    plain = processor(images=[image, image, image])
    v1, v2, ref = out["pixel_values"], out["pixel_values_view2"], plain["pixel_values"]
    assert set(out.keys()) == {"pixel_values", "pixel_values_view2"}
    assert v1.shape == v2.shape == ref.shape == (3, 3, SIZE, SIZE)
    assert v1.dtype == v2.dtype == torch.float32
    # mean = std = 0.5 maps [0, 1] to [-1, 1]
    for t in (v1, v2, ref):
        assert t.min() >= -1.0 - 1e-6 and t.max() <= 1.0 + 1e-6
    # every view differs from the other view, from the un-augmented view, and copies of one image in a batch
    # get different augmentations
    for i in range(3):
        assert (v1[i] - v2[i]).abs().mean() > 0.05
        assert (v1[i] - ref[i]).abs().mean() > 0.05
        assert (v2[i] - ref[i]).abs().mean() > 0.05
    assert (v1[0] - v1[1]).abs().mean() > 0.05
    # eval path is deterministic and identical for identical images
    torch.testing.assert_close(ref[0], ref[1])


def test_identity_augmentation_matches_eval_path(processor):
    """With every random step disabled, a view must equal the eval pixel_values: same size, same normalisation."""
    identity = {
        "crop_scale": [1.0, 1.0],
        "crop_ratio": [1.0, 1.0],
        "color_jitter_p": 0.0,
        "grayscale_p": 0.0,
        "blur_p": 0.0,
        "hflip_p": 0.0,
        "interpolation": "bilinear",
    }
    proc = make_processor(augmentation=identity)
    image = colour_image(48, 48)
    out = proc(images=image, two_views=True, rng=np.random.default_rng(3))
    ref = proc(images=image)["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["pixel_values_view2"], ref, atol=1e-6, rtol=0)


def test_same_seed_same_output_different_seed_differs(processor):
    images = [colour_image(seed=1), colour_image(30, 60, seed=2)]
    a = processor(images=images, text=["a digit", "two"], two_views=True, rng=np.random.default_rng(123))
    b = processor(images=images, text=["a digit", "two"], two_views=True, rng=np.random.default_rng(123))
    c = processor(images=images, text=["a digit", "two"], two_views=True, rng=np.random.default_rng(124))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert not torch.equal(a["pixel_values"], c["pixel_values"])


@pytest.mark.parametrize("flip_p,expected", [(0.0, "never"), (1.0, "always"), (0.5, "sometimes")])
def test_horizontal_flip_probability(flip_p, expected):
    """A left-to-right ramp keeps its direction under crop/jitter/grayscale/blur; only a flip reverses it."""
    params = dict(DEFAULT_AUGMENTATION, hflip_p=flip_p)
    rng = np.random.default_rng(0)
    flipped = []
    for _ in range(60):
        view = np.asarray(augment_image(ramp_image(), (SIZE, SIZE), params, rng).convert("L"), dtype=np.float64)
        left, right = view[:, : SIZE // 2].mean(), view[:, SIZE // 2 :].mean()
        assert abs(left - right) > 1.0  # the ramp survives every other augmentation
        flipped.append(left > right)
    if expected == "never":
        assert not any(flipped)
    elif expected == "always":
        assert all(flipped)
    else:
        assert 10 < sum(flipped) < 50


def test_processor_with_flip_disabled_never_flips():
    proc = make_processor(augmentation={"hflip_p": 0.0})
    out = proc(images=[ramp_image()] * 16, two_views=True, rng=np.random.default_rng(5))
    for views in (out["pixel_values"], out["pixel_values_view2"]):
        left = views[..., : SIZE // 2].mean(dim=(1, 2, 3))
        right = views[..., SIZE // 2 :].mean(dim=(1, 2, 3))
        assert bool((left < right).all())


@pytest.mark.parametrize("shift", [0.1, -0.1, 0.5, -0.5, 0.0])
def test_hue_rotation_adds_the_shift_to_the_hue_channel_modulo_256(shift):
    """The hue channel of PIL's HSV form gains round(shift * 255) modulo 256 (a rotation with wrap-around, both
    directions); saturation and value are kept; the result goes back through PIL's HSV -> RGB."""
    image = colour_image()
    h, s, v = (np.asarray(band) for band in image.convert("HSV").split())
    step = round(shift * 255)
    assert shift == 0.0 or ((h.astype(int) + step) % 256 != h.astype(int) + step).any()  # some hues wrap
    hue = ((h.astype(np.int64) + step) % 256).astype(np.uint8)
    bands = [Image.fromarray(band) for band in (hue, s, v)]
    expected = np.asarray(Image.merge("HSV", bands).convert("RGB"))
    assert np.array_equal(np.asarray(_adjust_hue(image, shift)), expected)


def test_batch_augmentation_equals_augment_image_per_image():
    """The processor resolves the parameters once per batch; its views are augment_image's, draw for draw."""
    proc = make_processor(augmentation={"hflip_p": 0.3})
    images = [colour_image(seed=i) for i in range(4)]
    out = proc(images=images, two_views=True, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    views = [[], []]
    for image in images:
        for view in views:
            view.append(augment_image(image, (SIZE, SIZE), proc.augmentation, rng))
    for key, view in zip(("pixel_values", "pixel_values_view2"), views):
        expected = proc.image_processor(view, do_resize=False, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(out[key], expected, atol=0, rtol=0)


def test_contrast_jitter_equals_pils_contrast_enhancement():
    """`_adjust_contrast` (the mean by numpy) gives ImageEnhance.Contrast's image exactly, in L and RGB, on images
    whose mean lands near a rounding boundary and at factors below, at and above 1."""
    from PIL import ImageEnhance

    rng = np.random.default_rng(3)
    images = [colour_image(seed=i) for i in range(3)] + [ramp_image(), Image.new("RGB", (5, 3), (10, 200, 30))]
    images += [Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)) for h, w in ((1, 1), (7, 13), (64, 64))]
    images.append(Image.fromarray(np.array([[0, 1]], dtype=np.uint8)))  # mean exactly 0.5
    for image in images:
        for factor in (0.0, 0.6, 1.0, 1.4, 2.5):
            expected = ImageEnhance.Contrast(image).enhance(factor)
            got = _adjust_contrast(image, factor)
            assert got.mode == expected.mode
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_a_gray_view_augmented_as_one_band_equals_the_three_band_view_bit_for_bit(monkeypatch):
    """Gray views (a grayscale scan converted to RGB) go through the augmentation as one band: every step, with
    every step forced on in turn, gives the RGB view that augmenting the three equal bands gives, draw for draw,
    and colour images are untouched by the shortcut."""
    import vlalign.processing_vlalign as processing

    rng = np.random.default_rng(7)
    grays = [np.repeat(rng.integers(0, 256, (h, w, 1), dtype=np.uint8), 3, axis=2) for h, w in ((17, 23), (64, 48))]
    images = [Image.fromarray(g) for g in grays] + [ramp_image(), colour_image()]
    settings = [
        DEFAULT_AUGMENTATION,
        {"color_jitter_p": 1.0, "grayscale_p": 0.0, "blur_p": 0.0, "hflip_p": 0.0},
        {"color_jitter_p": 0.0, "grayscale_p": 1.0, "blur_p": 1.0, "hflip_p": 1.0},
    ]
    for params in settings:
        for size in ((SIZE, SIZE), (24, 40)):
            views = {}
            for one_band in (True, False):
                if not one_band:
                    monkeypatch.setattr(processing, "_is_gray", lambda image: False)
                draws = np.random.default_rng(11)
                views[one_band] = [np.asarray(augment_image(i, size, params, draws)) for i in images for _ in range(8)]
                monkeypatch.undo()
            assert all(v.shape == (*size, 3) for v in views[True])
            for fast, slow in zip(views[True], views[False]):
                np.testing.assert_array_equal(fast, slow)


def test_augment_image_size_is_height_width():
    view = augment_image(colour_image(), (24, 40), DEFAULT_AUGMENTATION, np.random.default_rng(0))
    assert view.mode == "RGB"
    assert view.size == (40, 24)  # PIL reports (width, height)


def test_augmentation_defaults_and_validation():
    proc = make_processor()
    assert proc.augmentation == DEFAULT_AUGMENTATION
    assert DEFAULT_AUGMENTATION["crop_scale"] == [0.2, 1.0]
    assert DEFAULT_AUGMENTATION["crop_ratio"] == pytest.approx([3 / 4, 4 / 3])
    assert (DEFAULT_AUGMENTATION["brightness"], DEFAULT_AUGMENTATION["hue"]) == (0.4, 0.1)
    assert (DEFAULT_AUGMENTATION["color_jitter_p"], DEFAULT_AUGMENTATION["grayscale_p"]) == (0.8, 0.2)
    assert (DEFAULT_AUGMENTATION["blur_p"], DEFAULT_AUGMENTATION["hflip_p"]) == (0.5, 0.5)
    assert DEFAULT_AUGMENTATION["blur_sigma"] == [0.1, 2.0]
    # partial dicts are merged over the defaults; tuples are normalised to lists (JSON round-trip stable)
    proc = make_processor(augmentation={"hflip_p": 0, "crop_scale": (0.5, 1.0)})
    assert proc.augmentation["hflip_p"] == 0.0 and proc.augmentation["crop_scale"] == [0.5, 1.0]
    assert proc.augmentation["blur_p"] == 0.5
    with pytest.raises(ValueError, match="flip_p"):
        make_processor(augmentation={"flip_p": 0.0})
    with pytest.raises(ValueError, match="grayscale_p"):
        make_processor(augmentation={"grayscale_p": 1.5})
    with pytest.raises(ValueError, match="crop_scale"):
        make_processor(augmentation={"crop_scale": [0.5, 0.2]})
    with pytest.raises(ValueError, match="hue"):
        make_processor(augmentation={"hue": 0.7})
    with pytest.raises(ValueError, match="max_length"):
        make_processor(max_length=0)
    with pytest.raises(TypeError, match="augmentation"):
        make_processor(augmentation=[0.5])


def test_text_encoding(processor):
    out = processor(text=["a handwritten digit one", "two"])
    assert set(out.keys()) == {"input_ids", "attention_mask"}  # token_type_ids dropped
    assert out["input_ids"].shape == (2, 6)  # padding="longest": [CLS] 4 words [SEP]
    assert out["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == ["a handwritten digit one", "two"]
    assert processor.decode(out["input_ids"][1], skip_special_tokens=True) == "two"
    long = " ".join(["one"] * 100)
    assert processor(text=long)["input_ids"].shape == (1, 30)  # default max_length
    assert processor(text=long, max_length=8)["input_ids"].shape == (1, 8)
    padded = processor(text="two", padding="max_length", max_length=10)
    assert padded["input_ids"].shape == (1, 10) and padded["attention_mask"].sum() == 3
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]
    with pytest.raises(ValueError):
        processor()
    with pytest.raises(TypeError, match="bogus"):
        processor(text="two", bogus=1)


def test_save_load_roundtrip(tmp_path):
    proc = make_processor(augmentation={"hflip_p": 0.0, "crop_scale": [0.5, 1.0]}, max_length=16)
    proc.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "processor_config.json")) as handle:
        saved = json.load(handle)
    assert saved["augmentation"]["hflip_p"] == 0.0 and saved["max_length"] == 16
    assert saved["processor_class"] == "VLAlignProcessor"

    loaded = VLAlignProcessor.from_pretrained(tmp_path)
    assert loaded.augmentation == proc.augmentation
    assert loaded.max_length == 16
    assert isinstance(loaded.image_processor, ViTImageProcessorPil)
    images = [colour_image(seed=3), colour_image(20, 50, seed=4)]
    text = ["the number one written by hand", "a digit " + "two " * 40]
    a = proc(images=images, text=text, two_views=True, rng=np.random.default_rng(9))
    b = loaded(images=images, text=text, two_views=True, rng=np.random.default_rng(9))
    assert a["input_ids"].shape[1] == 16
    for key in ("pixel_values", "pixel_values_view2", "input_ids", "attention_mask"):
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    torch.testing.assert_close(proc(images=images)["pixel_values"], loaded(images=images)["pixel_values"])


def test_auto_classes_load_components_from_saved_folder(tmp_path, processor):
    """The zero-shot pipeline loads AutoImageProcessor and AutoTokenizer separately from the folder."""
    processor.save_pretrained(tmp_path)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(image_processor, ViTImageProcessorPil)
    assert image_processor.size == {"height": SIZE, "width": SIZE}
    assert list(image_processor.image_mean) == [0.5] * 3 and list(image_processor.image_std) == [0.5] * 3
    image = colour_image()
    torch.testing.assert_close(
        image_processor(image, return_tensors="pt")["pixel_values"], processor(images=image)["pixel_values"]
    )
    text = ["a handwritten digit three", "the number two written by hand"]
    assert tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def _mode_image(mode):
    rgb = colour_image(20, 24)
    if mode == "I;16":
        array = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        return Image.fromarray(array)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "tiny":
        return Image.new("RGB", (1, 1), (10, 200, 30))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1", "YCbCr", "tiny"])
def test_non_rgb_modes_are_accepted(processor, mode):
    image = _mode_image(mode)
    plain = processor(images=image)["pixel_values"]
    views = processor(images=[image], two_views=True, rng=np.random.default_rng(0))
    for tensor in (plain, views["pixel_values"], views["pixel_values_view2"]):
        assert tensor.shape == (1, 3, SIZE, SIZE)
        assert torch.isfinite(tensor).all()
        assert tensor.min() >= -1 - 1e-6 and tensor.max() <= 1 + 1e-6
    if mode in ("L", "I;16", "I", "F", "1"):
        # single-channel sources become grey RGB
        torch.testing.assert_close(plain[:, 0], plain[:, 1])
        torch.testing.assert_close(plain[:, 1], plain[:, 2])


def test_mode_conversions_keep_values():
    # 16-bit is rescaled (not clipped): full-scale 16-bit white -> 8-bit white, mid grey -> mid grey
    wide = Image.fromarray(np.array([[65535, 32896, 0]], dtype=np.uint16))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [255, 128, 0]
    # fully transparent pixels become white, opaque ones keep their colour
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 1] = (10, 20, 30, 255)
    assert np.asarray(to_rgb(Image.fromarray(rgba))).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    # CMYK pure cyan -> RGB (0, 255, 255)
    cmyk = Image.new("CMYK", (1, 1), (255, 0, 0, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [0, 255, 255]
    # float arrays in [0, 1] scale to 8-bit
    assert np.asarray(to_rgb(np.full((2, 2), 1.0)))[0, 0].tolist() == [255, 255, 255]


def test_processor_inputs_are_converted_like_decoded_training_images():
    """One RGB conversion (`to_rgb`) for processor inputs and for the images `vlalign.data.decode_image` decodes for
    training: a dark 16-bit scan stays dark (scaled by its bit depth) and a transparent colour key becomes white
    either way, so a model sees an image at inference as it saw it in training."""
    from vlalign.data import decode_image

    dark16 = Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint16))  # a guess from its values: 8-bit data
    keyed = Image.new("L", (2, 1), 0)
    keyed.putpixel((1, 0), 90)
    keyed.info["transparency"] = 0
    assert np.asarray(to_rgb(dark16))[0, :, 0].tolist() == [0, 0, 1]
    assert np.asarray(to_rgb(keyed))[0].tolist() == [[255, 255, 255], [90, 90, 90]]
    for image in (dark16, keyed, _mode_image("I;16"), _mode_image("P"), _mode_image("CMYK")):
        assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(decode_image(image))), image.mode


def test_text_padding_max_length_pads_every_caption_and_is_saved(tmp_path):
    """SigLIP's text tower pools the last position of captions padded to max_length, as it was trained."""
    processor = make_processor(text_padding="max_length", max_length=12)
    out = processor(text=["a digit", "the number written by hand"])
    assert out["input_ids"].shape == (2, 12)
    assert out["attention_mask"].sum(1).tolist() == [4, 7]
    assert make_processor()(text=["a digit", "the number written by hand"])["input_ids"].shape == (2, 7)
    processor.save_pretrained(tmp_path)
    assert VLAlignProcessor.from_pretrained(tmp_path).text_padding == "max_length"
    with pytest.raises(ValueError, match="text_padding must be 'longest' or 'max_length'"):
        make_processor(text_padding="right")
