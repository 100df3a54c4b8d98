"""The configs on their own (no model built): every rule raises a `ValueError` naming the field, types are
`@strict`'s (bools are not ints, strings are not numbers, NaN / inf refused), assignment after construction is
checked too, and a config survives `save_pretrained` / `from_pretrained` and `to_dict` / `from_dict` unchanged.

The table of a bad value for every field, and the unknown-field warnings, are in test_checkpoints.py."""

import dataclasses
import math

import pytest
from fixtures import tiny_codis_config, tiny_tcl_config
from transformers import PreTrainedConfig

from vlalign import CODISConfig, MIVCConfig, TCLConfig

# test_modeling_mivc's tiny MIVC parts; the Llama has the size of its digits tokenizer (145 tokens, <image> = 144)
VISION = dict(
    model_type="vit", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
    num_attention_heads=4, intermediate_size=64,
)
QFORMER = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
NUM_QUERIES = 4
LLAMA = dict(
    model_type="llama", vocab_size=145, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256, bos_token_id=2, eos_token_id=3,
    pad_token_id=0,
)
IMAGE_TOKEN_ID = 144


def _config(mode="attention", qformer=False, granularity="token", **overrides):
    """test_modeling_mivc's `_config`, without loading the tokenizer."""
    kwargs = dict(
        vision_config=dict(VISION), text_config=dict(LLAMA), qformer_config=dict(QFORMER) if qformer else None,
        num_query_tokens=NUM_QUERIES, image_token_id=IMAGE_TOKEN_ID, pooling_mode=mode,
        pooling_granularity=granularity, pooling_attention_dim=16, freeze_vision_model=False,
        freeze_language_model=False,
    )
    kwargs.update(overrides)
    return MIVCConfig(**kwargs)


MAKERS = {"tcl": tiny_tcl_config, "codis": tiny_codis_config, "mivc": lambda **kw: _config(qformer=True, **kw)}
BASE_FIELDS = {field.name for field in dataclasses.fields(PreTrainedConfig)}


# ----------------------------------------------------------------------------------------------------------------
# moved from test_modeling_tcl.py, test_modeling_codis.py and test_modeling_mivc.py


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(queue_size=0), "queue_size"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(momentum=1.5), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(lmi_image_grid=3), "lmi_image_grid"),
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
        (dict(cma_weight=0.0, imc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, code_weight=0.0, ot_weight=0.0),
         "cma_weight"),
        # a shared field, checked by the ALBEF stack
        (dict(queue_size=0), "queue_size"),
    ],
)
def test_codis_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"CODISConfig\.{field}:"):
        tiny_codis_config(**overrides)


def test_config_accepts_codebook_only_objectives_and_reports_solver_settings():
    config = tiny_codis_config(cma_weight=0.0, imc_weight=0.0, itm_weight=0.0, mlm_weight=0.0, num_fusion_layers=0,
                               code_weight=0.0, ot_weight=1.0, ot_solver="sinkhorn", sinkhorn_epsilon=0.1,
                               ot_iterations=7)
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
        _config(qformer=False, freeze_qformer=True)


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
        _config(**overrides)


# ----------------------------------------------------------------------------------------------------------------
# @strict: declared types, checked on assignment too


@pytest.mark.parametrize("config_class", [TCLConfig, CODISConfig, MIVCConfig], ids=lambda c: c.__name__)
def test_every_field_has_a_type_that_strict_checks(config_class):
    """`@strict` skips a field whose annotation is a string (as `from __future__ import annotations` makes every
    annotation): such a field would take any value without a word."""
    for field in dataclasses.fields(config_class):
        if field.name not in BASE_FIELDS:
            assert not isinstance(field.type, str), field.name


@pytest.mark.parametrize("kind, field, value", [
    ("tcl", "queue_size", "64"), ("tcl", "queue_size", True), ("tcl", "alpha", "0.4"), ("tcl", "alpha", math.inf),
    ("tcl", "use_momentum", 0), ("tcl", "z_estimate", "median"), ("codis", "codebook_size", 1),
    ("codis", "ot_solver", None), ("mivc", "pooling_mode", "sum"), ("mivc", "initializer_range", math.nan),
])
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
