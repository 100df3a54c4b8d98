"""The configs (configuration_albef / _tcl / _codis / _mivc): every rule raises a `ValueError` naming the field, with
a bad value for every field of every config; types are `@strict`'s (bools are not ints, strings are not numbers,
NaN / inf refused), assignment after construction is checked too; a config survives `save_pretrained` /
`from_pretrained` and `to_dict` / `from_dict` unchanged; a field that neither our configs nor transformers know is
warned about (in kwargs or config.json), and the training settings an older config.json holds load with a
warning and are dropped."""

import dataclasses
import json
import logging
import math

import pytest
from fixtures import (
    MIVC_LLAMA,
    MIVC_QFORMER,
    MIVC_VISION,
    TINY_TEXT,
    TINY_VISION,
    tiny_codis_config,
    tiny_mivc_config,
    tiny_mivc_digits_config,
    tiny_tcl_config,
)
from transformers import PreTrainedConfig

from vlalign import CODISConfig, CODISModel, MIVCConfig, MIVCForConditionalGeneration, TCLConfig, TCLModel

MAKERS = {
    "tcl": tiny_tcl_config,
    "codis": tiny_codis_config,
    "mivc": lambda **kw: tiny_mivc_digits_config(qformer=True, **kw),
}
BASE_FIELDS = {field.name for field in dataclasses.fields(PreTrainedConfig)}


# ----------------------------------------------------------------------------------------------------------------
# each model's rules


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(queue_size=0), "queue_size"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(momentum=1.5), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(lmi_image_grid=3), "lmi_image_grid"),
        (dict(lmi_image_grid=3, lmi_weight=0.5), "lmi_image_grid"),
        (dict(num_fusion_layers=3), "num_fusion_layers"),
        (dict(num_fusion_layers=0), "num_fusion_layers"),
        (dict(mlm_probability=0.0), "mlm_probability"),
        (dict(alpha=2.0), "alpha"),
        (dict(itm_weight=-1.0), "itm_weight"),
        (dict(mask_token_id=999), "mask_token_id"),
        (dict(text_config=dict(model_type="gpt2", n_layer=2)), "text_config"),
        (dict(vision_config=dict(model_type="vit", image_size=18, patch_size=4)), "vision_config"),
        (dict(contrastive_loss="hinge"), "contrastive_loss"),
        (dict(contrastive_loss="decomposable"), "contrastive_loss"),  # needs use_momentum=False
        (dict(contrastive_loss="sigmoid"), "contrastive_loss"),  # needs use_momentum=False too
        (dict(use_momentum=False, contrastive_loss="sigmoid", logit_bias_init=float("inf")), "logit_bias_init"),
        (dict(use_momentum=False, z_estimate="median"), "z_estimate"),
        (dict(use_momentum=False, contrastive_loss="decomposable", z_estimate="running"), "num_train_samples"),
        (dict(use_momentum=False, contrastive_loss="decomposable", z_estimate="queue", queue_size=0), "queue_size"),
        (dict(running_z_momentum=1.0), "running_z_momentum"),
        (dict(brownian_bridge_t=1.5), "brownian_bridge_t"),
        (dict(geometric_consistency_weight=-1.0), "geometric_consistency_weight"),
    ],
)
def test_tcl_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"TCLConfig\.{field}"):
        tiny_tcl_config(**overrides)


