"""Processor for vlalign image-text models: image processor + tokenizer + two-view augmentation.

Training ALBEF/TCL-style models needs two independently augmented views of every image; evaluation uses the
plain (resize + normalise) path of the image processor. The augmentation is implemented with PIL/numpy only so
that the package never depends on torchvision.

It imports no sibling module, so a saved processor folder needs this one code file. loading.py imports
`check_tokenizer_files` from it (a model folder's loader checks the tokenizer saved beside it), so model folders
carry this file too.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from transformers import BatchFeature, ProcessorMixin

__all__ = [
    "DEFAULT_AUGMENTATION",
    "MIVCProcessor",
    "MissingTokenizerFileError",
    "mivc_chat_template",
    "VLAlignProcessor",
    "augment_image",
    "check_tokenizer_files",
    "resolve_augmentation",
    "to_rgb",
]


# Two-view augmentation defaults (TCL paper, Sec. 4.1; SimCLR-style pipeline). Ranges are lists, not tuples,
# so that the dict is identical before and after a JSON round trip.
DEFAULT_AUGMENTATION: dict[str, Any] = {
    "crop_scale": [0.2, 1.0],
    "crop_ratio": [3.0 / 4.0, 4.0 / 3.0],
    "color_jitter_p": 0.8,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.4,
    "hue": 0.1,
    "grayscale_p": 0.2,
    "blur_p": 0.5,
    "blur_sigma": [0.1, 2.0],
    "hflip_p": 0.5,
    "interpolation": "bicubic",
}

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_PROBABILITY_KEYS = ("color_jitter_p", "grayscale_p", "blur_p", "hflip_p")
_RANGE_KEYS = ("crop_scale", "crop_ratio", "blur_sigma")


def resolve_augmentation(augmentation: dict[str, Any] | None) -> dict[str, Any]:
    """Merge user parameters over `DEFAULT_AUGMENTATION` and validate them.

    Returns a new JSON-serialisable dict (ranges as 2-element float lists). Unknown keys and out-of-range values
    raise `ValueError` naming the key, because a typo (e.g. `"flip_p"`) would otherwise be silently ignored.
    """
    params = copy.deepcopy(DEFAULT_AUGMENTATION)
    if augmentation is None:
        return params
    if not isinstance(augmentation, dict):
        raise TypeError(f"augmentation must be a dict, got {type(augmentation).__name__}")
    unknown = sorted(set(augmentation) - set(DEFAULT_AUGMENTATION))
    if unknown:
        raise ValueError(f"Unknown augmentation keys {unknown}; valid keys: {sorted(DEFAULT_AUGMENTATION)}")
    params.update(augmentation)

    for key in _RANGE_KEYS:
        value = params[key]
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"augmentation['{key}'] must be a pair (low, high), got {value!r}")
        low, high = float(value[0]), float(value[1])
        if not (0 < low <= high):
            raise ValueError(f"augmentation['{key}'] must satisfy 0 < low <= high, got {value!r}")
        params[key] = [low, high]
    if params["crop_scale"][1] > 1.0:
        raise ValueError(f"augmentation['crop_scale'] must lie in (0, 1], got {params['crop_scale']!r}")
    for key in _PROBABILITY_KEYS:
        p = float(params[key])
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation['{key}'] must be a probability in [0, 1], got {params[key]!r}")
        params[key] = p
    for key in ("brightness", "contrast", "saturation"):
        value = float(params[key])
        if value < 0:
            raise ValueError(f"augmentation['{key}'] must be >= 0, got {params[key]!r}")
        params[key] = value
    hue = float(params["hue"])
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"augmentation['hue'] must lie in [0, 0.5], got {params['hue']!r}")
    params["hue"] = hue
    if params["interpolation"] not in _INTERPOLATIONS:
        raise ValueError(
            f"augmentation['interpolation'] must be one of {sorted(_INTERPOLATIONS)}, got {params['interpolation']!r}"
        )
    return params


def to_rgb(image: Any) -> Image.Image:
    """Convert a PIL image of any mode (or an HxW[xC] numpy array) to an 8-bit RGB PIL image.

    vlalign's one RGB conversion: processor inputs go through it, and so do the training and evaluation images that
    `vlalign.data.decode_image` decodes, so a model sees an image the same way in training and at inference.

    Transparent pixels are composited on white (dropping alpha would turn them black, which for scans and
    drawings inverts the meaning of the background), including a transparent colour key (`info["transparency"]` of
    a palette, 1-bit, L or RGB PNG). High bit-depth modes are rescaled, not clipped: 16-bit grayscale maps 0..65535
    onto 0..255 by its bit depth, whatever the image's own range (a dark 16-bit scan stays dark; a guess from its
    values would stretch it to full contrast), see `_wide_gray_to_rgb`. An RGB image is returned as it is.
    """
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image or numpy array, got {type(image).__name__}")
    mode = image.mode
    if mode in ("1", "L", "RGB") and image.info.get("transparency") is not None:
        # a transparent colour key becomes white like any other transparent pixel instead of keeping its colour
        image = image.convert("RGBA")
        mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        # Palette images may carry transparency through `info`; go through RGBA to honour it.
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        return _wide_gray_to_rgb(image)
    if mode.startswith("I") or mode == "F":
        return _array_to_pil(np.asarray(image))
    if mode == "1":
        return image.convert("L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        # Modes without a direct RGB conversion (e.g. LAB): go through the raw bands as a last resort.
        return _array_to_pil(np.asarray(image)[..., :3])


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale PIL image -> RGB. 16-bit data maps 0..65535 onto 0..255 whatever the image's own range;
    32-bit "I" data within the 16-bit range is read as 16-bit (PNG, most TIFFs), anything wider is stretched from its
    min to its max. (A numpy array has no bit depth: `_array_to_pil` judges it by its values.)"""
    pixels = np.asarray(image).astype(np.float64)
    low, high = float(pixels.min()), float(pixels.max())
    if image.mode.startswith("I;16") or (low >= 0 and high <= 65535):
        scaled = pixels / 257.0  # 65535 / 257 = 255 exactly
    else:
        scaled = (pixels - low) / max(high - low, 1.0) * 255.0
    gray = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _array_to_pil(array: np.ndarray) -> Image.Image:
    """uint8/int/float array (HxW, HxWx1/3/4 or CxHxW) -> RGB PIL image, rescaling wide integer/float ranges."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channel-first (e.g. from a tensor) -> channel-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or array.size == 0:
        raise ValueError(f"Cannot interpret array of shape {array.shape} as an image")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if np.issubdtype(array.dtype, np.floating) and low >= 0.0 and high <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        elif low >= 0 and high <= 255:
            pass  # already on the 8-bit scale, stored in a wider type
        elif low >= 0 and high <= 65535 and not np.issubdtype(array.dtype, np.floating):
            values = values / 257.0  # 16-bit scale (I;16 PNGs, scientific TIFFs)
        else:
            values = (values - low) / max(high - low, 1e-12) * 255.0
        array = np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    if array.ndim == 2:
        return Image.fromarray(array).convert("RGB")
    if array.shape[-1] == 4:
        return to_rgb(Image.fromarray(array))
    return Image.fromarray(array)


def _random_resized_crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Sample a crop box (left, top, right, bottom) covering a random area fraction and aspect ratio.

    Same sampling scheme as the RandomResizedCrop used by TCL/SimCLR: 10 rejection-sampling attempts with a
    log-uniform aspect ratio, then a centre crop with the aspect ratio clamped into `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _adjust_hue(image: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue of an RGB image by `shift` turns (in [-0.5, 0.5]) through HSV, with uint8 wrap-around."""
    hsv = np.array(image.convert("HSV"))  # a writable copy, H x W x 3
    # uint8 addition wraps modulo 256, which is exactly a rotation on the hue circle.
    hsv[..., 0] += np.uint8(round(shift * 255) % 256)
    return Image.frombytes("HSV", image.size, hsv.tobytes()).convert("RGB")


