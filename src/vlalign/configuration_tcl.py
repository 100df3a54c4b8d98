"""Configuration of TCL (Triple Contrastive Learning, Yang et al., CVPR 2022)."""

from typing import Literal

from .configuration_albef import ALBEFStackConfig, Real, interval, non_negative, positive, strict_config


@strict_config
class TCLConfig(ALBEFStackConfig):
    r"""Configuration of [`TCLModel`]: an ALBEF-style image / text / fusion encoder stack trained with cross-modal
    alignment (CMA, with momentum distillation), intra-modal contrastive (IMC) and local mutual information (LMI)
    losses, plus image-text matching (ITM) and masked language modelling (MLM). The stack's fields (towers, fusion
    layers, temperature, momentum, queues, ITM / MLM) are documented on [`ALBEFStackConfig`];
    TCL's own:

    Args:
        cma_weight, imc_weight, lmi_weight: weights of the three alignment groups (i2t+t2i, i2i+t2t,
            lmi_image+lmi_text). The alignment loss is the weighted sum of the active terms divided by the number
            of active terms (a group is active when its weight is > 0), so the defaults give the paper's
            `L_ita = (6 terms) / 6` and `imc_weight = lmi_weight = 0` gives ALBEF's ITC `(i2t + t2i) / 2`.
        lmi_image_grid: side of the grid that the patch features are average-pooled to for LMI (4 -> 16 locals);
            must divide the patch grid side (`image_size // patch_size`).
        contrastive_loss: the cross-modal loss of the contrastive-only configuration (`use_momentum=False`):
            "info_nce" (i2t + t2i), "decomposable" (Bayesian-augmented InfoNCE, Chen et al. NeurIPS 2022; i2t +
            t2i) or "sigmoid" (SigLIP's pairwise sigmoid loss, Zhai et al. 2023, with a learnable bias
            `logit_bias`; texts of the other processes come around the ring, not gathered). The sigmoid loss is
            symmetric, one term reported as `loss_sigmoid`; it stands for both directions in the alignment mean
            (counted as two of the active terms, weight `cma_weight`), so the CLIP-style configuration's loss is
            exactly the sigmoid loss and TCL's `(2 * sigmoid + i2i + t2t + lmi_image + lmi_text) / 6` keeps the
            cross-modal share of `(i2t + t2i + ...) / 6`. SigLIP trains with `temperature=0.1` (logit scale 10)
            and a bias starting at -10; a SigLIP checkpoint brings its own scale and bias.
        logit_bias_init: where the sigmoid loss's learnable bias starts (SigLIP: -10, the log-odds of the many
            negatives); `from_dual_encoder_pretrained` of a SigLIP checkpoint starts from the checkpoint's bias.
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
    """

    model_type = "tcl"
    loss_weight_fields = ALBEFStackConfig.loss_weight_fields + (
        "lmi_weight",
        "feature_separation_weight",
        "brownian_bridge_weight",
        "geometric_consistency_weight",
    )

    lmi_weight: Real = non_negative(default=1.0)
    lmi_image_grid: int = positive(default=4)
    contrastive_loss: Literal["info_nce", "decomposable", "sigmoid"] = "info_nce"
    logit_bias_init: Real = interval()(default=-10.0)  # any finite number
    z_estimate: Literal["batch", "queue", "running"] = "batch"
    sample_u: bool = False
    running_z_momentum: Real = interval(0, 1, high_open=True)(default=0.1)
    num_train_samples: int | None = positive(default=None)
    use_feature_separation: bool = False
    feature_separation_weight: Real = non_negative(default=1.0)
    use_brownian_bridge: bool = False
    brownian_bridge_weight: Real = non_negative(default=1.0)
    brownian_bridge_t: Real = interval(0, 1, low_open=True, high_open=True)(default=0.25)
    use_geometric_consistency: bool = False
    geometric_consistency_weight: Real = non_negative(default=0.25)

    # ---------------------------------------------------------------------------------------------------------
    @property
    def uses_queue(self) -> bool:
        return self.use_momentum or (self.contrastive_loss == "decomposable" and self.z_estimate == "queue")

    def has_objective(self) -> bool:
        core = ("cma_weight", "imc_weight", "lmi_weight", "itm_weight", "mlm_weight")
        return any(getattr(self, f) > 0 for f in core) or (
            self.use_feature_separation or self.use_brownian_bridge or self.use_geometric_consistency
        )

    def validate_architecture(self):
        """The stack's towers, then the LMI pooling grid, which must divide the patch grid when LMI is on (with
        lmi_weight = 0 nothing reads it: a 224 px ViT-B/16, grid 14, needs no setting it does not use)."""
        super().validate_architecture()
        grid = self.patch_grid_size
        if self.lmi_weight > 0 and grid % self.lmi_image_grid != 0:
            vision = self.vision_config
            self.fail(
                "lmi_image_grid",
                f"{self.lmi_image_grid} does not divide the patch grid side {grid} (image_size {vision.image_size} "
                f"/ patch_size {vision.patch_size})",
            )

    def objectives_reading_student_patch_grid(self) -> list[str]:
        grid = super().objectives_reading_student_patch_grid()
        if self.lmi_weight > 0 and not self.use_momentum:  # with EMA teachers the locals are the teacher's
            grid.append("LMI without EMA teachers (lmi_weight > 0, use_momentum=False: the student's locals)")
        return grid

    @property
    def learns_logit_bias(self) -> bool:
        """Whether the model holds the sigmoid loss's learnable `logit_bias`."""
        return self.contrastive_loss == "sigmoid"

    def validate_contrastive_loss(self):
        """The decomposable and sigmoid losses are for the contrastive-only configuration; the decomposable loss's
        running Z needs the sample count."""
        if self.contrastive_loss == "sigmoid" and self.use_momentum:
            self.fail(
                "contrastive_loss",
                "the sigmoid loss replaces the in-batch InfoNCE of the contrastive-only configuration: set "
                "use_momentum=False (momentum distillation has soft targets over a softmax)",
            )
        decomposable = self.contrastive_loss == "decomposable"
        if decomposable and self.use_momentum:
            self.fail(
                "contrastive_loss",
                "the decomposable loss replaces the in-batch InfoNCE of the contrastive-only "
                "configuration: set use_momentum=False (momentum distillation has soft targets)",
            )
        if decomposable and self.z_estimate == "running" and self.num_train_samples is None:
            self.fail("num_train_samples", "z_estimate='running' needs the number of training samples (> 0)")


__all__ = ["TCLConfig"]
