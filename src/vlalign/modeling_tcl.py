"""TCL: Vision-Language Pre-Training with Triple Contrastive Learning (Yang et al., CVPR 2022).

An ALBEF-style stack (image encoder, text encoder, cross-attention fusion encoder with ITM and MLM heads, EMA
teachers and feature queues) trained with
- CMA: image-text InfoNCE against teacher keys + queue, with momentum-distillation targets;
- IMC: intra-modal InfoNCE between a student view and the teacher's other view (images: two augmentations;
  texts: dropout);
- LMI: each global feature must identify its own local features (pooled patches / unpadded tokens);
- ITM with hard negatives and MLM with momentum soft targets.
Turning IMC/LMI/ITM/MLM off (config weights) leaves the plain contrastive baseline from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_tcl import TCLConfig
from .losses import (
    DecomposableContrastiveLoss,
    brownian_bridge_loss,
    feature_separation_loss,
    gather_across_processes,
    geometric_consistency_loss,
    local_mutual_information,
    sigmoid_contrastive_loss,
)
from .modeling_albef import ALBEFModel, ALBEFOutput, pool_patch_locals, sum_of_terms
from .towers import vision_hidden_size


@dataclass
class TCLOutput(ALBEFOutput):
    """Output of [`TCLModel`]: [`ALBEFOutput`]'s fields plus TCL's loss components ``lmi_image``, ``lmi_text``,
    ``sigmoid`` (the cross-modal term with ``contrastive_loss="sigmoid"``, in place of ``i2t`` / ``t2i``) and the
    optional regularisers ``separation``, ``bridge``, ``geometric`` (None when disabled)."""

    loss_lmi_image: torch.FloatTensor | None = None
    loss_lmi_text: torch.FloatTensor | None = None
    loss_sigmoid: torch.FloatTensor | None = None
    loss_separation: torch.FloatTensor | None = None
    loss_bridge: torch.FloatTensor | None = None
    loss_geometric: torch.FloatTensor | None = None


class TCLModel(ALBEFModel):
    config_class = TCLConfig
    config: TCLConfig
    base_model_prefix = "tcl"
    output_class = TCLOutput

    def __init__(self, config: TCLConfig):
        super().__init__(config)
        if config.contrastive_loss == "decomposable":
            self.decomposable_loss = DecomposableContrastiveLoss(
                z_estimate=config.z_estimate,
                sample_u=config.sample_u,
                num_samples=config.num_train_samples,
                running_momentum=config.running_z_momentum,
            )
        if config.use_feature_separation:
            # the "independent" heads of deep feature separation (Jiang et al., CVPR 2023)
            self.vision_independent_proj = nn.Linear(vision_hidden_size(config.vision_config), config.embed_dim)
            self.text_independent_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self._finish_init()

    def _image_locals(self, image_tokens: torch.Tensor, momentum: bool) -> torch.Tensor:
        proj = self.momentum_vision_proj if momentum else self.vision_proj
        grid = self.config.patch_grid_size
        patches = image_tokens[:, image_tokens.shape[1] - grid * grid :]  # drop [CLS] and other prefix tokens
        return pool_patch_locals(F.normalize(proj(patches), dim=-1), grid, self.config.lmi_image_grid)

    def _text_locals(self, text_tokens: torch.Tensor, momentum: bool) -> torch.Tensor:
        proj = self.momentum_text_proj if momentum else self.text_proj
        return F.normalize(proj(text_tokens[:, 1:]), dim=-1)

    # ------------------------------------------------------------------------------------------------------
    # TCL's pieces of the training step (see ALBEFModel)

    def _needs(self) -> dict[str, bool]:
        cfg = self.config
        regularised = cfg.use_feature_separation or cfg.use_brownian_bridge or cfg.use_geometric_consistency
        needs = super()._needs()
        needs["view2"] = needs["view2"] or regularised
        needs["student_locals"] = not cfg.use_momentum and cfg.lmi_weight > 0
        needs["independent"] = cfg.use_feature_separation
        return needs

    def _extra_student_features(self, out: dict, tokens: dict, pooled: dict) -> None:
        needs = self._needs()
        if needs["independent"]:
            for suffix in ("", "2"):
                out[f"independent_image{suffix}"] = F.normalize(
                    self.vision_independent_proj(pooled[f"image{suffix}"]), dim=-1
                )
                out[f"independent_text{suffix}"] = F.normalize(
                    self.text_independent_proj(pooled[f"text{suffix}"]), dim=-1
                )
        if needs["student_locals"]:
            out["image_locals"] = self._image_locals(tokens["image"], momentum=False)
            out["text_locals"] = self._text_locals(tokens["text"], momentum=False)

    def _extra_teacher_features(self, features: dict, tokens: dict) -> None:
        if self.config.lmi_weight > 0:
            features["image_locals"] = self._image_locals(tokens["image"], momentum=True)
            features["text_locals"] = self._text_locals(tokens["text"], momentum=True)

    def _cross_modal_losses(self, student, teacher, positive_ids, sample_ids, temp) -> dict[str, torch.Tensor]:
        cfg = self.config
        if not cfg.use_momentum and cfg.contrastive_loss == "sigmoid":
            loss = sigmoid_contrastive_loss(
                student["image_feat"],
                student["text_feat"],
                temp,
                self.logit_bias,
                positive_ids,
                gather=gather_across_processes(),
            )
            return {"sigmoid": loss}
        if cfg.use_momentum or cfg.contrastive_loss != "decomposable":
            return super()._cross_modal_losses(student, teacher, positive_ids, sample_ids, temp)
        queues = {}
        if cfg.z_estimate == "queue":
            queues = {"image_queue": self.image_queue.features, "text_queue": self.text_queue.features}
        i2t, t2i = self.decomposable_loss(
            student["image_feat"],
            student["text_feat"],
            temp,
            sample_ids=sample_ids,
            image_ids=positive_ids,
            gather=gather_across_processes(),
            **queues,
        )
        return {"i2t": i2t, "t2i": t2i}

    def _extra_alignment_losses(self, student, teacher, batch, positive_ids, sample_ids, temp) -> dict:
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        if cfg.lmi_weight > 0:
            local_source = teacher if cfg.use_momentum else student
            losses["lmi_image"] = local_mutual_information(student["image_feat"], local_source["image_locals"], temp)
            losses["lmi_text"] = local_mutual_information(
                student["text_feat"], local_source["text_locals"], temp, batch["attention_mask"][:, 1:]
            )
        if cfg.use_feature_separation:
            losses["separation"] = feature_separation_loss(
                student["image_feat"],
                student["text_feat"],
                student["independent_image"],
                student["independent_text"],
                student["independent_image2"],
                student["independent_text2"],
                temp,
            )["total"]
        if cfg.use_brownian_bridge:
            losses["bridge"] = brownian_bridge_loss(
                student["image_feat"], student["text_feat"], student["image_feat2"], cfg.brownian_bridge_t
            )
        if cfg.use_geometric_consistency:
            losses["geometric"] = geometric_consistency_loss(
                student["image_feat"], student["text_feat"], student["image_feat2"], student["text_feat2"]
            )["total"]
        return losses

    def _loss_total(self, losses: dict) -> torch.Tensor | None:
        """TCL's total: the weighted mean of the active CMA / IMC / LMI terms (the paper's sum / 6), plus the weighted
        regularisers, plus the weighted ITM and MLM losses. The symmetric sigmoid loss stands for both cross-modal
        directions: it counts as two terms of the mean."""
        cfg = self.config
        # name -> (weight, number of terms it counts as in the mean)
        averaged_terms = {
            "i2t": (cfg.cma_weight, 1),
            "t2i": (cfg.cma_weight, 1),
            "sigmoid": (cfg.cma_weight, 2),
            "i2i": (cfg.imc_weight, 1),
            "t2t": (cfg.imc_weight, 1),
            "lmi_image": (cfg.lmi_weight, 1),
            "lmi_text": (cfg.lmi_weight, 1),
        }
        present = [(averaged_terms[n], v) for n, v in losses.items() if n in averaged_terms]
        averaged = [weight * count * v for (weight, count), v in present]
        num_terms = sum(count for (_, count), _ in present)
        alignment = [torch.stack(averaged).sum() / num_terms] if averaged else []
        alignment += [
            weight * losses[name]
            for name, weight in (
                ("separation", cfg.feature_separation_weight),
                ("bridge", cfg.brownian_bridge_weight),
                ("geometric", cfg.geometric_consistency_weight),
            )
            if name in losses
        ]
        fusion = [
            weight * losses[name]
            for name, weight in (("itm", cfg.itm_weight), ("mlm", cfg.mlm_weight))
            if name in losses
        ]
        return sum_of_terms([total for total in (sum_of_terms(alignment), sum_of_terms(fusion)) if total is not None])

    def _update_queues(self, student: dict, teacher: dict, positive_ids) -> None:
        if not self.config.use_momentum and hasattr(self, "image_queue"):
            # decomposable loss with queue-estimated Z: past student features
            gather = gather_across_processes()
            self.image_queue.enqueue(student["image_feat"].detach(), positive_ids, gather)
            self.text_queue.enqueue(student["text_feat"].detach(), positive_ids, gather)
        else:
            super()._update_queues(student, teacher, positive_ids)


__all__ = ["TCLModel", "TCLOutput"]