def _adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    """`ImageEnhance.Contrast(image).enhance(factor)` of an L or RGB image, pixel for pixel: a blend with the image's
    mean gray level, rounded. The mean is the exact integer sum of the luma over the pixel count, as ImageStat's,
    which takes it with a Python loop over the 256-bin histogram (the jitter's costliest step on small images)."""
    luma = image if image.mode == "L" else image.convert("L")
    mean = int(int(np.asarray(luma).sum(dtype=np.int64)) / (luma.width * luma.height) + 0.5)
    degenerate = Image.new("L", image.size, mean)
    return Image.blend(degenerate if image.mode == "L" else degenerate.convert(image.mode), image, factor)


def _color_jitter(image: Image.Image, params: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """Brightness/contrast/saturation/hue jitter with random factors, applied in a random order.

    A grayscale ("L") image keeps its brightness and contrast steps; saturation and hue leave a gray image as it is
    (its grayscale copy is itself, its hue has no saturation to rotate), so their factors are drawn and not applied."""
    gray = image.mode == "L"
    for op in rng.permutation(4):
        if op == 0 and params["brightness"] > 0:
            b = params["brightness"]
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(max(0.0, 1 - b), 1 + b))
        elif op == 1 and params["contrast"] > 0:
            c = params["contrast"]
            image = _adjust_contrast(image, rng.uniform(max(0.0, 1 - c), 1 + c))
        elif op == 2 and params["saturation"] > 0:
            s = params["saturation"]
            factor = rng.uniform(max(0.0, 1 - s), 1 + s)
            if not gray:
                image = ImageEnhance.Color(image).enhance(factor)
        elif op == 3 and params["hue"] > 0:
            shift = rng.uniform(-params["hue"], params["hue"])
            if not gray:
                image = _adjust_hue(image, shift)
    return image


