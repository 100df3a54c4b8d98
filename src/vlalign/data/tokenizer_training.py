"""A tokenizer trained on the training split's own captions (offline, with the `tokenizers` library), and how well a
tokenizer fits a split's captions (the share of unknown tokens and of captions cut at max_length).

- `train_caption_tokenizer(captions, kind, vocab_size, model_max_length)`: a BERT-style WordPiece (`kind="wordpiece"`:
  [PAD] [UNK] [CLS] [SEP] [MASK], lowercased, split at whitespace and punctuation, "[CLS] text [SEP]") or a
  RoBERTa-style byte-level BPE (`kind="bpe"`: <s> <pad> </s> <unk> <mask>, cased, "<s> text </s>") as a transformers
  `PreTrainedTokenizerFast`, which saves as tokenizer.json and loads with `AutoTokenizer` anywhere.
- `captions_of_split(dataset, caption_column, ...)`: the sanitised captions of a split's rows, all of a list cell.
- `caption_sample(...)` and `measure_caption_fit(tokenizer, captions, max_length)` -> `CaptionFit`.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets

from .decoding import DEFAULT_MAX_CAPTION_CHARS, DataIssueCounts, _usable_captions

__all__ = [
    "BPE_SPECIAL_TOKENS",
    "MIN_TOKENIZER_VOCAB_SIZE",
    "TOKENIZER_KINDS",
    "WORDPIECE_SPECIAL_TOKENS",
    "CaptionFit",
    "caption_sample",
    "captions_of_split",
    "measure_caption_fit",
    "train_caption_tokenizer",
]

TOKENIZER_KINDS = ("wordpiece", "bpe")
# in id order, as BERT's and RoBERTa's vocabularies have them (pad 0 / 1, mask 4 in both here)
WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# byte-level BPE starts from 256 byte tokens plus the 5 special ones; below this a vocabulary has no room to learn
MIN_TOKENIZER_VOCAB_SIZE = 300
# WordPiece always holds these characters, at the start of a word and inside one ("##x"), so that a word of plain
# ASCII that the training captions never had is spelled in pieces rather than becoming [UNK]
_WORDPIECE_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def captions_of_split(
    dataset, caption_column: str, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS, max_rows: int | None = None
) -> Iterator[str]:
    """The captions of `dataset`'s rows in order (all of them where a cell holds a list), sanitised as the collator
    sanitises them (`sanitise_caption`: unusable ones dropped, over-long ones cut to `max_caption_chars`). Only the
    caption column is read. `max_rows` bounds the rows read (needed for a `datasets.IterableDataset`, which may not
    end)."""
    if max_rows is not None:
        _check_positive_int("max_rows", max_rows)
    if caption_column not in (dataset.column_names or [caption_column]):
        raise ValueError(f"caption_column={caption_column!r} not found; available columns: {dataset.column_names}")
    dataset = dataset.select_columns([caption_column])
    if isinstance(dataset, datasets.Dataset):
        if max_rows is not None and max_rows < len(dataset):
            dataset = dataset.select(range(max_rows))
    elif max_rows is not None:
        dataset = dataset.take(max_rows)
    issues = DataIssueCounts()  # the collator counts the data issues of training; these reads are not training
    # a map-style split in typed column batches; a stream row by row (datasets 4.0 cannot batch rows of a stream
    # whose cells are None in some and lists in others)
    cells = (
        (cell for batch in dataset.iter(batch_size=1000) for cell in batch[caption_column])
        if isinstance(dataset, datasets.Dataset)
        else (row[caption_column] for row in dataset)
    )
    for cell in cells:
        yield from _usable_captions(cell, max_caption_chars, issues)


def caption_sample(
    dataset, caption_column: str, max_captions: int = 2000, max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
) -> list[str]:
    """Up to `max_captions` captions of a split (`captions_of_split`), spread evenly over the captions of up to
    `max_captions` rows: rows spread evenly over a map-style dataset (data sorted by topic is sampled across
    topics), the first rows of a stream."""
    _check_positive_int("max_captions", max_captions)
    if isinstance(dataset, datasets.Dataset) and len(dataset) > max_captions:
        step = len(dataset) / max_captions
        dataset = dataset.select([int(i * step) for i in range(max_captions)])
    rows = None if isinstance(dataset, datasets.Dataset) else max_captions
    captions = list(captions_of_split(dataset, caption_column, max_caption_chars, rows))
    if len(captions) > max_captions:
        step = len(captions) / max_captions
        captions = [captions[int(i * step)] for i in range(max_captions)]
    return captions


def train_caption_tokenizer(
    captions: Iterable[str], kind: str = "wordpiece", vocab_size: int = 8000, model_max_length: int = 64
):
    """A tokenizer trained on `captions` (an iterable of str, read once), as a `PreTrainedTokenizerFast` with
    `model_max_length`; the same captions give the same vocabulary.

    `kind="wordpiece"`: BERT-style (uncased): ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK]; text is lowercased
    (accents kept), split at whitespace and punctuation and encoded as "[CLS] text [SEP]"; ASCII letters, digits and
    punctuation are always in the vocabulary, so only other unseen characters become [UNK]. At most `vocab_size`
    tokens.
    `kind="bpe"`: RoBERTa-style byte-level BPE (cased): ids 0-4 are <s> <pad> </s> <unk> <mask>; every word starts
    with a space marker (the first one too, so a word is the same token wherever it stands) and any text encodes
    without an unknown token, as "<s> text </s>". `vocab_size` tokens, or fewer when the captions have fewer merges.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"kind must be one of {TOKENIZER_KINDS}, got {kind!r}")
    _check_positive_int("vocab_size", vocab_size, MIN_TOKENIZER_VOCAB_SIZE)
    _check_positive_int("model_max_length", model_max_length, 3)  # the two special tokens and one of text
    texts = (caption for caption in captions if isinstance(caption, str))
    if kind == "wordpiece":
        special = list(WORDPIECE_SPECIAL_TOKENS)
        tokenizer = Tokenizer(models.WordPiece(vocab=_wordpiece_vocab(texts, vocab_size), unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        tokenizer.add_special_tokens(special)
        vocab = tokenizer.get_vocab()
        cls, sep = ("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
        )
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        special = list(BPE_SPECIAL_TOKENS)
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        tokenizer.decoder = decoders.ByteLevel()
        vocab = tokenizer.get_vocab()
        tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]), trim_offsets=True, add_prefix_space=True
        )
        names = dict(
            bos_token="<s>",
            eos_token="</s>",
            cls_token="<s>",
            sep_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
            mask_token="<mask>",
        )
    if [vocab[token] for token in special] != list(range(len(special))):
        raise RuntimeError(f"the special tokens did not get ids 0-{len(special) - 1}: {vocab}")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **names)


