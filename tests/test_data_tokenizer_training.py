"""vlalign.data.tokenizer_training: a WordPiece or byte-level BPE tokenizer trained on captions (the same vocabulary
every time, special tokens at their BERT / RoBERTa ids, truncation at model_max_length, saved and loaded by
AutoTokenizer), the sanitised captions of a split (map-style or streamed), and how a tokenizer fits them."""

from __future__ import annotations

import random

import datasets
import pytest
from PIL import Image
from transformers import AutoTokenizer, ViTImageProcessorPil

from vlalign import VLAlignProcessor
from vlalign.data import (
    BPE_SPECIAL_TOKENS,
    TOKENIZER_KINDS,
    WORDPIECE_SPECIAL_TOKENS,
    build_digits_tokenizer,
    caption_sample,
    captions_of_split,
    measure_caption_fit,
    train_caption_tokenizer,
)

CAPTIONS = [
    f"a {colour} {animal} {place}"
    for colour in ("red", "green", "purple", "yellow")
    for animal in ("giraffe", "umbrella bird", "lantern fish", "hedgehog")
    for place in ("in a meadow", "under the bridge", "beside a lighthouse.")
]


def random_captions(count: int, seed: int = 0) -> list[str]:
    """Captions of made-up words: many distinct merges, so that a vocabulary fills up to its size."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(8)) for _ in range(count)]


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_the_same_captions_give_the_same_vocabulary_in_any_order(kind):
    """Every process of a run (and the run that resumes it) trains its own tokenizer: they must agree exactly.
    tokenizers' own WordPieceTrainer breaks ties in hash-map order and gave a different vocabulary almost every time
    on these captions."""
    captions = random_captions(300) + CAPTIONS
    first = train_caption_tokenizer(captions, kind, vocab_size=400).get_vocab()
    shuffled = list(captions)
    random.Random(1).shuffle(shuffled)
    for again in (captions, shuffled, captions):
        assert train_caption_tokenizer(iter(again), kind, vocab_size=400).get_vocab() == first


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_the_vocabulary_has_the_size_asked_for_when_the_captions_have_enough_merges(kind):
    tokenizer = train_caption_tokenizer(random_captions(500), kind, vocab_size=600)
    assert len(tokenizer) == 600
    small = train_caption_tokenizer(CAPTIONS, kind, vocab_size=600)  # few words: fewer merges to learn
    assert len(small) < 600


def test_wordpiece_is_bert_style():
    tokenizer = train_caption_tokenizer(CAPTIONS, "wordpiece", vocab_size=300, model_max_length=16)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in WORDPIECE_SPECIAL_TOKENS}
    assert ids == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.mask_token_id) == (0, 1, 4)
    assert (tokenizer.cls_token_id, tokenizer.sep_token_id) == (2, 3)
    assert tokenizer.model_max_length == 16
    encoded = tokenizer("A Giraffe, beside a LIGHTHOUSE.")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(encoded)
    assert tokens == ["[CLS]", "a", "giraffe", ",", "beside", "a", "lighthouse", ".", "[SEP]"]  # lowercased, split
    # an ASCII word never seen is spelled in pieces, never [UNK]; only a character outside ASCII that the captions
    # never had is unknown
    unseen = tokenizer.convert_ids_to_tokens(tokenizer("zebra quiz", add_special_tokens=False)["input_ids"])
    assert "[UNK]" not in unseen and "".join(t.removeprefix("##") for t in unseen) == "zebraquiz"
    assert tokenizer.convert_ids_to_tokens(tokenizer("漢", add_special_tokens=False)["input_ids"]) == ["[UNK]"]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a giraffe, beside a lighthouse."


def test_bpe_is_roberta_style_and_has_no_unknown_token():
    tokenizer = train_caption_tokenizer(CAPTIONS, "bpe", vocab_size=400, model_max_length=16)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in BPE_SPECIAL_TOKENS}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    assert (tokenizer.bos_token_id, tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id) == (
        0,
        0,
        2,
        2,
    )
    assert (tokenizer.pad_token_id, tokenizer.mask_token_id) == (1, 4)
    encoded = tokenizer("a giraffe")["input_ids"]
    assert encoded[0] == 0 and encoded[-1] == 2
    # a word is the same token first in a caption and after a space
    assert tokenizer("giraffe", add_special_tokens=False)["input_ids"] == encoded[2:-1]
    odd = tokenizer("漢字 🦒 zebra", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in odd
    assert tokenizer.decode(odd).strip() == "漢字 🦒 zebra"


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_a_word_of_the_captions_is_one_token(kind):
    tokenizer = train_caption_tokenizer(CAPTIONS * 4, kind, vocab_size=400)
    for word in ("giraffe", "lighthouse", "hedgehog", "purple"):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, (word, tokenizer.convert_ids_to_tokens(ids))


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_captions_are_cut_at_max_length_ending_with_the_end_token(kind):
    tokenizer = train_caption_tokenizer(CAPTIONS, kind, vocab_size=400, model_max_length=6)
    long = "a red giraffe in a meadow beside a lighthouse under the bridge"
    encoded = tokenizer(long, truncation=True)["input_ids"]
    assert len(encoded) == 6 and encoded[-1] == tokenizer.sep_token_id
    assert len(tokenizer(long)["input_ids"]) > 6
    processor = VLAlignProcessor(
        image_processor=ViTImageProcessorPil(size={"height": 8, "width": 8}), tokenizer=tokenizer, max_length=6
    )
    batch = processor(images=[Image.new("RGB", (8, 8))] * 2, text=[long, "a giraffe"])
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].sum(dim=1).tolist() == [6, len(tokenizer("a giraffe")["input_ids"])]
    assert batch["input_ids"][1, -1].item() == tokenizer.pad_token_id


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_the_saved_tokenizer_loads_with_auto_tokenizer_and_encodes_the_same(kind, tmp_path):
    tokenizer = train_caption_tokenizer(CAPTIONS, kind, vocab_size=400, model_max_length=12)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab() and loaded.model_max_length == 12
    text = ["a purple hedgehog under the bridge", "zebra 🦒"]
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.mask_token_id, loaded.pad_token_id, loaded.unk_token_id) == (
        tokenizer.mask_token_id,
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="sentencepiece"), r"kind must be one of \('wordpiece', 'bpe'\), got 'sentencepiece'"),
        (dict(vocab_size=299), r"vocab_size must be an integer >= 300, got 299"),
        (dict(vocab_size=True), r"vocab_size must be an integer >= 300, got True"),
        (dict(model_max_length=2), r"model_max_length must be an integer >= 3, got 2"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_caption_tokenizer(CAPTIONS, **kwargs)


def _split(captions: list) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": [None] * len(captions), "caption": captions})


def test_captions_of_split_takes_every_caption_of_a_row_sanitised_as_the_collator_does():
    split = _split([["a red giraffe", "  ", "a\x00 green\x07 hedgehog"], None, ["a lighthouse"], [], ["x" * 50]])
    assert list(captions_of_split(split, "caption", max_caption_chars=10)) == [
        "a red gira",
        "a green ",  # cut to 10 characters, then the control characters removed
        "a lighthou",
        "x" * 10,
    ]
    assert list(captions_of_split(split, "caption", max_rows=1)) == ["a red giraffe", "a green hedgehog"]
    stream = split.to_iterable_dataset()
    assert list(captions_of_split(stream, "caption", max_rows=3)) == [
        "a red giraffe",
        "a green hedgehog",
        "a lighthouse",
    ]
    with pytest.raises(ValueError, match=r"caption_column='text' not found; available columns: \['image', 'caption'\]"):
        list(captions_of_split(split, "text"))


def test_caption_sample_spreads_over_a_sorted_split_and_is_bounded():
    split = _split([[f"row {i} first", f"row {i} second"] for i in range(100)])
    sample = caption_sample(split, "caption", max_captions=10)
    assert len(sample) == 10
    rows = sorted({int(caption.split()[1]) for caption in sample})
    assert rows[0] < 10 and rows[-1] >= 80  # from the whole split, not only its first rows
    stream = caption_sample(split.to_iterable_dataset(), "caption", max_captions=10)
    assert len(stream) == 10 and all(int(caption.split()[1]) < 10 for caption in stream)  # a stream's first rows
    assert caption_sample(_split(["a giraffe"]), "caption") == ["a giraffe"]


def test_measure_caption_fit_counts_unknown_tokens_and_cut_captions():
    tokenizer = build_digits_tokenizer()  # [CLS] ... [SEP]; unknown characters become [UNK]
    captions = [
        "a handwritten digit seven",  # 4 tokens + 2: fits max_length 6
        "a handwritten digit 漢",  # 4 tokens, one unknown
        "the number 7 written by hand",  # 6 tokens + 2: cut
    ]
    fit = measure_caption_fit(tokenizer, captions, max_length=6)
    assert (fit.num_captions, fit.num_tokens, fit.num_unknown, fit.num_truncated) == (3, 14, 1, 1)
    assert fit.unknown_share == pytest.approx(1 / 14) and fit.truncated_share == pytest.approx(1 / 3)
    assert measure_caption_fit(tokenizer, captions, max_length=8).num_truncated == 0
    empty = measure_caption_fit(tokenizer, [], max_length=8)
    assert (empty.unknown_share, empty.truncated_share) == (0.0, 0.0)
