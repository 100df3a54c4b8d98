"""vlalign.loading: strict, safetensors-only loading of TCL, CODIS and MIVC, their towers and parts, and the errors
that name what is wrong.

* `from_pretrained` is strict: missing, unexpected or shape-mismatched weights raise `CheckpointMismatchError`
  listing the keys (instead of transformers' warning + random init); `strict=False` opts out. Keys transformers
  does not save (tied weights, non-persistent buffers, `_keys_to_ignore_on_load_missing`) do not count, so save /
  load round trips are clean. `from_vision_text_pretrained` / `from_pretrained_components` refuse a tower
  checkpoint that does not fit its own config.
* Only safetensors weights are loaded unless the caller opts in with `allow_pickle=True` (`UnsafeCheckpointError`).
* A saved folder with a file missing or damaged (tokenizer.json, the weights, a shard, a truncated file) raises
  an error that names the file; a tokenizer larger than the text vocabulary names both sizes.
"""

import json
import logging
import os
import re

import pytest
import torch
from fixtures import (
    MIVC_LLAMA,
    MIVC_VISION,
    TINY_TEXT,
    TINY_VISION,
    tiny_codis_config,
    tiny_mivc_config,
    tiny_tcl_config,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from vlalign import (
    CODISModel,
    CorruptCheckpointError,
    MissingTokenizerFileError,
    MIVCForConditionalGeneration,
    TCLModel,
    VLAlignProcessor,
    check_tokenizer_fits_model,
)
from vlalign.data import build_digits_processor, build_digits_tokenizer
from vlalign.data.multiview_digits import build_mivc_digits_processor
from vlalign.loading import (
    CheckpointMismatchError,
    MissingCheckpointFileError,
    UnsafeCheckpointError,
    describe_key_problems,
)

WEIGHTS = "model.safetensors"
MODELS = {
    "tcl": (TCLModel, tiny_tcl_config),
    "codis": (CODISModel, tiny_codis_config),
    "mivc": (MIVCForConditionalGeneration, tiny_mivc_config),
}


def _saved(kind, folder):
    model_class, make_config = MODELS[kind]
    torch.manual_seed(0)
    model = model_class(make_config())
    model.save_pretrained(folder)
    return model


def _edit_weights(folder, edit):
    """Rewrite the saved safetensors file with `edit(tensors)` applied (checkpoint-side key names)."""
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def _vlalign_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("vlalign") and r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------------------------
# round trips stay clean


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_load_round_trip_is_clean_and_exact(kind, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    model = _saved(kind, tmp_path)
    model_class = MODELS[kind][0]
    loaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert all(not info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert _vlalign_warnings(caplog) == []  # no unknown-field warning for what save_pretrained wrote
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_tied_embeddings_are_not_saved_twice_and_load_tied(tmp_path):
    model = _saved("mivc", tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert not any(key.endswith("lm_head.weight") for key in saved)  # transformers saves one copy
    loaded = MIVCForConditionalGeneration.from_pretrained(tmp_path)
    lm = loaded.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    assert torch.equal(lm.lm_head.weight, model.language_model.lm_head.weight)


def test_keys_to_ignore_on_load_missing_are_honoured(tmp_path):
    class TCLWithOptionalITM(TCLModel):
        _keys_to_ignore_on_load_missing = [r"^itm_head\."]

    _saved("tcl", tmp_path)
    _edit_weights(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("itm_head.")])
    TCLWithOptionalITM.from_pretrained(tmp_path)  # no error
    with pytest.raises(CheckpointMismatchError, match=r"missing \[itm_head\.bias, itm_head\.weight\]"):
        TCLModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# strict loading


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_missing_weights_raise_with_the_keys_and_the_opt_out(kind, tmp_path):
    _saved(kind, tmp_path)
    dropped = "projector.linear_1.weight" if kind == "mivc" else "vision_proj.weight"
    _edit_weights(tmp_path, lambda t: t.pop(dropped))
    model_class = MODELS[kind][0]
    with pytest.raises(CheckpointMismatchError, match=rf"missing \[{re.escape(dropped)}\]") as error:
        model_class.from_pretrained(tmp_path)
    assert "strict=False" in str(error.value)
    # the Auto classes go through the same from_pretrained
    auto = AutoModelForImageTextToText if kind == "mivc" else AutoModel
    with pytest.raises(CheckpointMismatchError):
        auto.from_pretrained(tmp_path)
    # opt-out: transformers' behaviour (warn, initialise the missing weight)
    model, info = auto.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert type(model) is model_class and len(info["missing_keys"]) == 1


def test_unexpected_weights_raise(tmp_path):
    _saved("tcl", tmp_path)
    _edit_weights(tmp_path, lambda t: t.update({"extra_head.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \[extra_head\.weight\]"):
        TCLModel.from_pretrained(tmp_path)
    _, info = TCLModel.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert info["unexpected_keys"] == {"extra_head.weight"}


def test_shape_mismatch_raises_with_both_shapes(tmp_path):
    _saved("codis", tmp_path)
    _edit_weights(tmp_path, lambda t: t.update({"codebook.weight": torch.zeros(5, 16)}))  # 12 codewords in the config
    expected = "shape mismatch [codebook.weight (checkpoint (5, 16), model (12, 16))]"
    with pytest.raises(CheckpointMismatchError, match=re.escape(expected)):
        CODISModel.from_pretrained(tmp_path)
    # strict=False is transformers' behaviour: it raises on shapes unless told to ignore them
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        CODISModel.from_pretrained(tmp_path, strict=False)
    for strict in (True, False):  # an explicit ignore_mismatched_sizes=True re-initialises the codebook
        model = CODISModel.from_pretrained(tmp_path, strict=strict, ignore_mismatched_sizes=True)
        assert model.codebook.weight.shape == (12, 16)


def test_long_key_lists_are_truncated_with_a_count(tmp_path):
    _saved("tcl", tmp_path)
    dropped = []

    def drop_teachers(tensors):
        dropped.extend(k for k in list(tensors) if k.startswith("momentum_"))
        for key in dropped:
            del tensors[key]

    _edit_weights(tmp_path, drop_teachers)
    assert len(dropped) > 20
    with pytest.raises(CheckpointMismatchError) as error:
        TCLModel.from_pretrained(tmp_path)
    message = str(error.value)
    assert f"and {len(dropped) - 10} more ({len(dropped)} in all)" in message
    assert message.count("momentum_") == 10


def test_describe_key_problems_formats_each_kind():
    assert describe_key_problems() == ""
    text = describe_key_problems(["b", "a"], ["x"], [("w", (2, 3), (4, 3))])
    assert text == "missing [a, b]; unexpected [x]; shape mismatch [w (checkpoint (2, 3), model (4, 3))]"


def test_config_override_that_changes_the_weights_is_caught(tmp_path):
    """A load-time config override that changes the architecture (teachers switched off) is a mismatch too."""
    _saved("tcl", tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected \[image_queue\.features, .*momentum_"):
        TCLModel.from_pretrained(tmp_path, use_momentum=False)
    model = TCLModel.from_pretrained(tmp_path, use_momentum=False, strict=False)
    assert not hasattr(model, "momentum_vision_model")


# ---------------------------------------------------------------------------------------------------------------
# pretrained towers / parts that do not fit their own config


def _vit_and_bert(tmp_path, bert_class_name="BertForMaskedLM"):
    import transformers

    torch.manual_seed(1)
    vit = transformers.ViTModel(transformers.ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"}))
    bert_class = getattr(transformers, bert_class_name)
    bert = bert_class(transformers.BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}))
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    return vit, bert


TOWER_KWARGS = dict(num_fusion_layers=1, embed_dim=16, queue_size=32, mask_token_id=4, lmi_image_grid=2)


def _set_config_field(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def test_from_vision_text_pretrained_refuses_a_tower_with_extra_layers(tmp_path):
    _vit_and_bert(tmp_path)
    _set_config_field(tmp_path / "vit", num_hidden_layers=1)  # the weights hold two layers
    with pytest.raises(CheckpointMismatchError, match=r"vision tower checkpoint .* unexpected \[layers\.1\."):
        TCLModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "bert"), **TOWER_KWARGS)


def test_from_vision_text_pretrained_refuses_a_tower_with_missing_weights(tmp_path):
    _vit_and_bert(tmp_path)
    folder = tmp_path / "bert"
    tensors = load_file(folder / WEIGHTS)
    dropped = next(k for k in tensors if "layer.0.output.dense.weight" in k)
    del tensors[dropped]
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"text encoder checkpoint .* missing \[.*layers?\.0\.output"):
        TCLModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(folder), **TOWER_KWARGS)


def test_text_checkpoint_without_mlm_head_gives_no_random_head(tmp_path):
    """A bare BertModel checkpoint loads as the encoder: the MLM head is not copied from a randomly initialised
    BertForMaskedLM head."""
    from vlalign.loading import _load_text_checkpoint

    _vit_and_bert(tmp_path, "BertModel")
    text = _load_text_checkpoint(str(tmp_path / "bert"), allow_pickle=False)
    assert type(text).__name__ == "BertModel"
    _, bert_mlm = _vit_and_bert(tmp_path, "BertForMaskedLM")
    assert type(_load_text_checkpoint(str(tmp_path / "bert"), allow_pickle=False)).__name__ == "BertForMaskedLM"
    model = TCLModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "bert"), **TOWER_KWARGS)
    assert torch.equal(model.mlm_head.transform.dense.weight, bert_mlm.cls.predictions.transform.dense.weight)


def test_from_pretrained_components_refuses_a_language_model_with_missing_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    ViTModel(ViTConfig(**{k: v for k, v in MIVC_VISION.items() if k != "model_type"})).save_pretrained(tmp_path / "vit")
    llama = {k: v for k, v in MIVC_LLAMA.items() if k != "model_type"}
    LlamaForCausalLM(LlamaConfig(**llama)).save_pretrained(tmp_path / "llm")
    _edit_weights(tmp_path / "llm", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"language model checkpoint .* missing \[model\.norm\.weight\]"):
        MIVCForConditionalGeneration.from_pretrained_components(
            str(tmp_path / "vit"), str(tmp_path / "llm"), image_token_id=5
        )


def test_from_pretrained_components_takes_the_vision_half_of_a_clip_checkpoint(tmp_path):
    """The text half of a CLIP checkpoint is the rest of a bigger checkpoint, not a mismatch of the vision part."""
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    vision = {k: v for k, v in MIVC_VISION.items() if k != "model_type"}
    text = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MIVC_LLAMA.items() if k != "model_type"})).save_pretrained(
        tmp_path / "llm"
    )
    model = MIVCForConditionalGeneration.from_pretrained_components(
        str(tmp_path / "clip"), str(tmp_path / "llm"), image_token_id=5
    )
    assert torch.equal(
        model.vision_model.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight
    )


