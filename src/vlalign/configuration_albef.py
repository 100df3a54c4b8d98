"""Configuration fields shared by the ALBEF-style models (TCL, CODIS): towers, fusion encoder, contrastive space,
EMA teachers and queues, ITM and MLM. Each model's config subclasses `ALBEFStackConfig` and adds its objectives."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec  # transformers internal (listed in vlalign/__init__.py)

logger = logging.getLogger(__name__)

# Fields a text config must have for us to build BERT-style fusion layers (self-attn + cross-attn + FFN) from it.
BERT_LIKE_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "layer_norm_eps",
    "num_hidden_layers",
    "vocab_size",
)


# Keys that transformers sets on configs besides `PreTrainedConfig`'s fields: `auto_map` (saving custom code) and
# `custom_pipelines` (saving a custom pipeline).
_TRANSFORMERS_EXTRA_KEYS = frozenset({"auto_map", "custom_pipelines"})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (bools excluded): YAML reads `1e-3` as a string, which must not pass as a number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.cache
def _standard_config_keys() -> frozenset:
    """Keys any transformers config may carry: what a default `PreTrainedConfig` serialises (architectures,
    model_type, dtype, transformers_version, id2label, ...) and the class's own attributes and properties
    (num_labels, name_or_path, ...)."""
    return frozenset(PreTrainedConfig().to_dict()) | frozenset(dir(PreTrainedConfig)) | _TRANSFORMERS_EXTRA_KEYS


# fields that configs saved by vlalign 0.1.0 may carry, with where the setting lives now
TRAINING_SETTINGS_FORMERLY_IN_CONFIG = {
    "gradient_cache_chunk_size": "gradient caching is a training setting (ContrastiveTrainingArguments."
                                 "gradient_cache_chunk_size, --gradient_cache_chunk_size in training/train.py)",
    "train_batch_size": "the batch size is the training arguments' (per_device_train_batch_size)",
}


def warn_unknown_fields(config: PreTrainedConfig, extra_kwargs: dict) -> None:
    """Warn about constructor keywords (or config.json keys) that are neither fields of `config` nor standard
    transformers keys: a typo such as `queue_sise` would otherwise become an attribute nothing reads. Called after
    `PreTrainedConfig.__post_init__`, which consumes some keys itself (`torch_dtype`, generation parameters, ...):
    only the ones it stored as attributes are looked at."""
    fields = {field.name for field in dataclasses.fields(config)}
    unknown = sorted(key for key in extra_kwargs
                     if key in vars(config) and key not in fields and key not in _standard_config_keys())
    moved = [key for key in unknown if key in TRAINING_SETTINGS_FORMERLY_IN_CONFIG]
    for key in moved:  # saved by an older vlalign: a run-time setting must not follow the model to the Hub
        delattr(config, key)
        logger.warning("%s: %r is not part of the model any more and is ignored: %s", type(config).__name__, key,
                       TRAINING_SETTINGS_FORMERLY_IN_CONFIG[key])
    unknown = [key for key in unknown if key not in moved]
    if unknown:
        logger.warning("%s: unknown field(s) %s: neither fields of %s nor standard transformers keys, so nothing "
                       "reads them (a typo?)", type(config).__name__, ", ".join(repr(key) for key in unknown),
                       type(config).__name__)


def check_field_types(config: PreTrainedConfig, bool_fields=(), number_fields=()) -> None:
    """`config.fail` on the first flag that is not a bool or value that is not a finite number (checked before
    the range checks, which would otherwise raise a TypeError that names no field)."""
    for field in bool_fields:
        if not isinstance(getattr(config, field), bool):
            config.fail(field, f"must be True or False, got {getattr(config, field)!r}")
    for field in number_fields:
        if not _is_number(getattr(config, field)):
            config.fail(field, f"must be a finite number, got {getattr(config, field)!r}")


def check_positive_int_attributes(config: PreTrainedConfig, field: str, sub_config, attributes, what: str) -> None:
    """`config.fail(field)` unless each of `attributes` of the sub-config `sub_config` is a positive integer."""
    for attribute in attributes:
        value = getattr(sub_config, attribute, None)
        if not _is_int(value) or value <= 0:
            config.fail(field, f"{what} must define `{attribute}` as a positive integer (got {value!r}, model_type "
                               f"{getattr(sub_config, 'model_type', None)!r})")


class ALBEFStackConfig(PreTrainedConfig):
    r"""Fields of the image / text / fusion encoder stack shared by [`TCLConfig`] and [`CODISConfig`].

    Args:
        vision_config: config of any transformers vision encoder that returns [CLS] + patch tokens (ViT, DeiT, CLIP
            vision, ...). Needs `image_size`, `patch_size`, `hidden_size`. Default: ViT-B/16 at 256 px.
        text_config: config of a BERT-like text encoder (BERT, RoBERTa, ELECTRA, ...). Its `num_hidden_layers` is
            the total: the first `num_hidden_layers - num_fusion_layers` layers form the text encoder, the last
            `num_fusion_layers` the fusion encoder (which gains cross-attention to the image tokens).
        num_fusion_layers: number of cross-attention fusion layers (0 disables the fusion encoder, ITM and MLM).
        embed_dim: dimension of the shared contrastive space (`vision_proj` / `text_proj` outputs).
        temperature: initial temperature of every contrastive term; clamped to
            [`temperature_min`, `temperature_max`] on every training step.
        learnable_temperature: whether the temperature is a trained parameter.
        use_momentum: keep EMA (momentum) teachers and feature queues (ALBEF). With `False` the keys are
            in-batch student features (CLIP-style) and no queue is kept.
        momentum: EMA coefficient m in `teacher = m * teacher + (1 - m) * student`.
        queue_size: length of the image / text feature queues (a ring buffer: any size works with any batch; a
            batch larger than the queue keeps its last `queue_size` features).
        alpha: weight of the momentum-distillation (soft) targets in the cross-modal terms and MLM, ramped up by
            the trainer.
        cma_weight, imc_weight: weights of the cross-modal (i2t + t2i) and intra-modal (i2i + t2t) contrastive
            terms (how the model combines them is documented on each model's config).
        itm_weight, mlm_weight: weights of the ITM and MLM losses (0 disables the term and its forward passes).
        itm_hard_negatives: sample ITM negatives from the contrastive similarity (else uniformly).
        mlm_probability: fraction of tokens masked for MLM.
        mask_token_id: id of the tokenizer's mask token (103 in bert-base-uncased). Set from the tokenizer.
        initializer_range: std of the normal init of the projections and heads.
    """

    sub_configs_defaults = {
        # the papers' towers: ViT-B/16 at 256 px (16x16 patch grid) and bert-base
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", init_kwargs={"image_size": 256}),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }
    # non-negative loss weights of this model (subclasses extend)
    loss_weight_fields = ("cma_weight", "imc_weight", "itm_weight", "mlm_weight")
    # flags and real-valued fields, type-checked before any range check (subclasses extend)
    bool_fields = ("learnable_temperature", "use_momentum", "itm_hard_negatives")
    number_fields = ("temperature", "temperature_min", "temperature_max", "momentum", "alpha", "mlm_probability",
                     "initializer_range")

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    num_fusion_layers: int = 6
    embed_dim: int = 256
    temperature: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    learnable_temperature: bool = True
    use_momentum: bool = True
    momentum: float = 0.995
    queue_size: int = 65536
    alpha: float = 0.4
    cma_weight: float = 1.0
    imc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    itm_hard_negatives: bool = True
    mlm_probability: float = 0.15
    mask_token_id: int = 103
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        warn_unknown_fields(self, kwargs)
        self.validate_fields()

    # ---------------------------------------------------------------------------------------------------------
    @property
    def num_text_layers(self) -> int:
        """Layers of the text encoder proper (the rest of `text_config.num_hidden_layers` is fusion)."""
        return self.text_config.num_hidden_layers - self.num_fusion_layers

    @property
    def patch_grid_size(self) -> int:
        """Side of the vision encoder's patch grid."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def uses_queue(self) -> bool:
        """Whether the model keeps image / text feature queues."""
        return self.use_momentum

    def has_objective(self) -> bool:
        """Whether at least one loss is switched on (subclasses add theirs)."""
        return any(getattr(self, field) > 0 for field in self.loss_weight_fields)

    def fail(self, field: str, message: str):
        raise ValueError(f"{type(self).__name__}.{field}: {message}")

    def validate_fields(self) -> None:
        """Raise `ValueError` naming the first invalid field (subclasses call this, then check their own)."""
        fail = self.fail
        vision, text = self.vision_config, self.text_config
        check_field_types(self, self.bool_fields, self.number_fields + self.loss_weight_fields)
        check_positive_int_attributes(self, "vision_config", vision, ("image_size", "patch_size", "hidden_size"),
                                      "the vision encoder must output patch tokens and")
        if vision.image_size % vision.patch_size != 0:
            fail("vision_config", f"image_size {vision.image_size} is not divisible by patch_size {vision.patch_size}")
        missing = [f for f in BERT_LIKE_FIELDS if getattr(text, f, None) is None]
        if missing:
            fail(
                "text_config",
                f"a BERT-like text encoder config is required (model_type {getattr(text, 'model_type', None)!r} "
                f"lacks {missing})",
            )
        check_positive_int_attributes(self, "text_config", text, ("hidden_size", "num_hidden_layers", "vocab_size"),
                                      "the text encoder")
        if getattr(text, "is_decoder", False):
            fail("text_config", "the text encoder must be bidirectional (is_decoder=True is not supported)")

        if not _is_int(self.num_fusion_layers) or self.num_fusion_layers < 0:
            fail("num_fusion_layers", f"must be an integer >= 0, got {self.num_fusion_layers!r}")
        if self.num_fusion_layers >= text.num_hidden_layers:
            fail(
                "num_fusion_layers",
                f"{self.num_fusion_layers} leaves no layer for the text encoder (text_config.num_hidden_layers="
                f"{text.num_hidden_layers})",
            )
        if self.num_fusion_layers == 0 and (self.itm_weight > 0 or self.mlm_weight > 0):
            fail(
                "num_fusion_layers",
                "ITM and MLM need cross-attention fusion layers: set num_fusion_layers > 0 or itm_weight = "
                "mlm_weight = 0",
            )
        if not _is_int(self.embed_dim) or self.embed_dim <= 0:
            fail("embed_dim", f"must be a positive integer, got {self.embed_dim!r}")
        if not self.temperature_min > 0:
            fail("temperature_min", f"must be > 0, got {self.temperature_min}")
        if not self.temperature_max >= self.temperature_min:
            fail("temperature_max", f"{self.temperature_max} is below temperature_min {self.temperature_min}")
        if not self.temperature > 0:
            fail("temperature", f"must be > 0, got {self.temperature}")
        if not self.temperature_min <= self.temperature <= self.temperature_max:
            fail(
                "temperature",
                f"{self.temperature} is outside [temperature_min, temperature_max] = "
                f"[{self.temperature_min}, {self.temperature_max}]",
            )
        if not 0.0 <= self.momentum <= 1.0:
            fail("momentum", f"must be in [0, 1], got {self.momentum}")
        if not 0.0 <= self.alpha <= 1.0:
            fail("alpha", f"must be in [0, 1], got {self.alpha}")
        if not _is_int(self.queue_size) or self.queue_size < 0:
            fail("queue_size", f"must be an integer >= 0, got {self.queue_size!r}")
        if self.uses_queue:
            if self.queue_size == 0:
                fail("queue_size", f"must be a positive integer when a queue is used, got {self.queue_size!r}")
        for field in self.loss_weight_fields:
            if getattr(self, field) < 0:
                fail(field, f"must be >= 0, got {getattr(self, field)}")
        if not self.has_objective():
            fail("cma_weight", "at least one loss weight must be > 0")
        if not 0.0 < self.mlm_probability < 1.0:
            fail("mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")
        if self.mask_token_id is not None and not (_is_int(self.mask_token_id) and self.mask_token_id >= 0):
            fail("mask_token_id", f"must be None or a token id (an integer >= 0), got {self.mask_token_id!r}")
        if self.mlm_weight > 0 and not (_is_int(self.mask_token_id) and 0 <= self.mask_token_id < text.vocab_size):
            fail("mask_token_id",
                 f"{self.mask_token_id!r} is not a token id of the text vocabulary ({text.vocab_size})")
        if not self.initializer_range > 0:
            fail("initializer_range", f"must be > 0 (the std of the normal init), got {self.initializer_range}")


__all__ = ["ALBEFStackConfig", "BERT_LIKE_FIELDS"]
