"""Configuration fields shared by the ALBEF-style models (TCL, CODIS): towers, fusion encoder, contrastive space,
EMA teachers and queues, ITM and MLM. Each model's config subclasses `ALBEFStackConfig` and adds its objectives.

The configs are `huggingface_hub` strict dataclasses, like transformers' own: `@strict` checks a field's declared type
(and its range, where the field has an `interval` validator) whenever the field is set, and runs the `validate_*`
methods, which hold the rules that tie fields together, once construction is done. `strict_config` raises both kinds
of failure as a `ValueError` whose message starts with "<Config>.<field>: "."""

# No `from __future__ import annotations` here or in the model configs: `@strict` skips a field whose annotation is
# a string, so every type check would silently go (tests/test_configuration.py checks).
import dataclasses
import functools
import logging
import math
import types
import typing
from typing import Literal

from huggingface_hub.dataclasses import as_validated_field, strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec  # transformers internal (listed in vlalign/__init__.py)

from .towers import (
    CLS_VISION_MODEL_TYPES,
    FUSION_TEXT_MODEL_TYPES,
    REFUSED_VISION_MODEL_TYPES,
    TEXT_MODEL_TYPES,
    VISION_MODEL_TYPES,
    default_text_pooling,
    default_vision_pooling,
    patch_dropout_refusal,
    text_poolings,
    vision_downsampling,
    vision_grid_size,
    vision_hidden_size,
    vision_poolings,
)

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

# The type of real-valued fields. Ints pass (`alpha: 0` in a YAML file); bools do not (`@strict`'s int check refuses
# them), nor strings: YAML reads `1e-3` as a string, which must not pass as a number.
Real = int | float


# Keys that transformers sets on configs besides `PreTrainedConfig`'s fields: `auto_map` (saving custom code) and
# `custom_pipelines` (saving a custom pipeline).
_TRANSFORMERS_EXTRA_KEYS = frozenset({"auto_map", "custom_pipelines"})


class ConfigFieldError(ValueError):
    """An invalid config value; the message is "<Config>.<field>: <what is wrong>"."""


def interval(low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """A dataclass field with a `@strict` validator, used as `interval(0, 1)(default=0.5)`: the value must be a
    finite number within the bounds (inclusive unless `low_open` / `high_open`). None passes: the field's type says
    whether None is allowed. It runs after `@strict`'s type check, so it only sees values of the declared type."""
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low}"
    else:
        bounds = f"{'<' if high_open else '<='} {high}"

    def check(value):
        if value is None:
            return
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(f"must be {bounds}, got {value!r}")
        if high is not None and (value >= high if high_open else value > high):
            raise ValueError(f"must be {bounds}, got {value!r}")

    return as_validated_field(check)


positive = interval(0, low_open=True)
non_negative = interval(0)


def _describe(annotation) -> str:
    """A field type in words: `int | None` -> "int or None", `Literal["a", "b"]` -> "one of 'a', 'b'"."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def strict_config(cls):
    """`huggingface_hub`'s `@strict` for a vlalign config, with its failures raised as `ConfigFieldError` (a
    `ValueError` naming "<Config>.<field>"): a field of the wrong type or out of its range when it is set, and a
    `validate_*` rule (which raises through `config.fail`) at construction. `@strict` raises its own exception
    classes, which are not `ValueError`s, and names the field (or the validator) in its own words.

    Every config class needs it, subclasses included: `@strict` gives validators to the fields of the class it
    decorates, and transformers regenerates each subclass's `__init__`, which runs no `validate_*` undecorated.
    `@strict` runs the `validate_*` methods in `dir()` order, i.e. alphabetically: `validate_architecture`, which
    checks the sub-configs, comes before the others, which may read the sub-configs' sizes."""
    cls = strict(cls)
    strict_init, strict_setattr = cls.__init__, cls.__setattr__

    @functools.wraps(strict_init)
    def __init__(self, *args, **kwargs):
        try:
            strict_init(self, *args, **kwargs)
        except StrictDataclassClassValidationError as err:
            # one of our validate_* rules: its error names the field already. Others (a sub-config's own validation,
            # transformers' rules on its base fields) stay as transformers raises them.
            if isinstance(err.__cause__, ConfigFieldError):
                raise err.__cause__ from None
            raise

    def __setattr__(self, name, value):
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as err:
            cause = err.__cause__
            if isinstance(cause, ValueError):  # a range validator's message
                reason = str(cause)
            else:  # @strict's TypeError: said from the declared type
                reason = f"must be {_describe(type(self).__dataclass_fields__[name].type)}, got {value!r}"
            raise ConfigFieldError(f"{type(self).__name__}.{name}: {reason}") from err

    cls.__init__ = __init__
    cls.__setattr__ = __setattr__
    return cls


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
    unknown = sorted(
        key for key in extra_kwargs if key in vars(config) and key not in fields and key not in _standard_config_keys()
    )
    moved = [key for key in unknown if key in TRAINING_SETTINGS_FORMERLY_IN_CONFIG]
    for key in moved:  # saved by an older vlalign: a run-time setting must not follow the model to the Hub
        delattr(config, key)
        logger.warning(
            "%s: %r is not part of the model any more and is ignored: %s",
            type(config).__name__,
            key,
            TRAINING_SETTINGS_FORMERLY_IN_CONFIG[key],
        )
    unknown = [key for key in unknown if key not in moved]
    if unknown:
        logger.warning(
            "%s: unknown field(s) %s: neither fields of %s nor standard transformers keys, so nothing "
            "reads them (a typo?)",
            type(config).__name__,
            ", ".join(repr(key) for key in unknown),
            type(config).__name__,
        )