# ---------------------------------------------------------------------------------------------------------------------
# safetensors only
# ---------------------------------------------------------------------------------------------------------------------
# Only safetensors weights are loaded unless the caller opts in with `allow_pickle=True`.
#
# Each pickle checkpoint here is a real `pytorch_model.bin` written with `torch.save` of a real state dict. The
# refusal tests make `torch.load` fail loudly, to prove the file is never unpickled.


PICKLE_MODELS = {"tcl": (TCLModel, tiny_tcl_config), "mivc": (MIVCForConditionalGeneration, tiny_mivc_config)}


def _to_pickle_only(folder):
    """Turn a save_pretrained folder into a pickle-only one: the same tensors in pytorch_model.bin."""
    safetensors_file = folder / "model.safetensors"
    torch.save(load_file(safetensors_file), folder / "pytorch_model.bin")
    safetensors_file.unlink()


def _save(module, folder, pickle_only=True):
    module.save_pretrained(folder)
    if pickle_only:
        _to_pickle_only(folder)
    return module


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle file was read")

    monkeypatch.setattr(torch, "load", refuse)


def _assert_explains(error):
    message = str(error.value)
    assert "pytorch_model.bin" in message and "allow_pickle=True" in message
    assert "pickle" in message and "run code" in message  # why


@pytest.mark.parametrize("kind", sorted(PICKLE_MODELS))
def test_pickle_only_folder_is_refused_without_unpickling(kind, tmp_path, no_unpickling):
    _save(_model(kind), tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        PICKLE_MODELS[kind][0].from_pretrained(tmp_path)
    _assert_explains(error)


def test_auto_class_and_a_direct_file_path_are_refused_too(tmp_path, no_unpickling):
    model = _save(_model("tcl"), tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        AutoModel.from_pretrained(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        TCLModel.from_pretrained(str(tmp_path / "pytorch_model.bin"), config=model.config)


def test_use_safetensors_false_alone_is_not_an_opt_in(tmp_path, no_unpickling):
    _save(_model("tcl"), tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        TCLModel.from_pretrained(tmp_path, use_safetensors=False)


@pytest.mark.parametrize("kind", sorted(PICKLE_MODELS))
def test_allow_pickle_loads_the_same_weights(kind, tmp_path):
    model = _save(_model(kind), tmp_path)
    loaded = PICKLE_MODELS[kind][0].from_pretrained(tmp_path, allow_pickle=True)
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_safetensors_is_preferred_when_both_formats_are_there(tmp_path, no_unpickling):
    model = _save(_model("tcl"), tmp_path, pickle_only=False)
    torch.save({"garbage": torch.zeros(1)}, tmp_path / "pytorch_model.bin")  # never read
    for allow_pickle in (False, True):
        loaded = TCLModel.from_pretrained(tmp_path, allow_pickle=allow_pickle)
        assert torch.equal(loaded.vision_proj.weight, model.vision_proj.weight)


def test_folder_without_any_weights_is_no_pickle_refusal(tmp_path):
    """Nothing to unpickle there: the error names the missing file instead (below: missing or damaged files)."""
    _model("tcl").config.save_pretrained(tmp_path)
    with pytest.raises(MissingCheckpointFileError, match=r"no weights file .* expected model\.safetensors") as error:
        TCLModel.from_pretrained(tmp_path)
    assert not isinstance(error.value, UnsafeCheckpointError) and "pickle" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# pretrained towers / components


def _towers(tmp_path, pickle_text):
    from transformers import BertConfig, BertForMaskedLM, ViTConfig, ViTModel

    torch.manual_seed(1)
    vit = _save(
        ViTModel(ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})),
        tmp_path / "vit",
        pickle_only=False,
    )
    bert = BertForMaskedLM(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}))
    _save(bert, tmp_path / "bert", pickle_only=pickle_text)
    return vit, bert


