"""Only safetensors weights are loaded unless the caller opts in with `allow_pickle=True` (issue 8, part B).

Each pickle checkpoint here is a real `pytorch_model.bin` written with `torch.save` of a real state dict. The
refusal tests make `torch.load` fail loudly, to prove the file is never unpickled.
"""

import pytest
import torch
from fixtures import TINY_TEXT, TINY_VISION, tiny_tcl_config
from safetensors.torch import load_file
from fixtures import MIVC_LLAMA, MIVC_VISION, tiny_mivc_config
from transformers import AutoModel

from vlalign import MIVCForConditionalGeneration, TCLModel
from vlalign.loading import MissingCheckpointFileError, UnsafeCheckpointError

MODELS = {"tcl": (TCLModel, tiny_tcl_config), "mivc": (MIVCForConditionalGeneration, tiny_mivc_config)}


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


def _model(kind):
    model_class, make_config = MODELS[kind]
    torch.manual_seed(0)
    return model_class(make_config())


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_pickle_only_folder_is_refused_without_unpickling(kind, tmp_path, no_unpickling):
    _save(_model(kind), tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        MODELS[kind][0].from_pretrained(tmp_path)
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


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_allow_pickle_loads_the_same_weights(kind, tmp_path):
    model = _save(_model(kind), tmp_path)
    loaded = MODELS[kind][0].from_pretrained(tmp_path, allow_pickle=True)
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
    """Nothing to unpickle there: the error names the missing file instead (tests/test_load_errors.py)."""
    _model("tcl").config.save_pretrained(tmp_path)
    with pytest.raises(MissingCheckpointFileError, match=r"no weights file .* expected model\.safetensors") as error:
        TCLModel.from_pretrained(tmp_path)
    assert not isinstance(error.value, UnsafeCheckpointError) and "pickle" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# pretrained towers / components


def _towers(tmp_path, pickle_text):
    from transformers import BertConfig, BertForMaskedLM, ViTConfig, ViTModel

    torch.manual_seed(1)
    vit = _save(ViTModel(ViTConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})), tmp_path / "vit",
                pickle_only=False)
    bert = BertForMaskedLM(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}))
    _save(bert, tmp_path / "bert", pickle_only=pickle_text)
    return vit, bert


TOWER_KWARGS = dict(num_fusion_layers=1, embed_dim=16, queue_size=32, mask_token_id=4, lmi_image_grid=2)


def test_from_vision_text_pretrained_refuses_a_pickle_tower(tmp_path, no_unpickling):
    _towers(tmp_path, pickle_text=True)
    with pytest.raises(UnsafeCheckpointError) as error:
        TCLModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "bert"), **TOWER_KWARGS)
    _assert_explains(error)


def test_from_vision_text_pretrained_with_allow_pickle_loads_the_tower(tmp_path):
    _, bert = _towers(tmp_path, pickle_text=True)
    model = TCLModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "bert"), allow_pickle=True,
                                                 **TOWER_KWARGS)
    assert torch.equal(model.text_model.encoder.layer[1].output.dense.weight,
                       bert.bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(model.mlm_head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)


def _vit_and_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    torch.manual_seed(2)
    _save(ViTModel(ViTConfig(**{k: v for k, v in MIVC_VISION.items() if k != "model_type"})), tmp_path / "vit",
          pickle_only=False)
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MIVC_LLAMA.items() if k != "model_type"}))
    return _save(llama, tmp_path / "llm")


def test_from_pretrained_components_refuses_a_pickle_language_model(tmp_path, no_unpickling):
    _vit_and_llama(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        MIVCForConditionalGeneration.from_pretrained_components(str(tmp_path / "vit"), str(tmp_path / "llm"),
                                                                image_token_id=5)
    _assert_explains(error)


def test_from_pretrained_components_with_allow_pickle_loads_the_language_model(tmp_path):
    llama = _vit_and_llama(tmp_path)
    model = MIVCForConditionalGeneration.from_pretrained_components(str(tmp_path / "vit"), str(tmp_path / "llm"),
                                                                    image_token_id=5, allow_pickle=True)
    for key, value in llama.state_dict().items():
        assert torch.equal(model.language_model.state_dict()[key], value), key
