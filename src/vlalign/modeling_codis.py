"""CODIS: Multi-modal Alignment using Representation Codebook (Duan et al., CVPR 2022).

The ALBEF-style stack of `modeling_albef.ALBEFModel` (image / text / fusion encoders, EMA teachers, feature queues,
ITM with hard negatives, MLM with momentum distillation) trained with
- the four-term queue contrastive loss L_ica: i2t, t2i, i2i, t2t against the EMA teachers' keys + queues;
- a learnable codebook of K cluster centres shared by images and texts: per batch, optimal-transport plans assign
  the teacher features to the codewords (cost 1 - cosine, uniform marginals, IPOT or Sinkhorn, no gradient);
  each student predicts its plan's assignment (cross-entropy of its code distribution), and the plan's transport
  cost moves the codewords toward the features assigned to them;
- ITM and MLM.
`get_codes` exposes the code assignment of any image or text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_codis import CODISConfig
from .losses import (
    code_assignment_targets,
    code_prediction_loss,
    code_similarities,
    gather_across_processes,
    optimal_transport_loss,
)
from .modeling_albef import ALBEFModel, ALBEFOutput, sum_of_terms


@dataclass
class CODISOutput(ALBEFOutput):
    """Output of [`CODISModel`]: [`ALBEFOutput`]'s fields plus the codebook terms ``loss_code_image`` /
    ``loss_code_text`` (student code prediction against the OT plans) and ``loss_ot_image`` / ``loss_ot_text``
    (transport cost of the plans)."""

    loss_code_image: torch.FloatTensor | None = None
    loss_code_text: torch.FloatTensor | None = None
    loss_ot_image: torch.FloatTensor | None = None
    loss_ot_text: torch.FloatTensor | None = None


@dataclass
class CODISCodes(ModelOutput):
    """Code assignments from [`CODISModel.get_codes`]: for each input, the distribution over the K codewords
    (``softmax(cos(feature, codeword) / code_temperature)``) and its argmax code. None for a modality not given."""

    image_code_probs: torch.FloatTensor | None = None
    image_codes: torch.LongTensor | None = None
    text_code_probs: torch.FloatTensor | None = None
    text_codes: torch.LongTensor | None = None


class CODISModel(ALBEFModel):
    config_class = CODISConfig
    config: CODISConfig
    base_model_prefix = "codis"
    output_class = CODISOutput
    # used normalised: weight decay would only shrink the norm (and so raise the effective step size)
    _no_weight_decay_parameters = ("temp", "codebook.weight")

    def __init__(self, config: CODISConfig):
        super().__init__(config)
        # a bias-free linear layer whose weight rows are the K codewords (the paper's C, transposed)
        self.codebook = nn.Linear(config.code_dim, config.codebook_size, bias=False)
        if config.code_dim != config.embed_dim:
            self.code_proj = nn.Linear(config.embed_dim, config.code_dim, bias=False)
        self._finish_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CODISModel):
            # unit-norm codewords: they are used normalised, and a tiny norm would inflate their gradients
            init.copy_(module.codebook.weight, F.normalize(torch.randn_like(module.codebook.weight), dim=-1))

    def _to_code_space(self, features: torch.Tensor) -> torch.Tensor:
        return self.code_proj(features) if hasattr(self, "code_proj") else features

    @property
    def codewords(self) -> torch.Tensor:
        """The L2-normalised codewords (K, code_dim)."""
        return F.normalize(self.codebook.weight, dim=-1)

    def code_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities (N, K) of contrastive features to the codewords."""
        return code_similarities(self._to_code_space(features), self.codebook.weight) / self.config.code_temperature

    def get_codes(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> CODISCodes:
        """Code assignment distribution (batch, K) and argmax code (batch,) of each image and/or text, so that the
        clusters can be inspected (which images and captions share a codeword)."""
        if pixel_values is None and input_ids is None:
            raise ValueError("get_codes needs pixel_values and/or input_ids")
        codes = {}
        if pixel_values is not None:
            probs = F.softmax(self.code_logits(self.get_image_features(pixel_values)).float(), dim=-1)
            codes.update(image_code_probs=probs, image_codes=probs.argmax(dim=-1))
        if input_ids is not None:
            probs = F.softmax(self.code_logits(self.get_text_features(input_ids, attention_mask)).float(), dim=-1)
            codes.update(text_code_probs=probs, text_codes=probs.argmax(dim=-1))
        return CODISCodes(**codes)

    # ------------------------------------------------------------------------------------------------------
    # CODIS's pieces of the training step (see ALBEFModel)

    def _extra_alignment_losses(self, student, teacher, batch, positive_ids, sample_ids, temp) -> dict:
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        if cfg.code_weight == 0 and cfg.ot_weight == 0:
            return losses
        # the teachers' features (without momentum teachers the student's own), constants of the OT terms: the
        # transport cost moves the codewords only
        with torch.no_grad():
            image_teacher = self._to_code_space(teacher.get("image_feat_m", student["image_feat"])).detach()
            text_teacher = self._to_code_space(teacher.get("text_feat_m", student["text_feat"])).detach()
        codebook = self.codebook.weight
        gather = gather_across_processes()
        image_plan = code_assignment_targets(
            image_teacher, codebook, cfg.ot_solver, gather=gather, **cfg.solver_kwargs()
        )
        text_plan = code_assignment_targets(text_teacher, codebook, cfg.ot_solver, gather=gather, **cfg.solver_kwargs())
        if cfg.ot_weight > 0:
            losses["ot_image"] = optimal_transport_loss(image_teacher, codebook, image_plan)
            losses["ot_text"] = optimal_transport_loss(text_teacher, codebook, text_plan)
        if cfg.code_weight > 0:
            image_targets, text_targets = (
                (text_plan, image_plan) if cfg.code_targets == "swapped" else (image_plan, text_plan)
            )
            losses["code_image"] = code_prediction_loss(
                self._to_code_space(student["image_feat"]), codebook, image_targets, cfg.code_temperature
            )
            losses["code_text"] = code_prediction_loss(
                self._to_code_space(student["text_feat"]), codebook, text_targets, cfg.code_temperature
            )
        return losses

    def _loss_total(self, losses: dict) -> torch.Tensor | None:
        """CODIS's total: L_ica (the four contrastive terms, summed) + code prediction + OT cost, each group weighted,
        plus the weighted ITM and MLM losses."""
        cfg = self.config
        weights = {
            "i2t": cfg.cma_weight,
            "t2i": cfg.cma_weight,
            "i2i": cfg.imc_weight,
            "t2t": cfg.imc_weight,
            "code_image": cfg.code_weight,
            "code_text": cfg.code_weight,
            "ot_image": cfg.ot_weight,
            "ot_text": cfg.ot_weight,
        }
        terms = [weights[name] * value for name, value in losses.items() if name in weights]
        alignment = torch.stack(terms).sum() if terms else None
        fusion = sum_of_terms(
            [
                weight * losses[name]
                for name, weight in (("itm", cfg.itm_weight), ("mlm", cfg.mlm_weight))
                if name in losses
            ]
        )
        return sum_of_terms([total for total in (alignment, fusion) if total is not None])


__all__ = ["CODISModel", "CODISOutput", "CODISCodes"]