def test_from_vision_text_pretrained_refuses_a_pickle_tower(tmp_path, no_unpickling):
    _towers(tmp_path, pickle_text=True)
    with pytest.raises(UnsafeCheckpointError) as error:
        TCLModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "bert"), **TOWER_KWARGS)
    _assert_explains(error)


def test_from_vision_text_pretrained_with_allow_pickle_loads_the_tower(tmp_path):
    _, bert = _towers(tmp_path, pickle_text=True)
    model = TCLModel.from_vision_text_pretrained(
        str(tmp_path / "vit"), str(tmp_path / "bert"), allow_pickle=True, **TOWER_KWARGS
    )
    assert torch.equal(
        model.text_model.encoder.layer[1].output.dense.weight, bert.bert.encoder.layer[1].output.dense.weight
    )
    assert torch.equal(model.mlm_head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)


def _vit_and_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    torch.manual_seed(2)
    _save(
        ViTModel(ViTConfig(**{k: v for k, v in MIVC_VISION.items() if k != "model_type"})),
        tmp_path / "vit",
        pickle_only=False,
    )
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MIVC_LLAMA.items() if k != "model_type"}))
    return _save(llama, tmp_path / "llm")


def test_from_pretrained_components_refuses_a_pickle_language_model(tmp_path, no_unpickling):
    _vit_and_llama(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        MIVCForConditionalGeneration.from_pretrained_components(
            str(tmp_path / "vit"), str(tmp_path / "llm"), image_token_id=5
        )
    _assert_explains(error)


def test_from_pretrained_components_with_allow_pickle_loads_the_language_model(tmp_path):
    llama = _vit_and_llama(tmp_path)
    model = MIVCForConditionalGeneration.from_pretrained_components(
        str(tmp_path / "vit"), str(tmp_path / "llm"), image_token_id=5, allow_pickle=True
    )
    for key, value in llama.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------------------------------
# Missing or damaged files are named
# ---------------------------------------------------------------------------------------------------------------------
# Saved folders with a file missing or damaged raise an error that names the file.
#
# 1. a processor / model folder whose tokenizer.json was deleted (unchecked, it loads as a tokenizer of the 5 special
#    tokens: every word [UNK], zero-shot scores all equal);
# 2. a tokenizer larger than the model's text vocabulary (unchecked, it fails later with an IndexError in the
#    embedding);
# 3. a model folder without its weights file (not a pickle refusal);
# 4. a truncated weights file (safetensors' own error does not say which file).


def _model(kind):
    model_class, make_config = MODELS[kind]
    torch.manual_seed(0)
    return model_class(make_config())


def _truncate(file, keep=None):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2 if keep is None else keep])