def check_positive_int_attributes(config: PreTrainedConfig, field: str, sub_config, attributes, what: str) -> None:
    """`config.fail(field)` unless each of `attributes` of the sub-config `sub_config` is a positive integer.
    Checked by hand: a sub-config is any transformers config class (AutoConfig), whose types and ranges are its
    own (`image_size` may be a pair, `hidden_size` 0, an attribute missing), out of reach of our `@strict` types."""
    for attribute in attributes:
        value = getattr(sub_config, attribute, None)
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            config.fail(
                field,
                f"{what} must define `{attribute}` as a positive integer (got {value!r}, model_type "
                f"{getattr(sub_config, 'model_type', None)!r})",
            )


@strict_config
class ALBEFStackConfig(PreTrainedConfig):
    r"""Fields of the image / text / fusion encoder stack shared by [`TCLConfig`] and [`CODISConfig`].

    Args:
        vision_config: config of a transformers vision encoder of `VISION_MODEL_TYPES`: ViT, DeiT, BEiT,
            Data2Vec-vision, DINOv2 with or without registers, CLIP vision, ViT-MSN ([CLS] + prefix tokens + patch
            grid), SigLIP vision (patch grid), Swin, ConvNeXt (the last stage's feature map); others are refused.
            Default: ViT-B/16 at 256 px.
        text_config: config of a text encoder of `TEXT_MODEL_TYPES`: BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT,
            ModernBERT, CLIP text. With fusion layers it must be BERT-architecture (`FUSION_TEXT_MODEL_TYPES`: BERT,
            RoBERTa, XLM-R, ELECTRA): its `num_hidden_layers` is then the total, the first `num_hidden_layers -
            num_fusion_layers` layers form the text encoder and the last `num_fusion_layers` the fusion encoder
            (which gains cross-attention to the image tokens).
        vision_pooling, text_pooling: how a tower's output becomes the global feature that is projected into the
            contrastive space: `cls` (the [CLS] token), `mean` (the average patch token; the average unpadded
            token), `pooler` (the family's own pooler: CLIP's post-layer-normed [CLS] and end-of-text token,
            SigLIP's attention-pooling head, ConvNeXt's normed average, ...). None: the family's own default
            (`towers.default_vision_pooling` / `default_text_pooling`), stored in the config.
        projection: `vision_proj` / `text_proj` into the contrastive space: `linear` (ALBEF), `linear_no_bias`
            (CLIP's), or `none` (SigLIP's: the towers' poolers end in the shared space, so `embed_dim` is both
            towers' width).
        dual_encoder_source: the transformers dual encoder the model was built from by
            `from_dual_encoder_pretrained` (`clip`: `CLIPModel`, `siglip`: `SiglipModel`,
            `vision-text-dual-encoder`: `VisionTextDualEncoderModel`), which `save_pretrained(...,
            as_source_architecture=True)` writes back.
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
        patch_dropout: share of the image's patch tokens dropped at random in each training forward of the student
            vision tower (FLIP, Li et al. 2023): each image keeps its prefix tokens ([CLS], registers, DeiT's
            distillation token) and `max(1, int(N * (1 - patch_dropout)))` of its N patch tokens (open_clip's
            count), chosen after the position embeddings are added; the tower's layers run on the kept tokens
            only, which is where the speed-up comes from. The EMA teachers and evaluation (eval mode) see every
            patch. 0 turns it off. It needs a ViT-like tower whose layers take any number of tokens (not Swin or
            ConvNeXt, nor BEiT / Data2Vec-vision with a relative position bias), and objectives that read only
            the student's global image feature: ITM and MLM must be off (FLIP trains the contrastive objective
            alone; fused with a caption, an image missing half of its patches would ask MLM to predict words about
            regions that are gone, a different objective from the one these models define), and so must any
            objective that reads the student's patch grid (TCL's LMI without EMA teachers).
        mlm_probability: fraction of tokens masked for MLM.
        mask_token_id: id of the tokenizer's mask token (103 in bert-base-uncased). Set from the tokenizer.
        initializer_range: std of the normal init of the projections and heads.

    Real-valued fields take ints or floats, finite; flags take only `True` / `False`. An invalid value raises a
    `ValueError` naming the field ([`ConfigFieldError`]).
    """

    sub_configs_defaults = {
        # the papers' towers: ViT-B/16 at 256 px (16x16 patch grid) and bert-base
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", init_kwargs={"image_size": 256}),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }
    # non-negative loss weights of this model (subclasses extend)
    loss_weight_fields = ("cma_weight", "imc_weight", "itm_weight", "mlm_weight")

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    num_fusion_layers: int = non_negative(default=6)
    embed_dim: int = positive(default=256)
    temperature: Real = positive(default=0.07)
    temperature_min: Real = positive(default=0.001)
    temperature_max: Real = positive(default=0.5)
    learnable_temperature: bool = True
    use_momentum: bool = True
    momentum: Real = interval(0, 1)(default=0.995)
    queue_size: int = non_negative(default=65536)
    alpha: Real = interval(0, 1)(default=0.4)
    cma_weight: Real = non_negative(default=1.0)
    imc_weight: Real = non_negative(default=1.0)
    itm_weight: Real = non_negative(default=1.0)
    mlm_weight: Real = non_negative(default=1.0)
    itm_hard_negatives: bool = True
    patch_dropout: Real = interval(0, 1, high_open=True)(default=0.0)
    mlm_probability: Real = interval(0, 1, low_open=True, high_open=True)(default=0.15)
    mask_token_id: int | None = non_negative(default=103)
    initializer_range: Real = positive(default=0.02)
    vision_pooling: Literal["cls", "mean", "pooler"] | None = None
    text_pooling: Literal["cls", "mean", "pooler"] | None = None
    projection: Literal["linear", "linear_no_bias", "none"] = "linear"
    dual_encoder_source: Literal["clip", "siglip", "vision-text-dual-encoder"] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        warn_unknown_fields(self, kwargs)
        # None: the family's own pooling, written into the config so that a saved model keeps it
        if self.vision_pooling is None and getattr(self.vision_config, "model_type", None) in VISION_MODEL_TYPES:
            self.vision_pooling = default_vision_pooling(self.vision_config)
        if self.text_pooling is None and getattr(self.text_config, "model_type", None) in TEXT_MODEL_TYPES:
            self.text_pooling = default_text_pooling(self.text_config)

    # ---------------------------------------------------------------------------------------------------------
    @property
    def num_text_layers(self) -> int:
        """Layers of the text encoder proper (the rest of `text_config.num_hidden_layers` is fusion)."""
        return self.text_config.num_hidden_layers - self.num_fusion_layers

    @property
    def patch_grid_size(self) -> int:
        """Side of the vision encoder's output token grid (for Swin / ConvNeXt, the last stage's feature map)."""
        return vision_grid_size(self.vision_config)

    @property
    def uses_queue(self) -> bool:
        """Whether the model keeps image / text feature queues."""
        return self.use_momentum

    def has_objective(self) -> bool:
        """Whether at least one loss is switched on (subclasses add theirs)."""
        return any(getattr(self, field) > 0 for field in self.loss_weight_fields)

    def fail(self, field: str, message: str):
        raise ConfigFieldError(f"{type(self).__name__}.{field}: {message}")

    # `validate_*`: the rules between fields, run by `@strict` after construction (see `strict_config`)
    def validate_architecture(self):
        """The towers: a vision family of `VISION_MODEL_TYPES` with a square token grid, a bidirectional text
        family of `TEXT_MODEL_TYPES` (BERT-architecture, `FUSION_TEXT_MODEL_TYPES`, when there are fusion layers)
        with layers left for it besides the fusion layers, poolings the families have, and fusion layers if ITM or
        MLM is on."""
        super().validate_architecture()
        self._validate_vision_tower()
        self._validate_text_tower()
        if self.num_fusion_layers == 0 and (self.itm_weight > 0 or self.mlm_weight > 0):
            self.fail(
                "num_fusion_layers",
                "ITM and MLM need cross-attention fusion layers: set num_fusion_layers > 0 or itm_weight = "
                "mlm_weight = 0",
            )

    def _validate_vision_tower(self):
        vision, fail = self.vision_config, self.fail
        model_type = getattr(vision, "model_type", None)
        if model_type not in VISION_MODEL_TYPES:
            why = REFUSED_VISION_MODEL_TYPES.get(
                model_type, "its output layout (where the global feature and the patch grid are) is not known here"
            )
            fail(
                "vision_config",
                f"model_type {model_type!r} is not supported: {why}. Supported vision towers: "
                f"{', '.join(VISION_MODEL_TYPES)}",
            )
        # ConvNeXt's widths are per stage (hidden_sizes), read by vision_hidden_size
        sizes = (
            ("image_size", "patch_size") if model_type == "convnext" else ("image_size", "patch_size", "hidden_size")
        )
        check_positive_int_attributes(self, "vision_config", vision, sizes, "the vision encoder")
        stride = vision_downsampling(vision)
        if vision.image_size % stride != 0:
            fail(
                "vision_config",
                f"image_size {vision.image_size} is not a multiple of {stride} (patch_size {vision.patch_size}"
                + (", x2 per stage after the first" if stride != vision.patch_size else "")
                + "): the output tokens would not cover the image as a square grid",
            )
        allowed = vision_poolings(vision)
        if self.vision_pooling not in allowed:
            reason = "it has no [CLS] token" if self.vision_pooling == "cls" else "it has no pooler"
            fail(
                "vision_pooling", f"{self.vision_pooling!r} does not fit {model_type} ({reason}): use one of {allowed}"
            )

    def _validate_text_tower(self):
        text, fail = self.text_config, self.fail
        model_type = getattr(text, "model_type", None)
        if model_type not in TEXT_MODEL_TYPES:
            fail(
                "text_config",
                f"model_type {model_type!r} is not supported as the text tower (its pooling and token layout are not "
                f"known here). Supported: {', '.join(TEXT_MODEL_TYPES)}",
            )
        if self.num_fusion_layers > 0 and model_type not in FUSION_TEXT_MODEL_TYPES:
            fail(
                "text_config",
                f"fusion layers (num_fusion_layers={self.num_fusion_layers}) are BERT layers with cross-attention, "
                f"built from the text tower's upper layers, which must therefore be BERT-architecture "
                f"({', '.join(FUSION_TEXT_MODEL_TYPES)}); {model_type!r} layers are not. Use such a text tower, or "
                "a dual encoder without fusion: num_fusion_layers=0, itm_weight=0, mlm_weight=0",
            )
        if self.num_fusion_layers > 0:
            missing = [f for f in BERT_LIKE_FIELDS if getattr(text, f, None) is None]
            if missing:
                fail("text_config", f"the fusion layers are built from BERT's fields; {model_type!r} lacks {missing}")
        check_positive_int_attributes(
            self, "text_config", text, ("hidden_size", "num_hidden_layers", "vocab_size"), "the text encoder"
        )
        if getattr(text, "is_decoder", False):
            fail("text_config", "the text encoder must be bidirectional (is_decoder=True is not supported)")
        if self.num_fusion_layers >= text.num_hidden_layers:
            fail(
                "num_fusion_layers",
                f"{self.num_fusion_layers} leaves no layer for the text encoder (text_config.num_hidden_layers="
                f"{text.num_hidden_layers})",
            )
        allowed = text_poolings(text)
        if self.text_pooling not in allowed:
            fail("text_pooling", f"{self.text_pooling!r} does not fit {model_type}: use one of {allowed}")
        if model_type == "siglip_text_model" and text.projection_size != text.hidden_size:
            fail("text_config", "SigLIP's text head must keep the width (projection_size == hidden_size)")

    def validate_projection(self):
        """Without projections the towers' pooled features are the embeddings: their widths are embed_dim."""
        if self.projection != "none":
            return
        widths = {"vision": vision_hidden_size(self.vision_config), "text": self.text_config.hidden_size}
        if any(width != self.embed_dim for width in widths.values()):
            self.fail("projection", f"'none' needs both towers {widths} as wide as embed_dim {self.embed_dim}")

    def validate_dual_encoder_source(self):
        """A model that is written back as a transformers dual encoder has that dual encoder's structure."""
        if self.dual_encoder_source is None:
            return
        projection = "none" if self.dual_encoder_source == "siglip" else "linear_no_bias"
        expected = dict(num_fusion_layers=0, vision_pooling="pooler", text_pooling="pooler", projection=projection)
        wrong = {k: getattr(self, k) for k, v in expected.items() if getattr(self, k) != v}
        if wrong:
            self.fail(
                "dual_encoder_source",
                f"{self.dual_encoder_source!r} models have {expected}; this config has {wrong}",
            )

    def validate_temperature(self):
        """temperature_min <= temperature <= temperature_max (each is > 0 by its field)."""
        if not self.temperature_max >= self.temperature_min:
            self.fail("temperature_max", f"{self.temperature_max} is below temperature_min {self.temperature_min}")
        if not self.temperature_min <= self.temperature <= self.temperature_max:
            self.fail(
                "temperature",
                f"{self.temperature} is outside [temperature_min, temperature_max] = "
                f"[{self.temperature_min}, {self.temperature_max}]",
            )

    def validate_queue(self):
        """A model that keeps queues needs room in them."""
        if self.uses_queue and self.queue_size == 0:
            self.fail("queue_size", f"must be a positive integer when a queue is used, got {self.queue_size!r}")

    def validate_loss_weights(self):
        """At least one objective (each weight is >= 0 by its field)."""
        if not self.has_objective():
            self.fail("cma_weight", "at least one loss weight must be > 0")

    def objectives_reading_student_patch_grid(self) -> list[str]:
        """The switched-on objectives that read the student's patch tokens on the full grid, which patch dropout
        takes away (subclasses add theirs)."""
        return []

    def validate_patch_dropout(self):
        """Patch dropout needs a vision tower that can run on a subset of its patch tokens, and objectives that
        read only the student's global image feature."""
        if self.patch_dropout == 0:
            return
        refusal = patch_dropout_refusal(self.vision_config)
        if refusal is not None:
            self.fail("patch_dropout", f"{self.patch_dropout} needs a ViT-like vision tower: {refusal}")
        if self.itm_weight > 0 or self.mlm_weight > 0:
            self.fail(
                "patch_dropout",
                f"{self.patch_dropout} is for the contrastive objectives (as FLIP): ITM and MLM would fuse the "
                "caption with an image missing dropped patches; set itm_weight = mlm_weight = 0",
            )
        grid_objectives = self.objectives_reading_student_patch_grid()
        if grid_objectives:
            self.fail(
                "patch_dropout",
                f"{self.patch_dropout} takes away the student's patch grid, which {'; '.join(grid_objectives)} reads",
            )

    def validate_mlm(self):
        """MLM masks with a token of the text vocabulary."""
        vocab_size = self.text_config.vocab_size
        if self.mlm_weight > 0 and not (self.mask_token_id is not None and self.mask_token_id < vocab_size):
            self.fail(
                "mask_token_id", f"{self.mask_token_id!r} is not a token id of the text vocabulary ({vocab_size})"
            )


__all__ = [
    "ALBEFStackConfig",
    "BERT_LIKE_FIELDS",
    "CLS_VISION_MODEL_TYPES",
    "ConfigFieldError",
    "FUSION_TEXT_MODEL_TYPES",
    "TEXT_MODEL_TYPES",
    "VISION_MODEL_TYPES",
]
