"""Configuration of MIVC (Multiple Instance Visual Component, Wu et al., WACV 2024)."""

import typing
from typing import Literal

from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec  # transformers internal (listed in vlalign/__init__.py)

from .configuration_albef import (
    ConfigFieldError,
    Real,
    check_positive_int_attributes,
    non_negative,
    positive,
    strict_config,
    warn_unknown_fields,
)

PoolingMode = Literal["mean", "max", "attention", "gated_attention", "concatenate"]
POOLING_MODES = typing.get_args(PoolingMode)


@strict_config
class MIVCConfig(PreTrainedConfig):
    r"""Configuration of [`MIVCForConditionalGeneration`]: vision encoder per image -> optional Q-Former ->
    MIVC pooling over the images of an item -> projector -> visual tokens spliced into a causal LM.

    Args:
        vision_config: config of any transformers vision encoder returning token states (ViT, CLIP vision, ...).
        text_config: config of any transformers causal LM (Llama, GPT-2, Qwen2, ...).
        qformer_config: optional `Blip2QFormerConfig` (BLIP-2 style): `num_query_tokens` learned queries read each
            image's tokens; its `encoder_hidden_size` is set to the vision width. None: the image tokens themselves.
        num_query_tokens: number of Q-Former queries (tokens per image with a Q-Former).
        vision_feature_select_strategy: "default" drops the vision encoder's prefix tokens ([CLS]) and keeps the patch
            tokens (LLaVA's default); "full" keeps every token.
        pooling_mode: "mean", "max", "attention", "gated_attention" (MIVC: the images of an item are fused into one
            token sequence, order-invariantly) or "concatenate" (baseline: every image's tokens, one after another).
        pooling_attention_dim: hidden size L of the attention scorer (V: D -> L, w: L -> 1).
        pooling_granularity: "token" (each token position pooled over the images with its own weights) or "image"
            (one weight per image, scored from its mean token).
        projector_type: "linear" or "mlp2x_gelu" (Linear -> GELU -> Linear, LLaVA-1.5) into the LM's width.
        freeze_vision_model, freeze_qformer, freeze_language_model: exclude those parts from training (BLIP-2
            convention: vision encoder and LM frozen, the rest trained). Frozen parts also stay in eval mode.
        image_token_id: id of the image placeholder token in the LM vocabulary (set from the processor's tokenizer).
        initializer_range: std of the normal init of the projector, pooling and query tokens.

    An invalid value raises a `ValueError` naming the field ([`ConfigFieldError`]).
    """

    model_type = "mivc"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "qformer_config": SubConfigSpec(config_class=Blip2QFormerConfig, optional=True),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    qformer_config: PreTrainedConfig | dict | None = None
    num_query_tokens: int = positive(default=32)
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    pooling_mode: PoolingMode = "attention"
    pooling_attention_dim: int = positive(default=128)
    pooling_granularity: Literal["token", "image"] = "token"
    projector_type: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"
    freeze_vision_model: bool = True
    freeze_qformer: bool = False
    freeze_language_model: bool = True
    image_token_id: int | None = non_negative(default=None)
    initializer_range: Real = positive(default=0.02)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.qformer_config is not None:
            # the Q-Former cross-attends to the vision tokens
            self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        warn_unknown_fields(self, kwargs)

    def fail(self, field: str, message: str):
        raise ConfigFieldError(f"{type(self).__name__}.{field}: {message}")

    @property
    def vision_feature_dim(self) -> int:
        """Width of the per-image features that MIVC pools (the Q-Former's, or the vision encoder's)."""
        config = self.qformer_config or self.vision_config
        return config.hidden_size

    @property
    def image_seq_length(self) -> int:
        """Visual tokens per image (Q-Former queries, or the vision encoder's selected tokens)."""
        if self.qformer_config is not None:
            return self.num_query_tokens
        vision = self.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches if self.vision_feature_select_strategy == "default" else patches + 1

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        # generation settings (eos / pad / vocabulary) come from the language model
        return self.text_config

    # `validate_*`: the rules between fields, run by `@strict` after construction (see `strict_config`)
    def validate_architecture(self):
        """The vision encoder, the language model and the optional Q-Former have positive sizes."""
        super().validate_architecture()
        check_positive_int_attributes(
            self, "vision_config", self.vision_config, ("hidden_size", "image_size", "patch_size"), "the vision encoder"
        )
        check_positive_int_attributes(
            self, "text_config", self.text_config, ("hidden_size", "vocab_size"), "the language model"
        )
        if self.qformer_config is not None:
            qformer = self.qformer_config
            check_positive_int_attributes(
                self, "qformer_config", qformer, ("hidden_size", "num_attention_heads"), "the Q-Former"
            )
            if qformer.hidden_size % qformer.num_attention_heads != 0:
                self.fail(
                    "qformer_config",
                    f"hidden_size {qformer.hidden_size} is not divisible by "
                    f"num_attention_heads {qformer.num_attention_heads}",
                )

    def validate_token_ids(self):
        """transformers' check of the LM's special tokens (it warns), then: the image placeholder is in the LM's
        vocabulary."""
        super().validate_token_ids()
        vocab_size = self.text_config.vocab_size
        if self.image_token_id is not None and not self.image_token_id < vocab_size:
            self.fail(
                "image_token_id", f"{self.image_token_id!r} is not a token id of the LM vocabulary ({vocab_size})"
            )

    def validate_freezing(self):
        """Only a part that exists can be frozen."""
        if self.qformer_config is None and self.freeze_qformer:
            self.fail("freeze_qformer", "there is no Q-Former to freeze (qformer_config is None)")


__all__ = ["MIVCConfig", "POOLING_MODES"]
