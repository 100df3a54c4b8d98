"""Saved folders with a file missing or damaged raise an error that names the file (issue 13).

1. a processor / model folder whose tokenizer.json was deleted (it used to load as a tokenizer of the 5 special
   tokens: every word [UNK], zero-shot scores all equal);
2. a tokenizer larger than the model's text vocabulary (it used to fail later with an IndexError in the embedding);
3. a model folder without its weights file (it used to be reported as a pickle refusal);
4. a truncated weights file (safetensors' own error does not say which file).
"""

import os

import pytest
import torch
from fixtures import TINY_TEXT, TINY_VISION, tiny_codis_config, tiny_tcl_config
from safetensors import SafetensorError
from fixtures import MIVC_LLAMA, MIVC_VISION, tiny_mivc_config
from transformers import AutoProcessor, AutoTokenizer

from vlalign import (
    CODISModel,
    CorruptCheckpointError,
    MissingCheckpointFileError,
    MissingTokenizerFileError,
    MIVCForConditionalGeneration,
    TCLModel,
    UnsafeCheckpointError,
    VLAlignProcessor,
    check_tokenizer_fits_model,
)
from vlalign.data import build_digits_processor, build_digits_tokenizer
from vlalign.data.multiview_digits import build_mivc_digits_processor

MODELS = {"tcl": (TCLModel, tiny_tcl_config), "codis": (CODISModel, tiny_codis_config),
          "mivc": (MIVCForConditionalGeneration, tiny_mivc_config)}


def _model(kind):
    model_class, make_config = MODELS[kind]
    torch.manual_seed(0)
    return model_class(make_config())


def _truncate(file, keep=None):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


# ---------------------------------------------------------------------------------------------------------------
# 1. tokenizer.json deleted


PROCESSORS = {"vlalign": lambda: build_digits_processor(image_size=16),
              "mivc": lambda: build_mivc_digits_processor(image_seq_length=4, image_size=16)}


def _assert_names_tokenizer_json(error, folder):
    message = str(error.value)
    assert "tokenizer.json" in message and str(folder) in message, message
    assert "BertTokenizer" in message and "vocab.txt" in message  # which class, and what else it could read


@pytest.mark.parametrize("kind", sorted(PROCESSORS))
@pytest.mark.parametrize("loader", ["own class", "AutoProcessor"])
def test_processor_without_tokenizer_json_names_the_file_and_the_folder(kind, loader, tmp_path):
    processor = PROCESSORS[kind]()
    processor.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    load = type(processor).from_pretrained if loader == "own class" else AutoProcessor.from_pretrained
    with pytest.raises(MissingTokenizerFileError) as error:
        load(str(tmp_path))
    assert isinstance(error.value, FileNotFoundError)
    _assert_names_tokenizer_json(error, tmp_path)


def test_model_folder_with_processor_files_but_no_tokenizer_json_is_refused(tmp_path):
    """What `pipeline(..., model=folder)` loads: the model, then AutoTokenizer from the same folder (not our
    processor), so the model's from_pretrained checks the tokenizer files saved beside it."""
    from transformers import pipeline

    _model("tcl").save_pretrained(tmp_path)
    build_digits_processor(image_size=16).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(MissingTokenizerFileError) as error:
        TCLModel.from_pretrained(tmp_path)
    _assert_names_tokenizer_json(error, tmp_path)
    # the pipeline reports the model classes it tried, with their errors (ours among them)
    with pytest.raises(ValueError, match=r"(?s)MissingTokenizerFileError: .*has no tokenizer\.json"):
        pipeline("zero-shot-image-classification", model=str(tmp_path))


def _to_vocab_txt(folder, tokenizer):
    """Replace the saved tokenizer.json by the vocab.txt a slow BertTokenizer reads (a legitimate folder)."""
    vocab = tokenizer.get_vocab()
    (folder / "vocab.txt").write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)))
    (folder / "tokenizer.json").unlink()