def _is_gray(image: Image.Image) -> bool:
    """Whether an RGB image has three equal channels (a grayscale scan converted to RGB)."""
    data = image.tobytes()  # R, G, B interleaved
    return data[0::3] == data[1::3] == data[2::3]


def augment_image(
    image: Image.Image, size: tuple[int, int], params: dict[str, Any] | None, rng: np.random.Generator
) -> Image.Image:
    """Return one random training view of `image` as an RGB PIL image of `size` = (height, width).

    Pipeline: random resized crop -> colour jitter (p) -> grayscale (p) -> gaussian blur (p) -> horizontal flip (p).
    Every random draw comes from `rng`, so a seeded generator reproduces the view exactly. A probability of 0
    disables a step entirely (e.g. `hflip_p=0` for digits, whose mirror images are not digits).
    """
    return _augment_resolved(image, size, resolve_augmentation(params), rng)


def _augment_resolved(
    image: Image.Image, size: tuple[int, int], params: dict[str, Any], rng: np.random.Generator
) -> Image.Image:
    """`augment_image` with `params` already resolved (a batch resolves them once, not once per image)."""
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive (height, width), got {size!r}")
    image = to_rgb(image)
    box = _random_resized_crop_box(image.width, image.height, params["crop_scale"], params["crop_ratio"], rng)
    # Crop and resize in one resampling pass (PIL's `box` argument) to avoid a second interpolation.
    image = image.resize((width, height), resample=_INTERPOLATIONS[params["interpolation"]], box=box)
    # A gray view (checked at the target size, where it is cheap) is augmented as one band instead of three: every
    # step below treats the bands alike, so the RGB view at the end is the one the three bands would give, bit for
    # bit (tested), at a third of the work.
    gray = _is_gray(image)
    if gray:
        image = image.convert("L")  # exact: the luma weights of equal channels sum to one
    if rng.random() < params["color_jitter_p"]:
        image = _color_jitter(image, params, rng)
    if rng.random() < params["grayscale_p"] and not gray:
        image = image.convert("L").convert("RGB")
    if rng.random() < params["blur_p"]:
        sigma = rng.uniform(params["blur_sigma"][0], params["blur_sigma"][1])
        image = image.filter(ImageFilter.GaussianBlur(radius=sigma))  # Pillow's radius is the gaussian std
    if rng.random() < params["hflip_p"]:
        image = ImageOps.mirror(image)
    return image.convert("RGB") if gray else image