def test_lmi_image_grid_is_checked_only_when_lmi_is_on():
    """A 224 px ViT-B/16 (grid 14) with the default lmi_image_grid 4 is refused only when LMI would pool to it."""
    vision = dict(
        model_type="vit",
        image_size=56,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )  # grid 14
    assert tiny_tcl_config(vision_config=vision, lmi_image_grid=4, lmi_weight=0.0).lmi_image_grid == 4
    with pytest.raises(ValueError, match=r"TCLConfig\.lmi_image_grid: 4 does not divide the patch grid side 14"):
        tiny_tcl_config(vision_config=vision, lmi_image_grid=4)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(codebook_size=1), "codebook_size"),
        (dict(codebook_size=0), "codebook_size"),
        (dict(codebook_size=12.0), "codebook_size"),
        (dict(codebook_size=True), "codebook_size"),
        (dict(codebook_dim=0), "codebook_dim"),
        (dict(codebook_dim=-8), "codebook_dim"),
        (dict(codebook_dim=8.5), "codebook_dim"),
        (dict(code_temperature=0.0), "code_temperature"),
        (dict(code_temperature=-0.1), "code_temperature"),
        (dict(code_temperature=float("nan")), "code_temperature"),
        (dict(ot_solver="emd"), "ot_solver"),
        (dict(ot_iterations=0), "ot_iterations"),
        (dict(ot_iterations=2.5), "ot_iterations"),
        (dict(ipot_inner_iterations=0), "ipot_inner_iterations"),
        (dict(ipot_beta=0.0), "ipot_beta"),
        (dict(ipot_beta=-0.5), "ipot_beta"),
        (dict(sinkhorn_epsilon=0.0), "sinkhorn_epsilon"),
        (dict(sinkhorn_epsilon=-0.05), "sinkhorn_epsilon"),
        (dict(code_targets="cross"), "code_targets"),
        (dict(code_weight=-1.0), "code_weight"),
        (dict(ot_weight=-0.5), "ot_weight"),
        # every weight at 0, the codebook ones included: no objective left
        (
            dict(cma_weight=0.0, imc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, code_weight=0.0, ot_weight=0.0),
            "cma_weight",
        ),
        # a shared field, checked by the ALBEF stack
        (dict(queue_size=0), "queue_size"),
    ],
)
def test_codis_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"CODISConfig\.{field}:"):
        tiny_codis_config(**overrides)


def test_config_accepts_codebook_only_objectives_and_reports_solver_settings():
    config = tiny_codis_config(
        cma_weight=0.0,
        imc_weight=0.0,
        itm_weight=0.0,
        mlm_weight=0.0,
        num_fusion_layers=0,
        code_weight=0.0,
        ot_weight=1.0,
        ot_solver="sinkhorn",
        sinkhorn_epsilon=0.1,
        ot_iterations=7,
    )
    assert config.solver_kwargs() == {"epsilon": 0.1, "iterations": 7}
    config = tiny_codis_config(ipot_beta=0.25, ipot_inner_iterations=2, ot_iterations=9)
    assert config.solver_kwargs() == {"beta": 0.25, "iterations": 9, "inner_iterations": 2}
    assert config.code_dim == config.embed_dim == 16
    assert tiny_codis_config(codebook_dim=8).code_dim == 8
    assert tiny_codis_config().code_targets == "swapped"  # the paper's cross-view teaching is the default
    # round trip through the dict / json form
    again = CODISConfig.from_dict(tiny_codis_config(codebook_dim=8, code_targets="own").to_dict())
    assert (again.codebook_dim, again.code_targets, again.codebook_size) == (8, "own", 12)


def test_freeze_qformer_without_qformer_raises():
    with pytest.raises(ValueError, match=r"MIVCConfig\.freeze_qformer"):
        tiny_mivc_digits_config(qformer=False, freeze_qformer=True)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(pooling_mode="sum"), "pooling_mode"),
        (dict(pooling_mode="Attention"), "pooling_mode"),
        (dict(pooling_granularity="patch"), "pooling_granularity"),
        (dict(projector_type="mlp3x_gelu"), "projector_type"),
        (dict(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
        (dict(image_token_id=10_000), "image_token_id"),
        (dict(image_token_id=-1), "image_token_id"),
        (dict(image_token_id="144"), "image_token_id"),
        (dict(image_token_id=True), "image_token_id"),
        (dict(num_query_tokens=0), "num_query_tokens"),
        (dict(pooling_attention_dim=0), "pooling_attention_dim"),
        (dict(freeze_qformer=True), "freeze_qformer"),
    ],
)
def test_mivc_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"MIVCConfig\.{field}"):
        tiny_mivc_digits_config(**overrides)


