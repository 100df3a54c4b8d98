"""Checkpoints that do not fit their config, unknown config fields, and config validation (issue 8, part A).

* `from_pretrained` of TCL, CODIS and MIVC is strict: missing, unexpected or shape-mismatched weights raise
  `CheckpointMismatchError` listing the keys (instead of transformers' warning + random init); `strict=False` opts
  out. Keys transformers does not save (tied weights, non-persistent buffers, `_keys_to_ignore_on_load_missing`)
  do not count, so save / load round trips are clean.
* `from_vision_text_pretrained` / `from_pretrained_components` refuse a tower checkpoint that does not fit its own
  config.
* A config field that neither our configs nor transformers know is warned about; every field is validated with a
  `ValueError` naming it.
"""

import dataclasses
import json
import logging
import re

import pytest
import torch
from fixtures import (
    MIVC_LLAMA,
    MIVC_QFORMER,
    MIVC_VISION,
    TINY_TEXT,
    TINY_VISION,
    tiny_codis_config,
    tiny_mivc_config,
    tiny_tcl_config,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText, PreTrainedConfig

from vlalign import CODISConfig, CODISModel, MIVCConfig, MIVCForConditionalGeneration, TCLConfig, TCLModel
from vlalign.loading import CheckpointMismatchError, describe_key_problems

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
        MIVCForConditionalGeneration.from_pretrained_components(str(tmp_path / "vit"), str(tmp_path / "llm"),
                                                                image_token_id=5)


# ---------------------------------------------------------------------------------------------------------------
# unknown config fields


CONFIGS = {"tcl": tiny_tcl_config, "codis": tiny_codis_config, "mivc": tiny_mivc_config}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_unknown_config_field_warns_with_its_name(kind, caplog):
    caplog.set_level(logging.WARNING)
    config = CONFIGS[kind](queue_sise=128)
    messages = _vlalign_warnings(caplog)
    assert len(messages) == 1 and "'queue_sise'" in messages[0] and type(config).__name__ in messages[0]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_unknown_field_in_config_json_warns(kind, tmp_path, caplog):
    config = CONFIGS[kind]()
    config.save_pretrained(tmp_path)
    _set_config_field(tmp_path, embed_dimm=64)
    caplog.set_level(logging.WARNING)
    type(config).from_pretrained(tmp_path)
    assert any("'embed_dimm'" in m for m in _vlalign_warnings(caplog))


@pytest.mark.parametrize("kind", ["tcl", "codis"])
def test_training_settings_of_an_older_config_json_load_with_a_warning_and_are_dropped(kind, tmp_path, caplog):
    """vlalign 0.1.0 saved gradient_cache_chunk_size and train_batch_size into config.json: whoever fine-tuned the
    checkpoint got gradient caching on without asking. They load, warned about, and go nowhere."""
    model_class, make = MODELS[kind]
    model_class(make()).save_pretrained(tmp_path)
    _set_config_field(tmp_path, gradient_cache_chunk_size=8, train_batch_size=64)
    caplog.set_level(logging.WARNING)
    loaded = model_class.from_pretrained(tmp_path)
    warnings = " ".join(_vlalign_warnings(caplog))
    assert "'gradient_cache_chunk_size' is not part of the model any more and is ignored: gradient caching is a " \
           "training setting (ContrastiveTrainingArguments.gradient_cache_chunk_size" in warnings
    assert "'train_batch_size' is not part of the model any more" in warnings
    assert not hasattr(loaded.config, "gradient_cache_chunk_size") and not hasattr(loaded.config, "train_batch_size")
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "gradient_cache_chunk_size" not in saved and "train_batch_size" not in saved


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_standard_transformers_keys_do_not_warn(kind, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    make = CONFIGS[kind]
    config = make(architectures=["X"], auto_map={"AutoConfig": "x.Y"}, transformers_version="5.0.0", dtype="float32",
                  torch_dtype="float32", model_type=kind, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1},
                  num_labels=2, name_or_path="somewhere", output_attentions=False, return_dict=True,
                  max_length=20, num_beams=1)  # generation parameters of old configs are dropped by transformers
    type(config)(**config.to_dict())
    config.save_pretrained(tmp_path)
    type(config).from_pretrained(tmp_path)
    assert _vlalign_warnings(caplog) == []


# ---------------------------------------------------------------------------------------------------------------
# every field validated


def _albef_bad_values(extra):
    """Bad values for every ALBEFStackConfig field, plus a model's own (`extra`): field -> list of overrides."""
    table = {
        "vision_config": [dict(vision_config=dict(TINY_VISION, image_size=18)),
                          dict(vision_config=dict(TINY_VISION, patch_size=0))],
        "text_config": [dict(text_config=dict(model_type="gpt2", n_layer=2)),
                        dict(text_config=dict(TINY_TEXT, is_decoder=True))],
        "num_fusion_layers": [dict(num_fusion_layers=-1), dict(num_fusion_layers=3), dict(num_fusion_layers=1.5)],
        "embed_dim": [dict(embed_dim=0), dict(embed_dim=16.0)],
        "temperature": [dict(temperature=0.0), dict(temperature="0.07"), dict(temperature=0.6)],
        "temperature_min": [dict(temperature_min=0.0), dict(temperature_min="1e-3")],
        "temperature_max": [dict(temperature_max=0.0005), dict(temperature_max=None)],
        "learnable_temperature": [dict(learnable_temperature="yes"), dict(learnable_temperature=1)],
        "use_momentum": [dict(use_momentum="false")],
        "momentum": [dict(momentum=1.5), dict(momentum=None)],
        "queue_size": [dict(queue_size=-1), dict(queue_size=0), dict(queue_size=32.0)],
        "alpha": [dict(alpha=2.0), dict(alpha=float("nan"))],
        "cma_weight": [dict(cma_weight=-1.0), dict(cma_weight="1")],
        "imc_weight": [dict(imc_weight=-1.0)],
        "itm_weight": [dict(itm_weight=-1.0), dict(itm_weight=float("inf"))],
        "mlm_weight": [dict(mlm_weight=-1.0)],
        "itm_hard_negatives": [dict(itm_hard_negatives=None)],
        "mlm_probability": [dict(mlm_probability=0.0), dict(mlm_probability=1.0)],
        "mask_token_id": [dict(mask_token_id=999), dict(mask_token_id=-1), dict(mask_token_id="4"),
                          dict(mask_token_id=-1, mlm_weight=0.0)],
        "initializer_range": [dict(initializer_range=0.0), dict(initializer_range=-0.02),
                              dict(initializer_range=float("inf"))],
    }
    table.update(extra)
    return table


BAD_VALUES = {
    TCLConfig: (tiny_tcl_config, _albef_bad_values({
        "lmi_weight": [dict(lmi_weight=-1.0)],
        "lmi_image_grid": [dict(lmi_image_grid=3), dict(lmi_image_grid=0)],
        "contrastive_loss": [dict(contrastive_loss="hinge"), dict(contrastive_loss="decomposable")],
        "z_estimate": [dict(use_momentum=False, z_estimate="median")],
        "sample_u": [dict(sample_u="no")],
        "running_z_momentum": [dict(running_z_momentum=1.0), dict(running_z_momentum="0.1")],
        "num_train_samples": [dict(num_train_samples=0), dict(num_train_samples=2.5),
                              dict(use_momentum=False, contrastive_loss="decomposable", z_estimate="running")],
        "use_feature_separation": [dict(use_feature_separation=1)],
        "feature_separation_weight": [dict(feature_separation_weight=-1.0)],
        "use_brownian_bridge": [dict(use_brownian_bridge="true")],
        "brownian_bridge_weight": [dict(brownian_bridge_weight=-1.0)],
        "brownian_bridge_t": [dict(brownian_bridge_t=1.5), dict(brownian_bridge_t=0.0)],
        "use_geometric_consistency": [dict(use_geometric_consistency=None)],
        "geometric_consistency_weight": [dict(geometric_consistency_weight=-1.0)],
    })),
    CODISConfig: (tiny_codis_config, _albef_bad_values({
        "codebook_size": [dict(codebook_size=1)],
        "codebook_dim": [dict(codebook_dim=0)],
        "code_temperature": [dict(code_temperature=0.0), dict(code_temperature="0.1")],
        "ot_solver": [dict(ot_solver="emd")],
        "ot_iterations": [dict(ot_iterations=0)],
        "ipot_beta": [dict(ipot_beta=0.0)],
        "ipot_inner_iterations": [dict(ipot_inner_iterations=0)],
        "sinkhorn_epsilon": [dict(sinkhorn_epsilon=0.0), dict(sinkhorn_epsilon="0.05")],
        "code_targets": [dict(code_targets="cross")],
        "code_weight": [dict(code_weight=-1.0)],
        "ot_weight": [dict(ot_weight=-1.0)],
    })),
    MIVCConfig: (tiny_mivc_config, {
        "vision_config": [dict(vision_config=dict(MIVC_VISION, patch_size=0))],
        "text_config": [dict(text_config=dict(MIVC_LLAMA, vocab_size=0))],
        "qformer_config": [dict(qformer_config=dict(MIVC_QFORMER, hidden_size=0)),
                           dict(qformer_config=dict(MIVC_QFORMER, hidden_size=25))],
        "num_query_tokens": [dict(num_query_tokens=0)],
        "vision_feature_select_strategy": [dict(vision_feature_select_strategy="cls")],
        "pooling_mode": [dict(pooling_mode="sum")],
        "pooling_attention_dim": [dict(pooling_attention_dim=0)],
        "pooling_granularity": [dict(pooling_granularity="patch")],
        "projector_type": [dict(projector_type="mlp3x_gelu")],
        "freeze_vision_model": [dict(freeze_vision_model="yes")],
        "freeze_qformer": [dict(freeze_qformer=1), dict(qformer_config=None, freeze_qformer=True)],
        "freeze_language_model": [dict(freeze_language_model=None)],
        "image_token_id": [dict(image_token_id=10_000), dict(image_token_id="5")],
        "initializer_range": [dict(initializer_range=0.0), dict(initializer_range="0.02")],
    }),
}
BASE_FIELDS = {field.name for field in dataclasses.fields(PreTrainedConfig)}


@pytest.mark.parametrize("config_class", list(BAD_VALUES), ids=lambda c: c.__name__)
def test_every_config_field_has_a_validation_case(config_class):
    own_fields = {field.name for field in dataclasses.fields(config_class)} - BASE_FIELDS
    assert own_fields == set(BAD_VALUES[config_class][1])


@pytest.mark.parametrize(
    "config_class, field, overrides",
    [(cls, field, overrides) for cls, (_, table) in BAD_VALUES.items() for field, cases in table.items()
     for overrides in cases],
    ids=lambda value: value.__name__ if isinstance(value, type) else None,
)
def test_invalid_value_raises_naming_the_field(config_class, field, overrides):
    make = BAD_VALUES[config_class][0]
    with pytest.raises(ValueError, match=rf"^{config_class.__name__}\.{field}: "):
        make(**overrides)


@pytest.mark.parametrize("make", [tiny_tcl_config, tiny_codis_config, tiny_mivc_config])
def test_defaults_and_tiny_configs_are_valid(make):
    make()
    type(make())()  # the class defaults (the papers' towers)


def test_from_pretrained_components_takes_the_vision_half_of_a_clip_checkpoint(tmp_path):
    """The text half of a CLIP checkpoint is the rest of a bigger checkpoint, not a mismatch of the vision part."""
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    vision = {k: v for k, v in MIVC_VISION.items() if k != "model_type"}
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=16)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MIVC_LLAMA.items() if k != "model_type"})).save_pretrained(
        tmp_path / "llm")
    model = MIVCForConditionalGeneration.from_pretrained_components(str(tmp_path / "clip"), str(tmp_path / "llm"),
                                                                    image_token_id=5)
    assert torch.equal(model.vision_model.embeddings.patch_embedding.weight,
                       clip.vision_model.embeddings.patch_embedding.weight)