# Private-use code points (plane 15) that stand for the alphabet's characters while the WordPiece merges are learnt:
# character k of the alphabet is _PRIVATE_BASE + 2k at the start of a word and _PRIVATE_BASE + 2k + 1 inside one
_PRIVATE_BASE = 0xF0000


def _wordpiece_vocab(texts: Iterable[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary ([PAD] [UNK] [CLS] [SEP] [MASK], then the alphabet, then merged pieces) learnt as BPE
    merges over the lowercased words of `texts`, at most `vocab_size` tokens.

    tokenizers' own WordPieceTrainer gives the continuation pieces ("##x") their ids in hash-map order, which breaks
    ties between equally frequent merges differently from one process to the next: two processes of one run (or a
    run and its resumption) would train different vocabularies. Here every piece of the alphabet, in both forms, is a
    character of its own with a fixed code point, so BPE's ties are broken the same way every time."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters: Counter = Counter()
    for word, count in words.items():
        for character in word:
            characters[character] += count
    # the alphabet, in both forms, takes at most half of the room left after the special tokens
    room = vocab_size - len(WORDPIECE_SPECIAL_TOKENS)
    frequent = sorted(set(characters) - set(_WORDPIECE_ALPHABET), key=lambda c: (-characters[c], c))
    alphabet = sorted(set(_WORDPIECE_ALPHABET) | set(frequent[: max(0, room // 4 - len(_WORDPIECE_ALPHABET))]))
    first = {c: chr(_PRIVATE_BASE + 2 * k) for k, c in enumerate(alphabet)}
    inside = str.maketrans({c: chr(_PRIVATE_BASE + 2 * k + 1) for k, c in enumerate(alphabet)})
    back = {chr(_PRIVATE_BASE + 2 * k): c for k, c in enumerate(alphabet)}
    back.update({chr(_PRIVATE_BASE + 2 * k + 1): c for k, c in enumerate(alphabet)})

    def encoded_words() -> Iterator[str]:
        for word in sorted(words):
            if all(c in first for c in word):  # a word with a character outside the alphabet encodes as [UNK]
                yield " ".join([first[word[0]] + word[1:].translate(inside)] * words[word])

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=room, initial_alphabet=list(back), show_progress=False)
    learner.train_from_iterator(encoded_words(), trainer=trainer)
    pieces = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    vocab = {token: index for index, token in enumerate(WORDPIECE_SPECIAL_TOKENS)}
    for piece, _ in pieces:
        text = "".join(back[c] for c in piece)
        vocab.setdefault(text if ord(piece[0]) % 2 == 0 else "##" + text, len(vocab))
    return vocab


@dataclass(frozen=True)
class CaptionFit:
    """How a tokenizer fits a sample of captions: `num_unknown` of their `num_tokens` tokens (special tokens not
    counted) are the unknown token, and `num_truncated` of the `num_captions` captions are longer than `max_length`
    tokens (special tokens counted), so the processor cuts them."""

    num_captions: int
    num_tokens: int
    num_unknown: int
    num_truncated: int
    max_length: int

    @property
    def unknown_share(self) -> float:
        return self.num_unknown / self.num_tokens if self.num_tokens else 0.0

    @property
    def truncated_share(self) -> float:
        return self.num_truncated / self.num_captions if self.num_captions else 0.0


def measure_caption_fit(tokenizer, captions: Iterable[str], max_length: int) -> CaptionFit:
    """`CaptionFit` of `captions` with `tokenizer` when captions are cut at `max_length` tokens (the processor's)."""
    _check_positive_int("max_length", max_length)
    captions = [caption for caption in captions if isinstance(caption, str)]
    special = tokenizer.num_special_tokens_to_add(pair=False)
    unk = tokenizer.unk_token_id
    num_tokens = num_unknown = num_truncated = 0
    for start in range(0, len(captions), 256):
        # verbose=False: a caption longer than model_max_length is what is measured here, not worth a warning
        encoded = tokenizer(captions[start : start + 256], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            num_tokens += len(ids)
            num_unknown += ids.count(unk) if unk is not None else 0
            num_truncated += len(ids) + special > max_length
    return CaptionFit(len(captions), num_tokens, num_unknown, num_truncated, int(max_length))