# ---------------------------------------------------------------------------------------------------------------
# 1. tokenizer.json deleted


PROCESSORS = {
    "vlalign": lambda: build_digits_processor(image_size=16),
    "mivc": lambda: build_mivc_digits_processor(image_seq_length=4, image_size=16),
}


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


def _tower_folders(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, ViTConfig, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})).save_pretrained(tmp_path / "vit")
    BertForMaskedLM(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(
        tmp_path / "bert"
    )
    return str(tmp_path / "vit"), str(tmp_path / "bert")


@pytest.mark.parametrize("tower", ["vit", "bert"])
def test_a_tower_folder_without_weights_is_named(tower, tmp_path):
    vit, bert = _tower_folders(tmp_path)
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
    vit, bert = _tower_folders(tmp_path)
    _truncate(tmp_path / tower / "model.safetensors")
    with pytest.raises(CorruptCheckpointError) as error:
        TCLModel.from_vision_text_pretrained(vit, bert, **TOWER_KWARGS)
    _assert_names_truncated(error, tmp_path / tower / "model.safetensors")


def test_a_truncated_language_model_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    ViTModel(ViTConfig(**{k: v for k, v in MIVC_VISION.items() if k != "model_type"})).save_pretrained(tmp_path / "vit")
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MIVC_LLAMA.items() if k != "model_type"})).save_pretrained(
        tmp_path / "llm"
    )
    _truncate(tmp_path / "llm" / "model.safetensors")
    with pytest.raises(CorruptCheckpointError) as error:
        MIVCForConditionalGeneration.from_pretrained_components(
            str(tmp_path / "vit"), str(tmp_path / "llm"), image_token_id=5
        )
    _assert_names_truncated(error, tmp_path / "llm" / "model.safetensors")


