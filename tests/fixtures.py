"""The tiny configurations and inputs every test builds on: random tiny models, nothing downloaded; and the data
builders several test modules share (good and hostile image files, rows of hostile data, parquet splits, streaming
shards).

Test modules import what they need from here (`from fixtures import tiny_tcl_config`); pytest's own fixtures are in
conftest.py. No test module imports another.
"""

import functools
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_VISION = dict(
    model_type="vit",
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)
TINY_TEXT = dict(
    model_type="bert",
    vocab_size=144,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    pad_token_id=0,
)


# A script prefix that makes `import vlalign` fail, so a subprocess proves that a saved folder loads through
# transformers' remote code alone (the script can end by importing vlalign and expect the ImportError).
# one tiny config per supported tower family (towers.py), 16 px images: a 4x4 output grid for every vision family
# (Swin and ConvNeXt: 2 px stem, one 2x downsampling); text families share the 144-token vocabulary
FAMILY_VISION = {
    "vit": dict(TINY_VISION),
    "deit": dict(TINY_VISION, model_type="deit"),
    "beit": dict(TINY_VISION, model_type="beit"),  # use_mean_pooling: pooled by its normed mean patch token
    "data2vec-vision": dict(TINY_VISION, model_type="data2vec-vision"),
    "dinov2": dict(TINY_VISION, model_type="dinov2", mlp_ratio=2),
    "dinov2_with_registers": dict(TINY_VISION, model_type="dinov2_with_registers", mlp_ratio=2, num_register_tokens=2),
    "clip_vision_model": dict(TINY_VISION, model_type="clip_vision_model"),
    "vit_msn": dict(TINY_VISION, model_type="vit_msn"),
    "siglip_vision_model": dict(TINY_VISION, model_type="siglip_vision_model"),
    "swin": dict(model_type="swin", image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                 window_size=4),
    "convnext": dict(model_type="convnext", image_size=16, patch_size=2, hidden_sizes=[16, 32], depths=[1, 1],
                     num_stages=2),
}  # fmt: skip
FAMILY_TEXT_IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
FAMILY_TEXT = {
    "bert": dict(TINY_TEXT),
    "roberta": dict(TINY_TEXT, model_type="roberta", max_position_embeddings=40, **FAMILY_TEXT_IDS),
    "xlm-roberta": dict(TINY_TEXT, model_type="xlm-roberta", max_position_embeddings=40, **FAMILY_TEXT_IDS),
    "electra": dict(TINY_TEXT, model_type="electra", embedding_size=16),
    "distilbert": dict(model_type="distilbert", vocab_size=144, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "modernbert": dict(
        model_type="modernbert", vocab_size=144, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, pad_token_id=0, bos_token_id=2, cls_token_id=2, eos_token_id=3, sep_token_id=3,
    ),
    "clip_text_model": dict(
        model_type="clip_text_model", vocab_size=144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, **FAMILY_TEXT_IDS,
    ),
    "siglip_text_model": dict(
        model_type="siglip_text_model", vocab_size=144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, **FAMILY_TEXT_IDS,
    ),
}  # fmt: skip

BLOCK_VLALIGN = """import sys
sys.path = [p for p in sys.path if 'vlalign' not in p and not p.endswith('/src')]
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'vlalign' or name.startswith('vlalign.'):
            raise ImportError('vlalign is blocked in this test')
sys.meta_path.insert(0, Block())
"""

# The `model` section of a training-script config for a tiny TCL model (training/train.py tests).
TINY_TRAIN_MODEL = {
    "vision_config": {
        "model_type": "vit",
        "image_size": 16,
        "patch_size": 4,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    },
    "text_config": {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
    },
    "num_fusion_layers": 1,
    "embed_dim": 16,
    "queue_size": 64,
    "lmi_image_grid": 2,
}


def tiny_tcl_config(**overrides):
    from vlalign import TCLConfig

    kwargs = dict(
        vision_config=dict(TINY_VISION),
        text_config=dict(TINY_TEXT),
        num_fusion_layers=1,
        embed_dim=16,
        queue_size=32,
        mask_token_id=4,
        lmi_image_grid=2,
    )
    kwargs.update(overrides)
    return TCLConfig(**kwargs)


def tiny_codis_config(**overrides):
    from vlalign import CODISConfig

    kwargs = dict(
        vision_config=dict(TINY_VISION),
        text_config=dict(TINY_TEXT),
        num_fusion_layers=1,
        embed_dim=16,
        queue_size=32,
        mask_token_id=4,
        codebook_size=12,
    )
    kwargs.update(overrides)
    return CODISConfig(**kwargs)


def tiny_batch(batch=4, length=8, seed=0, image_size=16):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 144, (batch, length), generator=g)
    input_ids[:, 0] = 2
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(batch, 3, image_size, image_size, generator=g),
        pixel_values_view2=torch.randn(batch, 3, image_size, image_size, generator=g),
    )