def _target_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) the image processor outputs, so augmented views match eval-time pixel_values."""
    size = None
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        size = image_processor.crop_size
    elif getattr(image_processor, "size", None):
        size = image_processor.size
    if size is None:
        raise ValueError("The image processor has no `size`; cannot determine the augmentation output size")
    if isinstance(size, int):
        return size, size
    size = dict(size)
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(f"Unsupported image processor size {size!r}")


class MissingTokenizerFileError(FileNotFoundError):
    """A saved tokenizer without the vocabulary its class reads. transformers does not fail on it: it builds the
    tokenizer from tokenizer_config.json alone, i.e. with the special tokens only, and every word becomes [UNK]."""


# what a tokenizer class's `vocab_files_names` calls the tokenizers-library file (tokenizer.json)
_FAST_TOKENIZER_KEY = "tokenizer_file"


def check_tokenizer_files(folder) -> None:
    """Raise `MissingTokenizerFileError` when the tokenizer saved in the local `folder` cannot be read in full.

    The folder's tokenizer_config.json names the tokenizer class; that class reads tokenizer.json, or else its own
    vocabulary files (`vocab_files_names`: vocab.txt for a BERT WordPiece, vocab.json + merges.txt for a BPE, a
    sentencepiece model), so a folder with either is fine. Folders without tokenizer_config.json and classes that
    transformers does not export (remote-code tokenizers) are left to transformers.
    """
    folder = str(folder)
    config_file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as handle:
        class_name = json.load(handle).get("tokenizer_class")
    if not isinstance(class_name, str):
        return
    try:
        files = getattr(getattr(transformers, class_name, None), "vocab_files_names", None)
    except ImportError:  # a class whose backend (e.g. sentencepiece) is not installed: transformers will say so
        return
    if not isinstance(files, dict):
        return
    fast = files.get(_FAST_TOKENIZER_KEY, "tokenizer.json")
    slow = sorted({name for key, name in files.items() if key != _FAST_TOKENIZER_KEY})
    present = {name for name in (fast, *slow) if os.path.isfile(os.path.join(folder, name))}
    if fast in present or (slow and set(slow) <= present):
        return
    alternative = f" or else {' + '.join(slow)}" if slow else ""
    missing = [name for name in (fast, *slow) if name not in present]
    raise MissingTokenizerFileError(
        f"the tokenizer saved in {folder!r} has no {fast}: its tokenizer_config.json names {class_name}, which "
        f"reads {fast}{alternative}, and the folder lacks {', '.join(missing)}. Loaded anyway, the tokenizer would "
        f"hold only its special tokens and turn every word into [UNK]. Restore the file (save the processor again, "
        f"or download the folder again)."
    )


class ChecksTokenizerFilesOnLoad:
    """`from_pretrained` of our processors: a local folder whose tokenizer lacks its vocabulary file raises
    `MissingTokenizerFileError` (see `check_tokenizer_files`) instead of loading a tokenizer of special tokens."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        subfolder = kwargs.get("subfolder", "")
        location = (
            os.path.join(str(pretrained_model_name_or_path), subfolder)
            if subfolder
            else str(pretrained_model_name_or_path)
        )
        if os.path.isdir(location):
            check_tokenizer_files(location)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


