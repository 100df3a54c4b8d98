"""Configuration of TCL (Triple Contrastive Learning, Yang et al., CVPR 2022)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

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


class TCLConfig(PreTrainedConfig):
    r"""Configuration of [`TCLModel`]: an ALBEF-style image / text / fusion encoder stack trained with cross-modal
    alignment (CMA, with momentum distillation), intra-modal contrastive (IMC) and local mutual information (LMI)
    losses, plus image-text matching (ITM) and masked language modelling (MLM).

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
        use_momentum: keep EMA (momentum) teachers and feature queues (TCL / ALBEF). With `False` the keys are
            in-batch student features (CLIP-style) and no queue is kept.
        momentum: EMA coefficient m in `teacher = m * teacher + (1 - m) * student`.
        queue_size: length of the image / text feature queues; must be divisible by the global batch size.
        alpha: weight of the momentum-distillation (soft) targets in CMA and MLM, ramped up by the trainer.
        cma_weight, imc_weight, lmi_weight: weights of the three alignment groups (i2t+t2i, i2i+t2t,
            lmi_image+lmi_text). The alignment loss is the weighted sum of the active terms divided by the number
            of active terms (a group is active when its weight is > 0), so the defaults give the paper's
            `L_ita = (6 terms) / 6` and `imc_weight = lmi_weight = 0` gives ALBEF's ITC `(i2t + t2i) / 2`.
        itm_weight, mlm_weight: weights of the ITM and MLM losses (0 disables the term and its forward passes).
        itm_hard_negatives: sample ITM negatives from the contrastive similarity (else uniformly).
        mlm_probability: fraction of tokens masked for MLM.
        mask_token_id: id of the tokenizer's mask token (103 in bert-base-uncased). Set from the tokenizer.
        lmi_image_grid: side of the grid that the patch features are average-pooled to for LMI (4 -> 16 locals);
            must divide the patch grid side (`image_size // patch_size`).
        contrastive_loss: "info_nce" or "decomposable" (Bayesian-augmented, Chen et al. NeurIPS 2022) for the
            cross-modal term of the contrastive-only configuration (`use_momentum=False`).
        z_estimate: how the decomposable loss estimates the partition function Z: "batch", "queue" (a queue of
            past features, `queue_size` long) or "running" (per-sample running average; needs
            `num_train_samples` and `sample_ids` in the batch).
        sample_u: draw the auxiliary variable u ~ Gamma(1, Z) instead of using its mean 1/Z.
        running_z_momentum: weight of the previous estimate in the per-sample running average of Z (0.1: the new
            batch estimate weighs 0.9, SogCLR's gamma; each sample is seen once per epoch, so a heavy momentum
            would keep estimates from a much older model).
        num_train_samples: number of training samples (set by the trainer; sizes the running-Z table).
        use_feature_separation, feature_separation_weight: deep feature separation regulariser (orthogonality +
            independent in-modal contrastive + uniformity, with extra "independent" projection heads).
        use_brownian_bridge, brownian_bridge_weight, brownian_bridge_t: Brownian-bridge regulariser
            (text -> augmented image -> image), t = 0.25.
        use_geometric_consistency, geometric_consistency_weight: geometric consistency regulariser (CyCLIP's
            cross and in-modal terms plus their augmented-view versions); weight 0.25 as CyCLIP.
        gradient_cache_chunk_size: train with gradient caching, embedding the batch in chunks of this size
            (None: off). See `TCLModel.gradient_cached_backward`.
        train_batch_size: global training batch size when known (set by the trainer), used to check that
            `queue_size` is divisible by it.
        initializer_range: std of the normal init of the projections and heads.
    """

    model_type = "tcl"
    sub_configs_defaults = {
        # the paper's towers: ViT-B/16 at 256 px (16x16 patch grid) and bert-base
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", init_kwargs={"image_size": 256}),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

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
    lmi_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    itm_hard_negatives: bool = True
    mlm_probability: float = 0.15
    mask_token_id: int = 103
    lmi_image_grid: int = 4
    contrastive_loss: str = "info_nce"
    z_estimate: str = "batch"
    sample_u: bool = False
    running_z_momentum: float = 0.1
    num_train_samples: int | None = None
    use_feature_separation: bool = False
    feature_separation_weight: float = 1.0
    use_brownian_bridge: bool = False
    brownian_bridge_weight: float = 1.0
    brownian_bridge_t: float = 0.25
    use_geometric_consistency: bool = False
    geometric_consistency_weight: float = 0.25
    gradient_cache_chunk_size: int | None = None
    train_batch_size: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_tcl()

    # ---------------------------------------------------------------------------------------------------------
    @property
    def num_text_layers(self) -> int:
        """Layers of the text encoder proper (the rest of `text_config.num_hidden_layers` is fusion)."""
        return self.text_config.num_hidden_layers - self.num_fusion_layers

    @property
    def patch_grid_size(self) -> int:
        """Side of the vision encoder's patch grid."""
        return self.vision_config.image_size // self.vision_config.patch_size

    def validate_tcl(self) -> None:
        """Raise `ValueError` naming the first invalid field."""

        def fail(field: str, message: str):
            raise ValueError(f"TCLConfig.{field}: {message}")

        def _is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        vision, text = self.vision_config, self.text_config
        for field in ("image_size", "patch_size", "hidden_size"):
            if not _is_int(getattr(vision, field, None)):
                fail(
                    "vision_config",
                    f"the vision encoder must output patch tokens and define `{field}` (got model_type "
                    f"{getattr(vision, 'model_type', None)!r})",
                )
        if vision.image_size % vision.patch_size != 0:
            fail("vision_config", f"image_size {vision.image_size} is not divisible by patch_size {vision.patch_size}")
        missing = [f for f in BERT_LIKE_FIELDS if getattr(text, f, None) is None]
        if missing:
            fail(
                "text_config",
                f"a BERT-like text encoder config is required (model_type {getattr(text, 'model_type', None)!r} "
                f"lacks {missing})",
            )
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
        if self.contrastive_loss not in ("info_nce", "decomposable"):
            fail("contrastive_loss", f"unknown loss {self.contrastive_loss!r}: use 'info_nce' or 'decomposable'")
        if self.z_estimate not in ("batch", "queue", "running"):
            fail("z_estimate", f"unknown estimate {self.z_estimate!r}: use 'batch', 'queue' or 'running'")
        decomposable = self.contrastive_loss == "decomposable"
        if decomposable and self.use_momentum:
            fail("contrastive_loss", "the decomposable loss replaces the in-batch InfoNCE of the contrastive-only "
                 "configuration: set use_momentum=False (momentum distillation has soft targets)")
        if decomposable and self.z_estimate == "running" and (
            not _is_int(self.num_train_samples) or self.num_train_samples <= 0
        ):
            fail("num_train_samples", "z_estimate='running' needs the number of training samples (> 0)")
        if not 0.0 <= self.running_z_momentum < 1.0:
            fail("running_z_momentum", f"must be in [0, 1), got {self.running_z_momentum}")
        for field in ("feature_separation_weight", "brownian_bridge_weight", "geometric_consistency_weight"):
            if getattr(self, field) < 0:
                fail(field, f"must be >= 0, got {getattr(self, field)}")
        if not 0.0 < self.brownian_bridge_t < 1.0:
            fail("brownian_bridge_t", f"must be in (0, 1), got {self.brownian_bridge_t}")
        if self.gradient_cache_chunk_size is not None and (
            not _is_int(self.gradient_cache_chunk_size) or self.gradient_cache_chunk_size <= 0
        ):
            fail("gradient_cache_chunk_size",
                 f"must be None or a positive integer, got {self.gradient_cache_chunk_size!r}")
        if self.use_momentum or (decomposable and self.z_estimate == "queue"):
            if not _is_int(self.queue_size) or self.queue_size <= 0:
                fail("queue_size", f"must be a positive integer when a queue is used, got {self.queue_size!r}")
            if self.train_batch_size is not None and self.queue_size % self.train_batch_size != 0:
                fail(
                    "queue_size",
                    f"{self.queue_size} is not divisible by the global train batch size {self.train_batch_size}",
                )
        if self.train_batch_size is not None and (not _is_int(self.train_batch_size) or self.train_batch_size <= 0):
            fail("train_batch_size", f"must be a positive integer, got {self.train_batch_size!r}")
        for field in ("cma_weight", "imc_weight", "lmi_weight", "itm_weight", "mlm_weight"):
            if getattr(self, field) < 0:
                fail(field, f"must be >= 0, got {getattr(self, field)}")
        if self.cma_weight + self.imc_weight + self.lmi_weight + self.itm_weight + self.mlm_weight <= 0 and not (
            self.use_feature_separation or self.use_brownian_bridge or self.use_geometric_consistency
        ):
            fail("cma_weight", "at least one loss weight must be > 0")
        if not 0.0 < self.mlm_probability < 1.0:
            fail("mlm_probability", f"must be in (0, 1), got {self.mlm_probability}")
        if self.mlm_weight > 0 and not (_is_int(self.mask_token_id) and 0 <= self.mask_token_id < text.vocab_size):
            fail("mask_token_id",
                 f"{self.mask_token_id!r} is not a token id of the text vocabulary ({text.vocab_size})")
        grid = self.patch_grid_size
        if not _is_int(self.lmi_image_grid) or self.lmi_image_grid <= 0 or grid % self.lmi_image_grid != 0:
            fail(
                "lmi_image_grid",
                f"unknown pooling grid {self.lmi_image_grid!r}: must be a positive divisor of the patch grid side "
                f"{grid} (image_size {vision.image_size} / patch_size {vision.patch_size})",
            )


__all__ = ["TCLConfig"]