# A tiny MIVC model: ViT tower, Q-Former and a one-layer Llama
MIVC_VISION = dict(
    model_type="vit",
    image_size=16,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
)
MIVC_LLAMA = dict(
    model_type="llama",
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)  # the LM's output layer shares the input embeddings
MIVC_QFORMER = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)


def tiny_mivc_config(**overrides):
    from vlalign import MIVCConfig

    kwargs = dict(
        vision_config=dict(MIVC_VISION),
        text_config=dict(MIVC_LLAMA),
        qformer_config=dict(MIVC_QFORMER),
        num_query_tokens=4,
        image_token_id=5,
        pooling_attention_dim=8,
    )
    kwargs.update(overrides)
    return MIVCConfig(**kwargs)


# The MIVC model of test_modeling_mivc.py and test_configuration.py: 32x32 images in 8x8 patches (16 tokens per image),
# a Q-Former narrower than the vision tower (the config sets its encoder_hidden_size), and a Llama of the size of the
# digits tokenizer with `<image>` added (145 tokens, <image> = 144; bos / eos / pad as that tokenizer's).
MIVC_DIGITS_VISION = dict(
    model_type="vit",
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    intermediate_size=64,
)
MIVC_DIGITS_QFORMER = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
MIVC_DIGITS_NUM_QUERIES = 4
MIVC_DIGITS_LLAMA = dict(
    model_type="llama",
    vocab_size=145,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=64,
    max_position_embeddings=256,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=0,
)
MIVC_DIGITS_IMAGE_TOKEN_ID = 144


@functools.cache
def mivc_digits_tokenizer():
    """The digits tokenizer with `<image>` added and [CLS] / [SEP] as bos / eos: what the MIVC_DIGITS sizes and ids
    above describe (test_modeling_mivc.py checks that they agree)."""
    from vlalign.data import build_digits_tokenizer

    tok = build_digits_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "bos_token": "[CLS]", "eos_token": "[SEP]"})
    return tok


def tiny_mivc_digits_config(mode="attention", qformer=False, granularity="token", **overrides):
    """test_modeling_mivc's `_config` without loading the tokenizer (its sizes and special ids written out)."""
    from vlalign import MIVCConfig

    kwargs = dict(
        vision_config=dict(MIVC_DIGITS_VISION),
        text_config=dict(MIVC_DIGITS_LLAMA),
        qformer_config=dict(MIVC_DIGITS_QFORMER) if qformer else None,
        num_query_tokens=MIVC_DIGITS_NUM_QUERIES,
        image_token_id=MIVC_DIGITS_IMAGE_TOKEN_ID,
        pooling_mode=mode,
        pooling_granularity=granularity,
        pooling_attention_dim=16,
        freeze_vision_model=False,
        freeze_language_model=False,
    )
    kwargs.update(overrides)
    return MIVCConfig(**kwargs)