def test_resuming_from_a_truncated_checkpoint_names_the_file(tmp_path):
    from vlalign.trainer import _load_checkpoint_weights

    model = _model("tcl")
    model.save_pretrained(tmp_path)
    _truncate(tmp_path / "model.safetensors")
    with pytest.raises(CorruptCheckpointError) as error:
        _load_checkpoint_weights(model, str(tmp_path))
    _assert_names_truncated(error, tmp_path / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# special token ids come from the tokenizer


def _towers_with_tokenizer(tmp_path, tokenizer):
    from transformers import AutoConfig

    vision, text = tmp_path / "vision", tmp_path / "text"
    AutoModel.from_config(AutoConfig.for_model(**TINY_VISION)).save_pretrained(vision)
    AutoModel.from_config(AutoConfig.for_model(**TINY_TEXT)).save_pretrained(text)
    tokenizer.save_pretrained(text)
    return str(vision), str(text)


def test_from_vision_text_pretrained_takes_the_mask_id_from_the_saved_tokenizer(tmp_path, digits_processor_16):
    tokenizer = digits_processor_16.tokenizer
    # the digits vocabulary's [MASK] is 4; the config's default is bert-base's 103
    vision, text = _towers_with_tokenizer(tmp_path, tokenizer)
    model = TCLModel.from_vision_text_pretrained(vision, text, num_fusion_layers=1, embed_dim=16, queue_size=32)
    assert model.config.mask_token_id == tokenizer.mask_token_id == 4
    with pytest.raises(ValueError, match=r"mask_token_id is 5, the tokenizer's mask token '\[MASK\]' is 4"):
        TCLModel.from_vision_text_pretrained(vision, text, num_fusion_layers=1, mask_token_id=5, queue_size=32)
    # without MLM the mask id is not read, so it need not match
    TCLModel.from_vision_text_pretrained(vision, text, num_fusion_layers=1, mask_token_id=5, mlm_weight=0.0)


def test_special_token_mismatches_are_refused(digits_processor_16):
    from vlalign.loading import check_tokenizer_special_tokens

    tokenizer = digits_processor_16.tokenizer  # [PAD] 0, [CLS] 2, [MASK] 4
    check_tokenizer_special_tokens(tokenizer, tiny_tcl_config())
    with pytest.raises(ValueError, match=r"mask_token_id is 7"):
        check_tokenizer_special_tokens(tokenizer, tiny_tcl_config(mask_token_id=7))
    with pytest.raises(ValueError, match=r"text_config.pad_token_id is 1, the tokenizer pads with 0"):
        check_tokenizer_special_tokens(tokenizer, tiny_tcl_config(text_config=dict(TINY_TEXT, pad_token_id=1)))
    clip_text = dict(
        model_type="clip_text_model", vocab_size=144, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, eos_token_id=9,
    )  # fmt: skip
    dual = dict(num_fusion_layers=0, itm_weight=0.0, mlm_weight=0.0)
    with pytest.raises(ValueError, match=r"eos_token_id is 9, the tokenizer's end-of-text token is None .*CLIP"):
        check_tokenizer_special_tokens(tokenizer, tiny_tcl_config(text_config=clip_text, **dual))


def test_cls_pooling_needs_a_tokenizer_that_starts_with_a_cls_token(digits_processor_16):
    import copy

    from vlalign.loading import check_tokenizer_special_tokens

    tokenizer = copy.deepcopy(digits_processor_16.tokenizer)
    check_tokenizer_special_tokens(tokenizer, tiny_tcl_config(text_pooling="cls"))
    tokenizer.cls_token = "[UNK]"  # texts still start with token 2, which is no longer the [CLS] token
    with pytest.raises(ValueError, match=r"text_pooling='cls' pools the first token, but the tokenizer starts"):
        check_tokenizer_special_tokens(tokenizer, tiny_tcl_config(text_pooling="cls"))
    check_tokenizer_special_tokens(tokenizer, tiny_tcl_config(text_pooling="mean"))