def test_a_tokenizer_saved_as_vocab_txt_still_loads(tmp_path):
    processor = build_digits_processor(image_size=16)
    model = _model("tcl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    _to_vocab_txt(tmp_path, processor.tokenizer)
    for loaded in (VLAlignProcessor.from_pretrained(tmp_path).tokenizer, AutoTokenizer.from_pretrained(tmp_path)):
        assert len(loaded) == len(processor.tokenizer)
        assert loaded("the digit one")["input_ids"] == processor.tokenizer("the digit one")["input_ids"]
    TCLModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 2. tokenizer larger than the model's text vocabulary


def test_tokenizer_larger_than_the_text_vocabulary_names_both_sizes():
    tokenizer = build_digits_tokenizer(extra_words=[f"word{i}" for i in range(30)])
    config = tiny_tcl_config()
    assert len(tokenizer) > config.text_config.vocab_size == 144
    for target in (config, TCLModel(config)):
        with pytest.raises(ValueError) as error:
            check_tokenizer_fits_model(tokenizer, target)
        message = str(error.value)
        assert f"{len(tokenizer)} tokens" in message and "144" in message, message
        assert "vocab_size" in message
    # what the check prevents: the out-of-range ids fail inside the embedding
    ids = tokenizer(["word29"], return_tensors="pt")["input_ids"]
    with pytest.raises(IndexError):
        TCLModel(config).get_text_features(ids, torch.ones_like(ids))


def test_mivc_language_model_vocabulary_is_checked():
    tokenizer = build_mivc_digits_processor(image_seq_length=4).tokenizer
    config = tiny_mivc_config()  # a 40-token LM
    with pytest.raises(ValueError, match=rf"{len(tokenizer)} tokens .* 40"):
        check_tokenizer_fits_model(tokenizer, config)
    check_tokenizer_fits_model(tokenizer, tiny_mivc_config(text_config=dict(MIVC_LLAMA, vocab_size=len(tokenizer))))


def test_a_tokenizer_that_fits_passes():
    tokenizer = build_digits_tokenizer()
    assert len(tokenizer) == 144
    check_tokenizer_fits_model(tokenizer, tiny_tcl_config())  # equal sizes
    check_tokenizer_fits_model(tokenizer, tiny_tcl_config(text_config=dict(TINY_TEXT, vocab_size=160)))  # padded


# ---------------------------------------------------------------------------------------------------------------
# 3. weights file deleted


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_folder_without_weights_names_the_folder_and_the_expected_files(kind, tmp_path):
    _model(kind).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    for allow_pickle in (False, True):
        with pytest.raises(MissingCheckpointFileError) as error:
            MODELS[kind][0].from_pretrained(tmp_path, allow_pickle=allow_pickle)
        message = str(error.value)
        assert isinstance(error.value, FileNotFoundError) and not isinstance(error.value, UnsafeCheckpointError)
        assert str(tmp_path) in message and "no weights file" in message, message
        assert "model.safetensors " in message and "model.safetensors.index.json" in message
        assert "pickle" not in message.lower()  # no pickle file is there


def test_folder_with_a_missing_shard_names_the_shard(tmp_path):
    _model("tcl").save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(name for name in os.listdir(tmp_path) if name.endswith(".safetensors"))
    assert len(shards) > 2
    (tmp_path / shards[1]).unlink()
    with pytest.raises(MissingCheckpointFileError) as error:
        TCLModel.from_pretrained(tmp_path)
    message = str(error.value)
    assert shards[1] in message and "model.safetensors.index.json" in message and str(tmp_path) in message
    assert "pickle" not in message.lower()


def _vit_and_bert(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, ViTConfig, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})).save_pretrained(tmp_path / "vit")
    BertForMaskedLM(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(
        tmp_path / "bert")
    return str(tmp_path / "vit"), str(tmp_path / "bert")


TOWER_KWARGS = dict(num_fusion_layers=1, embed_dim=16, queue_size=32, mask_token_id=4, lmi_image_grid=2)


@pytest.mark.parametrize("tower", ["vit", "bert"])
def test_a_tower_folder_without_weights_is_named(tower, tmp_path):
    vit, bert = _vit_and_bert(tmp_path)
    (tmp_path / tower / "model.safetensors").unlink()
    with pytest.raises(MissingCheckpointFileError) as error:
        TCLModel.from_vision_text_pretrained(vit, bert, **TOWER_KWARGS)
    assert str(tmp_path / tower) in str(error.value) and "model.safetensors" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# 4. truncated weights file


def _assert_names_truncated(error, file):
    message = str(error.value)
    assert str(file) in message and "truncated" in message, message
    assert isinstance(error.value.__cause__, SafetensorError)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_truncated_weights_name_the_file(kind, tmp_path):
    _model(kind).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    _truncate(file)
    with pytest.raises(CorruptCheckpointError) as error:
        MODELS[kind][0].from_pretrained(tmp_path)
    _assert_names_truncated(error, file)


@pytest.mark.parametrize("keep", [0, 5, 100])
def test_weights_cut_inside_the_header_name_the_file(keep, tmp_path):
    _model("tcl").save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    _truncate(file, keep)
    with pytest.raises(CorruptCheckpointError) as error:
        TCLModel.from_pretrained(tmp_path)
    _assert_names_truncated(error, file)


def test_a_truncated_shard_is_named(tmp_path):
    _model("tcl").save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    _truncate(shard)
    with pytest.raises(CorruptCheckpointError) as error:
        TCLModel.from_pretrained(tmp_path)
    _assert_names_truncated(error, shard)
    assert "model-00001" not in str(error.value)  # only the damaged shard


@pytest.mark.parametrize("tower", ["vit", "bert"])
def test_a_truncated_tower_is_named(tower, tmp_path):
    vit, bert = _vit_and_bert(tmp_path)
    _truncate(tmp_path / tower / "model.safetensors")
    with pytest.raises(CorruptCheckpointError) as error:
        TCLModel.from_vision_text_pretrained(vit, bert, **TOWER_KWARGS)
    _assert_names_truncated(error, tmp_path / tower / "model.safetensors")


def test_a_truncated_language_model_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    ViTModel(ViTConfig(**{k: v for k, v in MIVC_VISION.items() if k != "model_type"})).save_pretrained(tmp_path / "vit")
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MIVC_LLAMA.items() if k != "model_type"})).save_pretrained(
        tmp_path / "llm")
    _truncate(tmp_path / "llm" / "model.safetensors")
    with pytest.raises(CorruptCheckpointError) as error:
        MIVCForConditionalGeneration.from_pretrained_components(str(tmp_path / "vit"), str(tmp_path / "llm"),
                                                                image_token_id=5)
    _assert_names_truncated(error, tmp_path / "llm" / "model.safetensors")


def test_resuming_from_a_truncated_checkpoint_names_the_file(tmp_path):
    from vlalign.trainer import _load_checkpoint_weights

    model = _model("tcl")
    model.save_pretrained(tmp_path)
    _truncate(tmp_path / "model.safetensors")
    with pytest.raises(CorruptCheckpointError) as error:
        _load_checkpoint_weights(model, str(tmp_path))
    _assert_names_truncated(error, tmp_path / "model.safetensors")