class VLAlignProcessor(ChecksTokenizerFilesOnLoad, ProcessorMixin):
    r"""Wraps an image processor and a tokenizer, and adds the two-view training augmentation.

    Args:
        image_processor: a transformers image processor (e.g. `ViTImageProcessorPil`) giving size and normalisation.
        tokenizer: a transformers tokenizer.
        augmentation (`dict`, *optional*): two-view augmentation parameters, merged over `DEFAULT_AUGMENTATION`
            (keys: crop_scale, crop_ratio, color_jitter_p, brightness, contrast, saturation, hue, grayscale_p,
            blur_p, blur_sigma, hflip_p, interpolation). Saved in `processor_config.json`.
        max_length (`int`, defaults to 30): default maximum caption length in tokens.
        text_padding (`str`, defaults to "longest"): how captions are padded by default: "longest" (to the
            batch's longest) or "max_length" (every caption to `max_length`, as SigLIP's text tower, which pools
            the last position, was trained).

    `ProcessorMixin` (transformers 5) infers the components from the `__init__` parameter names
    (`image_processor`, `tokenizer`); no `attributes`/`*_class` declarations are needed (they are deprecated).
    """

    def __init__(
        self, image_processor=None, tokenizer=None, augmentation=None, max_length=30, text_padding="longest", **kwargs
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("VLAlignProcessor needs both an `image_processor` and a `tokenizer`")
        if int(max_length) <= 0:
            raise ValueError(f"max_length must be > 0, got {max_length!r}")
        if text_padding not in ("longest", "max_length"):
            raise ValueError(f"text_padding must be 'longest' or 'max_length', got {text_padding!r}")
        self.text_padding = text_padding
        # Plain attributes named like __init__ parameters are what ProcessorMixin.to_dict serialises.
        self.augmentation = resolve_augmentation(augmentation)
        self.max_length = int(max_length)
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_dual_encoder_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> VLAlignProcessor:
        """The tokenizer and image processor saved with a `CLIPModel`, `SiglipModel` or
        `VisionTextDualEncoderModel` checkpoint (its own resizing and normalisation), as a VLAlignProcessor: the
        processor of `ALBEFModel.from_dual_encoder_pretrained` on the same checkpoint. SigLIP's text tower pools
        the last position of texts padded to its full length, so its captions are padded to max_length.
        ``kwargs`` go to the constructor (e.g. ``augmentation``). Raises ValueError when either part is missing."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path):
            check_tokenizer_files(path)
        try:
            tokenizer, image_processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{path!r} has no tokenizer or image processor to load ({error}); use the processor it was trained with"
            ) from None
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "siglip":
            kwargs.setdefault("text_padding", "max_length")
            kwargs.setdefault("max_length", config.text_config.max_position_embeddings)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of `pixel_values`."""
        return _target_size(self.image_processor)

    def __call__(
        self,
        images=None,
        text=None,
        return_tensors="pt",
        two_views: bool = False,
        rng: np.random.Generator | None = None,
        augment: bool | None = None,
        padding=None,
        truncation=True,
        max_length=None,
        **kwargs,
    ) -> BatchFeature:
        """Prepare images and/or captions.

        Returns a `BatchFeature` with `pixel_values` (augmented with `augment`, which defaults to `two_views`),
        `pixel_values_view2` (only with `two_views=True`: a second, independent augmentation), `input_ids` and
        `attention_mask`. `augment=True, two_views=False` is the one augmented view of a training step whose
        objectives use no second view (it costs half the augmentation work).
        Extra image-processor / tokenizer options can be passed as `images_kwargs={...}` / `text_kwargs={...}`.
        """
        images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        if kwargs:
            raise TypeError(f"Unexpected keyword arguments for VLAlignProcessor: {sorted(kwargs)}")
        if images is None and text is None:
            raise ValueError("Provide `images`, `text`, or both")

        data: dict[str, Any] = {}
        if images is not None:
            single = isinstance(images, (Image.Image, np.ndarray)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4
            )
            image_list = [images] if single else list(images)
            if not image_list:
                raise ValueError("`images` is empty")
            image_list = [to_rgb(image) for image in image_list]
            augment = two_views if augment is None else augment
            if two_views and not augment:
                raise ValueError("two_views=True needs augment (the second view is a second augmentation)")
            if augment:
                rng = np.random.default_rng() if rng is None else rng
                size, params = self.image_size, resolve_augmentation(self.augmentation)
                view1, view2 = [], []
                for image in image_list:
                    view1.append(_augment_resolved(image, size, params, rng))
                    if two_views:
                        view2.append(_augment_resolved(image, size, params, rng))
                # Views are already at the target size: skip resizing/cropping, keep rescale + normalise.
                norm_kwargs = {**images_kwargs, "do_resize": False}
                if getattr(self.image_processor, "do_center_crop", False):
                    norm_kwargs["do_center_crop"] = False
                views = (
                    (("pixel_values", view1), ("pixel_values_view2", view2))
                    if two_views
                    else (("pixel_values", view1),)
                )
                for key, images_of_view in views:
                    encoded = self.image_processor(images_of_view, return_tensors=return_tensors, **norm_kwargs)
                    data[key] = encoded["pixel_values"]
            else:
                encoded = self.image_processor(image_list, return_tensors=return_tensors, **images_kwargs)
                data["pixel_values"] = encoded["pixel_values"]

        if text is not None:
            if isinstance(text, str):
                text = [text]
            encoding = self.tokenizer(
                list(text),
                padding=self.text_padding if padding is None else padding,
                truncation=truncation,
                max_length=self.max_length if max_length is None else max_length,
                return_tensors=return_tensors,
                **text_kwargs,
            )
            data["input_ids"] = encoding["input_ids"]
            data["attention_mask"] = encoding["attention_mask"]

        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        """Forwards to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Forwards to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        """Eval-time model inputs (token_type_ids are never produced; `pixel_values_view2` is training-only)."""
        return ["input_ids", "attention_mask", "pixel_values"]

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save `processor_config.json` + tokenizer files, and also the image processor's own
        `preprocessor_config.json`, so that `AutoImageProcessor.from_pretrained` works from the folder with any
        reader, not only ones that look inside the nested `processor_config.json`."""
        if push_to_hub:
            # Save locally, then let `push_to_hub` (which calls this method again into a temporary folder)
            # upload everything, including the extra image-processor file.
            files = self.save_pretrained(save_directory)
            repo_id = kwargs.pop("repo_id", str(save_directory).rstrip(os.sep).split(os.sep)[-1])
            self.push_to_hub(repo_id, **kwargs)
            return files
        files = list(super().save_pretrained(save_directory) or [])
        files.extend(self.image_processor.save_pretrained(save_directory))
        return files


def mivc_chat_template(image_token: str = "<image>") -> str:
    """The Jinja chat template of `MIVCProcessor`: renders a chat in the transformers multimodal format into the
    prompt format MIVC is trained on, e.g. `"<image> Which digit do these scans show?"`.

    The images of an item are pooled into one set, so all of its image blocks become one `image_token`, written
    where they stand, and the pieces are joined by single spaces (a message without an image block gets the
    placeholder first, as `MIVCProcessor` prepends it). Training has no roles and no assistant header (the answer
    follows the prompt directly), so the generation prompt is empty, and only a conversation of one user message
    has a training counterpart: anything else is refused, as are images split by text.
    """
    return (
        "{#- MIVC prompt: one placeholder for all the images of the item (pooled as a set), then the text. -#}\n"
        f"{{%- set image_token = {json.dumps(str(image_token))} -%}}\n"
        """{%- if messages | length != 1 or messages[0]['role'] != 'user' -%}
{{- raise_exception('MIVC is trained on one prompt per item: pass exactly one user message (no system or '
    ~ 'assistant messages), got roles ' ~ (messages | map(attribute='role') | list | join(', '))) -}}
{%- endif -%}
{%- set content = messages[0]['content'] -%}
{%- if content is string -%}{%- set content = [{'type': 'text', 'text': content}] -%}{%- endif -%}
{%- set ns = namespace(parts=[], images='none') -%}
{%- for block in content -%}
{%- if block['type'] == 'image' -%}
{%- if ns.images == 'none' -%}
{%- set ns.parts = ns.parts + [image_token] -%}
{%- set ns.images = 'open' -%}
{%- elif ns.images == 'closed' -%}
{{- raise_exception('MIVC pools the images of an item into one set: put its image blocks together, not '
    ~ 'separated by text') -}}
{%- endif -%}
{%- elif block['type'] == 'text' -%}
{%- if ns.images == 'open' -%}{%- set ns.images = 'closed' -%}{%- endif -%}
{%- set ns.parts = ns.parts + [block['text']] -%}
{%- else -%}
{{- raise_exception('MIVC takes image and text content blocks, got a ' ~ block['type'] ~ ' block') -}}
{%- endif -%}
{%- endfor -%}
{%- if ns.images == 'none' -%}{%- set ns.parts = [image_token] + ns.parts -%}{%- endif -%}
{{- ns.parts | join(' ') -}}
{#- add_generation_prompt adds nothing: in training the answer follows the prompt directly. -#}
"""
    )


class MIVCProcessor(ChecksTokenizerFilesOnLoad, ProcessorMixin):
    r"""Prompts with an image placeholder + a variable number of images per sample -> inputs of
    [`MIVCForConditionalGeneration`].

    Each prompt holds one `image_token` (prepended when missing); it is expanded to the number of visual tokens the
    model will splice in: `image_seq_length` for pooled MIVC (the images of a sample become one token sequence), or
    `image_seq_length` per image with `concatenate_images=True` (the concatenation baseline).

    Args:
        image_processor: a transformers image processor (e.g. `ViTImageProcessorPil`).
        tokenizer: the causal LM's tokenizer; `image_token` must be one of its tokens (add it with
            `tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})` and resize the LM).
        image_seq_length: visual tokens per image (`MIVCConfig.image_seq_length`).
        image_token: the placeholder string.
        concatenate_images: expand the placeholder per image (pooling_mode "concatenate").
        chat_template: defaults to `mivc_chat_template(image_token)`, so that `apply_chat_template` and the
            image-text-to-text pipeline take chat messages; saved as `chat_template.jinja`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length=16,
        image_token="<image>",
        concatenate_images=False,
        chat_template=None,
        **kwargs,
    ):
        if image_processor is None or tokenizer is None:
            raise ValueError("MIVCProcessor needs both an `image_processor` and a `tokenizer`")
        if int(image_seq_length) <= 0:
            raise ValueError(f"image_seq_length must be > 0, got {image_seq_length!r}")
        self.image_seq_length = int(image_seq_length)
        self.image_token = str(image_token)
        self.concatenate_images = bool(concatenate_images)
        # a named parameter: from_pretrained passes only those (a saved chat_template.jinja among them)
        if chat_template is None:
            chat_template = mivc_chat_template(self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no token {self.image_token!r}: add it as a special token first")
        self.image_token_id = int(token_id)

    def _images_per_sample(self, images, batch: int) -> list[list]:
        def is_image(x):  # a string is a path, URL or base64 image (chat messages' image blocks pass them)
            return isinstance(x, (Image.Image, np.ndarray, str))

        if is_image(images):
            images = [images]
        images = list(images)
        if images and all(isinstance(x, (list, tuple)) for x in images):
            per_sample = [list(x) for x in images]
        elif all(is_image(x) for x in images):
            # one prompt: all the images are its own; several prompts: one image each
            per_sample = [images] if batch == 1 else [[x] for x in images]
        else:
            raise ValueError("images must be an image, a list of images (one prompt), or one list of images per prompt")
        if len(per_sample) != batch:
            raise ValueError(f"got {len(per_sample)} image lists for {batch} prompts")
        for index, sample in enumerate(per_sample):
            if not sample:
                raise ValueError(f"sample {index} has no image")
        return [[self._load_image(x) if isinstance(x, str) else x for x in sample] for sample in per_sample]

    def _load_image(self, source: str):
        """A path, URL or base64 image, loaded as the image processor loads one (EXIF orientation applied); the
        torchvision backend gives a (C, H, W) uint8 tensor, which `to_rgb` takes as an array."""
        image = self.image_processor.fetch_images(source)
        return image.numpy() if isinstance(image, torch.Tensor) else image

    def _prompt_ids(self, prompt: str, num_images: int, add_bos: bool = True) -> list[int]:
        count = prompt.count(self.image_token)
        if count == 0:
            prompt = f"{self.image_token} {prompt}"
        elif count > 1:
            raise ValueError(
                f"a prompt must hold one {self.image_token!r} placeholder for all its images, got {count}: {prompt!r}"
            )
        repeats = self.image_seq_length * (num_images if self.concatenate_images else 1)
        ids = self.tokenizer(prompt.replace(self.image_token, self.image_token * repeats), add_special_tokens=False)[
            "input_ids"
        ]
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None and add_bos else []) + list(ids)

    def __call__(
        self,
        images=None,
        text=None,
        answers=None,
        return_tensors="pt",
        padding_side=None,
        add_special_tokens=True,
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        """Prepare prompts and their images (and, for training, answers).

        Args:
            images: per prompt a list of images (PIL images, arrays, or paths / URLs, loaded as the image
                processor loads them); variable counts; for a single prompt a flat list is its images.
            text: a prompt or a list of prompts, each with one image placeholder (prepended when missing).
            answers: optional target texts (training): appended to the prompts with the tokenizer's EOS token, and
                `labels` hold their ids (-100 on prompt, image and padding positions).
            padding_side: "left" (default without answers, for batched generation) or "right" (default with
                answers).
            add_special_tokens: prepend the tokenizer's BOS token (False for prompts that already start with it,
                as `apply_chat_template` passes for such a template).
        Returns:
            `BatchFeature` with `input_ids`, `attention_mask`, `pixel_values` (batch, max images, C, H, W; zeros in
            padded slots), `image_mask` (batch, max images; True for real images) and, with answers, `labels`.
        """
        for key in ("padding", "truncation", "max_length", "images_kwargs", "text_kwargs", "processor_kwargs"):
            kwargs.pop(key, None)  # pipelines pass tokenizer options; prompts are padded here, never truncated
        if kwargs:
            raise TypeError(f"Unexpected keyword arguments for MIVCProcessor: {sorted(kwargs)}")
        if videos is not None or audio is not None:  # apply_chat_template always passes both, as None
            raise ValueError("MIVCProcessor takes images and text only, not videos or audio")
        if text is None:
            raise ValueError("MIVCProcessor needs `text` (prompts with an image placeholder)")
        prompts = [text] if isinstance(text, str) else list(text)
        if images is None:
            raise ValueError("MIVCProcessor needs `images` (one or more per prompt)")
        per_sample = self._images_per_sample(images, len(prompts))
        sequences = [
            self._prompt_ids(p, len(s), add_bos=add_special_tokens) for p, s in zip(prompts, per_sample, strict=True)
        ]
        labels = None
        if answers is not None:
            answers = [answers] if isinstance(answers, str) else list(answers)
            if len(answers) != len(prompts):
                raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts")
            eos = self.tokenizer.eos_token_id
            labels = []
            for index, answer in enumerate(answers):
                target = list(self.tokenizer(str(answer), add_special_tokens=False)["input_ids"])
                target += [eos] if eos is not None else []
                labels.append([-100] * len(sequences[index]) + target)
                sequences[index] = sequences[index] + target
        side = padding_side or ("right" if answers is not None else "left")
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
        longest = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        label_tensor = torch.full((len(sequences), longest), -100, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            span = slice(0, len(sequence)) if side == "right" else slice(longest - len(sequence), longest)
            input_ids[row, span] = torch.tensor(sequence)
            attention_mask[row, span] = 1
            if labels is not None:
                label_tensor[row, span] = torch.tensor(labels[row])

        flat = [to_rgb(image) for sample in per_sample for image in sample]
        pixels = torch.as_tensor(np.asarray(self.image_processor(flat, return_tensors="np")["pixel_values"]))
        max_images = max(len(s) for s in per_sample)
        pixel_values = pixels.new_zeros(len(per_sample), max_images, *pixels.shape[1:])
        image_mask = torch.zeros(len(per_sample), max_images, dtype=torch.bool)
        start = 0
        for row, sample in enumerate(per_sample):
            pixel_values[row, : len(sample)] = pixels[start : start + len(sample)]
            image_mask[row, : len(sample)] = True
            start += len(sample)
        data = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_mask": image_mask,
        }
        if labels is not None:
            data["labels"] = label_tensor
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        """Forwards to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Forwards to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """`ProcessorMixin.apply_chat_template`; a conversation the template refuses (see `mivc_chat_template`)
        raises ValueError with the template's message, instead of jinja's TemplateError."""
        from jinja2 import TemplateError

        try:
            return super().apply_chat_template(conversation, *args, **kwargs)
        except TemplateError as error:
            raise ValueError(str(error)) from error

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode generated ids (a batch) to texts (used by the image-text-to-text pipeline)."""
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_mask"]