# ----------------------------------------------------------------------------------------------------------------
# @strict: declared types, checked on assignment too


@pytest.mark.parametrize("config_class", [TCLConfig, CODISConfig, MIVCConfig], ids=lambda c: c.__name__)
def test_every_field_has_a_type_that_strict_checks(config_class):
    """`@strict` skips a field whose annotation is a string (as `from __future__ import annotations` makes every
    annotation): such a field would take any value without a word."""
    for field in dataclasses.fields(config_class):
        if field.name not in BASE_FIELDS:
            assert not isinstance(field.type, str), field.name


@pytest.mark.parametrize(
    "kind, field, value",
    [
        ("tcl", "queue_size", "64"),
        ("tcl", "queue_size", True),
        ("tcl", "alpha", "0.4"),
        ("tcl", "alpha", math.inf),
        ("tcl", "use_momentum", 0),
        ("tcl", "z_estimate", "median"),
        ("codis", "codebook_size", 1),
        ("codis", "ot_solver", None),
        ("mivc", "pooling_mode", "sum"),
        ("mivc", "initializer_range", math.nan),
    ],
)
def test_assignment_after_construction_is_checked(kind, field, value):
    config = MAKERS[kind]()
    before = getattr(config, field)
    with pytest.raises(ValueError, match=rf"^{type(config).__name__}\.{field}: "):
        setattr(config, field, value)
    assert getattr(config, field) == before


def test_ints_pass_for_real_fields_and_the_messages_say_what_was_expected():
    config = tiny_tcl_config(alpha=0, cma_weight=2, temperature_max=1)  # YAML writes `alpha: 0`
    assert (config.alpha, config.cma_weight, config.temperature_max) == (0, 2, 1)
    with pytest.raises(ValueError, match=r"^TCLConfig\.temperature: must be int or float, got '0\.07'$"):
        tiny_tcl_config(temperature="0.07")
    with pytest.raises(ValueError, match=r"^TCLConfig\.z_estimate: must be one of 'batch', 'queue', 'running', "):
        tiny_tcl_config(z_estimate="median")
    with pytest.raises(ValueError, match=r"^TCLConfig\.alpha: must be a finite number, got nan$"):
        tiny_tcl_config(alpha=math.nan)
    with pytest.raises(ValueError, match=r"^TCLConfig\.momentum: must be in \[0, 1\], got 1\.5$"):
        tiny_tcl_config(momentum=1.5)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_save_load_and_dict_round_trips_are_equal(kind, tmp_path):
    config = MAKERS[kind]()
    config.save_pretrained(tmp_path)
    loaded = type(config).from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert type(config).from_dict(config.to_dict()).to_dict() == config.to_dict()


# ---------------------------------------------------------------------------------------------------------------------
# Unknown fields, and a bad value for every field
# ---------------------------------------------------------------------------------------------------------------------


MODELS = {
    "tcl": (TCLModel, tiny_tcl_config),
    "codis": (CODISModel, tiny_codis_config),
    "mivc": (MIVCForConditionalGeneration, tiny_mivc_config),
}


def _vlalign_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("vlalign") and r.levelno >= logging.WARNING]