# The `model` section of a training-script config for a tiny MIVC model (training/train.py tests).
TINY_TRAIN_MIVC = {
    "model_type": "mivc",
    "vision_config": {
        "model_type": "vit",
        "image_size": 16,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    },
    "text_config": {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
    "pooling_mode": "gated_attention",
    "pooling_attention_dim": 16,
    "freeze_vision_model": False,
    "freeze_language_model": False,
}


# ---------------------------------------------------------------------------------------------------------------------
# Attention kernels: counting which path a forward takes

EAGER_ATTENTION_MODULES = ("vit", "bert", "llama", "blip_2")


def count_attention_calls(monkeypatch):
    """Counts of transformers' eager-kernel and torch's SDPA calls from now on (the patches end with the test)."""
    import importlib

    counts = {"eager": 0, "sdpa": 0}
    for name in EAGER_ATTENTION_MODULES:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        original = module.eager_attention_forward

        def counting_eager(*args, _original=original, **kwargs):
            counts["eager"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "eager_attention_forward", counting_eager)
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return original_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Image files, good and hostile (corrupt, truncated, empty, oversized, unusual colour modes)


def png_bytes(value=128, size=(12, 10), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size, value if mode != "RGB" else (value, 255 - value, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_values():
    good = png_bytes(50, size=(40, 40))
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(noisy, "PNG")
    return {
        "truncated": noisy.getvalue()[: len(noisy.getvalue()) // 2],
        "zero-byte": b"",
        "garbage": b"definitely not an image" * 20,
        "header only": good[:24],
    }


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise_image(size=64, seed=0) -> Image.Image:
    """Incompressible pixels: the image data fills most of the file, so cutting the file cuts the pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncated_png() -> bytes:
    data = encode(noise_image())
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = encode(noise_image(), "JPEG", quality=95)
    return data[: len(data) // 2]


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (a decompression bomb as far as the header goes): IHDR is the
    first chunk, its width and height at bytes 16..23 and its CRC (over type + data) at 29..32."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(data[12:29]))
    return bytes(data)


def cmyk_jpeg(cmyk) -> bytes:
    return encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=100)


def rgba_png() -> bytes:
    """Row 0: fully transparent black, opaque red, half-transparent black."""
    pixels = np.array([[[0, 0, 0, 0], [200, 10, 10, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    return encode(Image.fromarray(pixels, "RGBA"))


def palette_png_with_transparency() -> bytes:
    """Palette image: index 0 (black) is transparent, index 1 is opaque blue."""
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    return encode(image, transparency=0)


def gray16_png(values) -> bytes:
    image = Image.fromarray(np.array([values], dtype=np.uint16))
    assert image.mode == "I;16"
    return encode(image)


def one_by_one_png() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 200, 30)))


def one_bit_png() -> bytes:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    return encode(image)


def la_png() -> bytes:
    return encode(Image.fromarray(np.array([[[50, 0], [50, 255]]], dtype=np.uint8), "LA"))


@functools.cache
def sklearn_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit_png(index: int, size: int = 16) -> bytes:
    pixels = (255 - sklearn_digits().images[index] * 255 / 16).astype(np.uint8)
    return encode(Image.fromarray(pixels).resize((size, size)))


# ---------------------------------------------------------------------------------------------------------------------
# Rows of hostile data (every bad image and caption case) and parquet splits of digit scans


# ---------------------------------------------------------------- a hostile dataset


def hostile_rows(tmp_path: Path) -> tuple[list[dict], dict[str, int]]:
    """Rows with every hostile image and caption case (bad images carry good captions and vice versa), and the
    counts a collator must report for them. Images as datasets cells: embedded bytes or file paths."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    good_caption = "a handwritten digit one"
    bad_images = [
        {"bytes": truncated_png(), "path": None},
        {"bytes": None, "path": str(tmp_path / "cut.jpg")},
        {"bytes": None, "path": str(tmp_path / "empty.png")},
        {"bytes": b"\x89PNG\r\n\x1a\n but not really", "path": None},
        {"bytes": None, "path": str(tmp_path / "missing.png")},
        {"bytes": png_claiming_size(30_000, 30_000), "path": None},
    ]
    odd_images = [
        cmyk_jpeg((255, 0, 0, 0)),
        rgba_png(),
        palette_png_with_transparency(),
        gray16_png([0, 65535]),
        one_by_one_png(),
        one_bit_png(),
        la_png(),
    ]
    bad_captions = [None, b"", b"   "]
    fixable_captions = [
        b"a handwritten digit one" * 50_000,
        b"a handwritten \xff digit one",
        b"a handwritten\x00 digit one",
    ]
    rows = [{"image": image, "caption": good_caption} for image in bad_images]
    rows += [{"image": {"bytes": data, "path": None}, "caption": good_caption} for data in odd_images]
    rows += [
        {"image": {"bytes": digit_png(1), "path": None}, "caption": caption}
        for caption in bad_captions + fixable_captions
    ]
    expected = {
        "images_skipped": 6,
        "images_skipped_truncated": 2,
        "images_skipped_empty_file": 1,
        "images_skipped_corrupt": 1,
        "images_skipped_file_not_found": 1,
        "images_skipped_too_large": 1,
        "captions_skipped": 3,
        "captions_skipped_missing": 1,
        "captions_skipped_empty": 2,
        "captions_sanitised": 3,
        "captions_sanitised_too_long": 1,
        "captions_sanitised_invalid_utf8": 1,
        "captions_sanitised_control_chars": 1,
    }
    return rows, expected


def as_bytes(caption):
    """Captions of a binary column (web data often arrives as bytes; str and bytes cannot share an Arrow column)."""
    return caption.encode() if isinstance(caption, str) else caption


# ---------------------------------------------------------------- end to end: a training run on hostile data


def write_split(path: Path, rows: list[dict], num_good: int, first_digit: int) -> None:
    """A parquet split: `num_good` real digit scans with byte captions, then `rows` (labels cycle 0..9)."""
    import datasets

    from vlalign.data import DIGIT_NAMES

    target = sklearn_digits().target
    good = [
        {
            "image": {"bytes": digit_png(first_digit + i), "path": None},
            "caption": f"a handwritten digit {DIGIT_NAMES[target[first_digit + i]]}".encode(),
            "label": int(target[first_digit + i]),
        }
        for i in range(num_good)
    ]
    hostile = [
        {"image": row["image"], "label": i % 10, "caption": as_bytes(row["caption"])} for i, row in enumerate(rows)
    ]
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("binary"), "label": datasets.Value("int64")}
    )
    # an explicit batch size: datasets would otherwise stat every image path (one is missing) to estimate it
    datasets.Dataset.from_list(good + hostile, features=features).to_parquet(str(path), batch_size=1000)


# ---------------------------------------------------------------------------------------------------------------------
# Streaming shards: scikit-learn's real handwritten digits as parquet and WebDataset-style tar shards (one undecodable
# image), for the streaming tests of vlalign.data and training/train.py (conftest.py's `shards` fixture)

NUM_SHARDS, ROWS_PER_SHARD, NUM_TEST = 3, 20, 12
CORRUPT = (1, 2)  # (shard, row): the 23rd row in file order
CORRUPT_BYTES = b"\x89PNG\r\n\x1a\n not really a png"


def digit_shard_rows():
    """(train shards, test rows): dicts with png bytes, caption, label (int) and label name."""
    from vlalign.data import DIGIT_NAMES
    from vlalign.data.digits import _digit_to_png

    digits = sklearn_digits()
    rows = []
    for index in range(NUM_SHARDS * ROWS_PER_SHARD + NUM_TEST):
        label = int(digits.target[index])
        rows.append(
            {
                "png": _digit_to_png(digits.data[index], 16),
                "caption": f"a handwritten digit {DIGIT_NAMES[label]}",
                "label": label,
                "name": DIGIT_NAMES[label],
            }
        )
    shards = [rows[s * ROWS_PER_SHARD : (s + 1) * ROWS_PER_SHARD] for s in range(NUM_SHARDS)]
    shards[CORRUPT[0]][CORRUPT[1]]["png"] = CORRUPT_BYTES
    return shards, rows[NUM_SHARDS * ROWS_PER_SHARD :]


def write_parquet_shard(path: Path, rows) -> None:
    """Image column as {"bytes", "path"} structs, as pyarrow writes them (no datasets Image feature)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [
            {
                "image": {"bytes": r["png"], "path": None},
                "caption": r["caption"],
                "label": r["label"],
                "name": r["name"],
            }
            for r in rows
        ]
    )
    pq.write_table(table, path)


def write_tar_shard(path: Path, rows, prefix: str) -> None:
    """WebDataset layout: NNNN.png, NNNN.txt (caption), NNNN.cls (label) and NNNN.json ({"label": ...})."""
    with tarfile.open(path, "w") as tar:
        for i, r in enumerate(rows):
            files = {
                "png": r["png"],
                "txt": r["caption"].encode(),
                "cls": str(r["label"]).encode(),
                "json": json.dumps({"label": r["label"]}).encode(),
            }
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{prefix}{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_digit_shards(root: Path) -> Path:
    """`root/parquet/{train-0000N,test-00000}.parquet` and `root/wds/{train-0000N,test-00000}.tar`."""
    train, test = digit_shard_rows()
    (root / "parquet").mkdir()
    (root / "wds").mkdir()
    for s, rows in enumerate(train):
        write_parquet_shard(root / "parquet" / f"train-{s:05d}.parquet", rows)
        write_tar_shard(root / "wds" / f"train-{s:05d}.tar", rows, prefix=f"{s:02d}")
    write_parquet_shard(root / "parquet" / "test-00000.parquet", test)
    write_tar_shard(root / "wds" / "test-00000.tar", test, prefix="t")
    return root