def _set_config_field(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


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
    assert (
        "'gradient_cache_chunk_size' is not part of the model any more and is ignored: gradient caching is a "
        "training setting (ContrastiveTrainingArguments.gradient_cache_chunk_size" in warnings
    )
    assert "'train_batch_size' is not part of the model any more" in warnings
    assert not hasattr(loaded.config, "gradient_cache_chunk_size") and not hasattr(loaded.config, "train_batch_size")
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert "gradient_cache_chunk_size" not in saved and "train_batch_size" not in saved


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_standard_transformers_keys_do_not_warn(kind, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    make = CONFIGS[kind]
    config = make(
        architectures=["X"],
        auto_map={"AutoConfig": "x.Y"},
        transformers_version="5.0.0",
        dtype="float32",
        torch_dtype="float32",
        model_type=kind,
        id2label={0: "a", 1: "b"},
        label2id={"a": 0, "b": 1},
        num_labels=2,
        name_or_path="somewhere",
        output_attentions=False,
        return_dict=True,
        max_length=20,
        num_beams=1,
    )  # generation parameters of old configs are dropped by transformers
    type(config)(**config.to_dict())
    config.save_pretrained(tmp_path)
    type(config).from_pretrained(tmp_path)
    assert _vlalign_warnings(caplog) == []


# ---------------------------------------------------------------------------------------------------------------
# every field validated


NO_FUSION = dict(num_fusion_layers=0, itm_weight=0.0, mlm_weight=0.0)
SWIN = dict(
    model_type="swin", image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2
)
CONVNEXT = dict(model_type="convnext", image_size=16, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
# configurations patch dropout does not fit: towers that cannot run on a subset of their patch tokens, and ITM / MLM
PATCH_DROPOUT_REFUSALS = [
    dict(patch_dropout=0.5, vision_config=SWIN, **NO_FUSION),
    dict(patch_dropout=0.5, vision_config=CONVNEXT, **NO_FUSION),
    dict(
        patch_dropout=0.5,
        vision_config=dict(TINY_VISION, model_type="beit", use_relative_position_bias=True),
        **NO_FUSION,
    ),
    dict(
        patch_dropout=0.5,
        vision_config=dict(TINY_VISION, model_type="data2vec-vision", use_shared_relative_position_bias=True),
        **NO_FUSION,
    ),
    dict(patch_dropout=0.5),  # ITM and MLM on
    dict(patch_dropout=0.5, itm_weight=0.0),  # MLM on
    dict(patch_dropout=0.5, mlm_weight=0.0),  # ITM on
]


def _albef_bad_values(extra):
    """Bad values for every ALBEFStackConfig field, plus a model's own (`extra`): field -> list of overrides."""
    table = {
        "vision_config": [
            dict(vision_config=dict(TINY_VISION, image_size=18)),
            dict(vision_config=dict(TINY_VISION, patch_size=0)),
        ],
        "text_config": [
            dict(text_config=dict(model_type="gpt2", n_layer=2)),
            dict(text_config=dict(TINY_TEXT, is_decoder=True)),
        ],
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
        "patch_dropout": [
            dict(patch_dropout=1.0, **NO_FUSION),
            dict(patch_dropout=-0.1, **NO_FUSION),
            dict(patch_dropout="0.5", **NO_FUSION),
            *PATCH_DROPOUT_REFUSALS,
        ],
        "mlm_probability": [dict(mlm_probability=0.0), dict(mlm_probability=1.0)],
        "mask_token_id": [
            dict(mask_token_id=999),
            dict(mask_token_id=-1),
            dict(mask_token_id="4"),
            dict(mask_token_id=-1, mlm_weight=0.0),
        ],
        "vision_pooling": [
            dict(vision_pooling="max"),
            dict(vision_pooling=1),
            dict(vision_config=dict(TINY_VISION, model_type="vit_msn"), vision_pooling="pooler"),
        ],
        "text_pooling": [dict(text_pooling="first"), dict(text_pooling=True)],
        "projection": [dict(projection="mlp"), dict(projection="none")],  # none: the towers are 32 wide, embed 16
        "dual_encoder_source": [
            dict(dual_encoder_source="align"),
            dict(dual_encoder_source="clip"),  # with fusion layers and biased projections: not a CLIP
        ],
        "initializer_range": [
            dict(initializer_range=0.0),
            dict(initializer_range=-0.02),
            dict(initializer_range=float("inf")),
        ],
    }
    table.update(extra)
    return table


BAD_VALUES = {
    TCLConfig: (
        tiny_tcl_config,
        _albef_bad_values(
            {
                "lmi_weight": [dict(lmi_weight=-1.0)],
                "lmi_image_grid": [dict(lmi_image_grid=3), dict(lmi_image_grid=0)],
                "contrastive_loss": [
                    dict(contrastive_loss="hinge"),
                    dict(contrastive_loss="decomposable"),
                    dict(contrastive_loss="sigmoid"),
                ],
                "logit_bias_init": [dict(logit_bias_init=float("nan")), dict(logit_bias_init="-10")],
                "z_estimate": [dict(use_momentum=False, z_estimate="median")],
                "sample_u": [dict(sample_u="no")],
                "running_z_momentum": [dict(running_z_momentum=1.0), dict(running_z_momentum="0.1")],
                "num_train_samples": [
                    dict(num_train_samples=0),
                    dict(num_train_samples=2.5),
                    dict(use_momentum=False, contrastive_loss="decomposable", z_estimate="running"),
                ],
                "use_feature_separation": [dict(use_feature_separation=1)],
                "feature_separation_weight": [dict(feature_separation_weight=-1.0)],
                "use_brownian_bridge": [dict(use_brownian_bridge="true")],
                "brownian_bridge_weight": [dict(brownian_bridge_weight=-1.0)],
                "brownian_bridge_t": [dict(brownian_bridge_t=1.5), dict(brownian_bridge_t=0.0)],
                "use_geometric_consistency": [dict(use_geometric_consistency=None)],
                "geometric_consistency_weight": [dict(geometric_consistency_weight=-1.0)],
            }
        ),
    ),
    CODISConfig: (
        tiny_codis_config,
        _albef_bad_values(
            {
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
            }
        ),
    ),
    MIVCConfig: (
        tiny_mivc_config,
        {
            "vision_config": [dict(vision_config=dict(MIVC_VISION, patch_size=0))],
            "text_config": [dict(text_config=dict(MIVC_LLAMA, vocab_size=0))],
            "qformer_config": [
                dict(qformer_config=dict(MIVC_QFORMER, hidden_size=0)),
                dict(qformer_config=dict(MIVC_QFORMER, hidden_size=25)),
            ],
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
        },
    ),
}


@pytest.mark.parametrize("config_class", list(BAD_VALUES), ids=lambda c: c.__name__)
def test_every_config_field_has_a_validation_case(config_class):
    own_fields = {field.name for field in dataclasses.fields(config_class)} - BASE_FIELDS
    assert own_fields == set(BAD_VALUES[config_class][1])


@pytest.mark.parametrize(
    "config_class, field, overrides",
    [
        (cls, field, overrides)
        for cls, (_, table) in BAD_VALUES.items()
        for field, cases in table.items()
        for overrides in cases
    ],
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


@pytest.mark.parametrize(
    "vision",
    [
        dict(TINY_VISION, model_type="siglip_vision_model"),
        dict(
            model_type="swin", image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2
        ),
        dict(model_type="convnext", image_size=16, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    ],
    ids=lambda vision: vision["model_type"],
)
def test_cls_pooling_is_refused_for_towers_without_a_cls_token(vision):
    """Their first output token is a patch or one region of a feature map: taken as the global image feature, it
    would ignore most of the image (measured for Swin: the bottom-right quarter did not change it)."""
    with pytest.raises(ValueError, match=r"TCLConfig.vision_pooling: 'cls' does not fit .* has no \[CLS\] token"):
        tiny_tcl_config(vision_config=vision, vision_pooling="cls")
    assert tiny_tcl_config(vision_config=vision).vision_pooling in ("mean", "pooler")


def test_unsupported_towers_are_refused_with_the_reason():
    siglip2 = dict(model_type="siglip2_vision_model", patch_size=4, hidden_size=32, num_patches=16)
    with pytest.raises(
        ValueError, match=r"vision_config: model_type 'siglip2_vision_model' is not supported: .*NaFlex"
    ):
        tiny_tcl_config(vision_config=siglip2)
    with pytest.raises(ValueError, match=r"vision_config: model_type 'mobilevit' is not supported: .* not known here"):
        tiny_tcl_config(vision_config=dict(model_type="mobilevit", image_size=32, patch_size=2))
    with pytest.raises(ValueError, match=r"text_config: model_type 'gpt2' is not supported as the text tower"):
        tiny_tcl_config(text_config=dict(model_type="gpt2", n_layer=2))
    # a text tower that is not BERT-architecture works only without fusion layers, and says so
    distilbert = dict(model_type="distilbert", vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    with pytest.raises(ValueError, match=r"text_config: fusion layers .* must therefore be BERT-architecture"):
        tiny_tcl_config(text_config=distilbert)
    dual = tiny_tcl_config(text_config=distilbert, num_fusion_layers=0, itm_weight=0.0, mlm_weight=0.0)
    assert (dual.text_config.model_type, dual.text_pooling) == ("distilbert", "cls")


def test_pooling_defaults_follow_the_family():
    """None resolves to the family's own pooling, stored in the config (a saved model keeps it)."""
    clip = dict(TINY_VISION, model_type="clip_vision_model")
    assert tiny_tcl_config(vision_config=clip).vision_pooling == "pooler"  # CLIP's post-layer-normed [CLS]
    assert tiny_tcl_config().vision_pooling == "cls"  # ViT
    beit = dict(TINY_VISION, model_type="beit")
    assert tiny_tcl_config(vision_config=dict(beit, use_mean_pooling=True)).vision_pooling == "pooler"
    assert tiny_tcl_config(vision_config=dict(beit, use_mean_pooling=False)).vision_pooling == "cls"
    assert tiny_tcl_config().to_dict()["text_pooling"] == "cls"


def test_patch_dropout_refusals_say_why():
    for overrides, reason in zip(
        PATCH_DROPOUT_REFUSALS,
        ["swin is hierarchical", "convnext is hierarchical", "relative position bias", "relative position bias"]
        + ["ITM and MLM"] * 3,
    ):
        with pytest.raises(ValueError, match=rf"^TCLConfig\.patch_dropout: 0\.5 .*{reason}"):
            tiny_tcl_config(**overrides)


def test_patch_dropout_is_refused_where_tcl_reads_the_students_patch_grid():
    """LMI without EMA teachers pools the student's own patch tokens on the grid; with EMA teachers its locals are
    the teacher's, which sees every patch, so patch dropout fits."""
    contrastive = dict(NO_FUSION, patch_dropout=0.5)
    with pytest.raises(ValueError, match=r"^TCLConfig\.patch_dropout: .*LMI without EMA teachers"):
        tiny_tcl_config(use_momentum=False, **contrastive)
    assert tiny_tcl_config(use_momentum=False, lmi_weight=0.0, **contrastive).patch_dropout == 0.5
    assert tiny_tcl_config(use_momentum=True, **contrastive).patch_dropout == 0.5
    # CODIS reads only global features (its codebook terms included), with or without teachers
    for use_momentum in (False, True):
        assert tiny_codis_config(use_momentum=use_momentum, **contrastive).patch_dropout == 0.5


@pytest.mark.parametrize(
    "vision",
    [
        dict(TINY_VISION, model_type=model_type)
        for model_type in ("vit", "deit", "beit", "data2vec-vision", "dinov2", "clip_vision_model", "vit_msn")
    ]
    + [
        dict(TINY_VISION, model_type="dinov2_with_registers", num_register_tokens=2),
        dict(TINY_VISION, model_type="siglip_vision_model"),
    ],
    ids=lambda vision: vision["model_type"],
)
def test_patch_dropout_is_accepted_by_the_vit_like_towers(vision):
    assert tiny_tcl_config(vision_config=vision, patch_dropout=0.5, lmi_weight=0.0, **NO_FUSION).patch_dropout == 0.5
