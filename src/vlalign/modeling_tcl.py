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
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .albef_stack import (
    FusionEncoder,
    MLMHead,
    build_text_encoder,
    build_vision_encoder,
    copy_parameters,
    ema_update,
    pool_patch_locals,
)
from .configuration_tcl import TCLConfig
from .losses import (
    FeatureQueue,
    contrastive_cross_entropy,
    info_nce,
    intra_modal_info_nce,
    distillation_targets,
    local_mutual_information,
    mask_tokens_for_mlm,
    masked_lm_distillation_loss,
    positive_targets,
    sample_hard_negatives,
    similarity_logits,
)

LOSS_COMPONENTS = ("i2t", "t2i", "i2i", "t2t", "lmi_image", "lmi_text", "itm", "mlm")


@dataclass
class TCLOutput(ModelOutput):
    """Output of [`TCLModel`].

    Training (``return_loss=True``): ``loss`` (the total) and each component ``loss_<name>`` for
    ``i2t, t2i, i2i, t2t, lmi_image, lmi_text, itm, mlm`` (None for disabled terms), plus ``temperature``.
    Inference: ``logits_per_image`` (images x texts) / ``logits_per_text``, scaled by 1 / temperature, and the
    normalised ``image_embeds`` / ``text_embeds``.
    """

    loss: torch.FloatTensor | None = None
    loss_i2t: torch.FloatTensor | None = None
    loss_t2i: torch.FloatTensor | None = None
    loss_i2i: torch.FloatTensor | None = None
    loss_t2t: torch.FloatTensor | None = None
    loss_lmi_image: torch.FloatTensor | None = None
    loss_lmi_text: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_mlm: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None

    def loss_components(self) -> dict[str, float]:
        """The non-None loss components as floats, keyed by component name (for logging)."""
        return {
            name: float(getattr(self, f"loss_{name}").detach())
            for name in LOSS_COMPONENTS
            if getattr(self, f"loss_{name}") is not None
        }


class TCLPreTrainedModel(PreTrainedModel):
    config_class = TCLConfig
    config: TCLConfig
    base_model_prefix = "tcl"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["FusionLayer"]
    # Our losses are per-batch means: the Trainer must scale them for gradient accumulation itself.
    accepts_loss_kwargs = False

    # Auto classes written into `auto_map` on save besides the one `register_for_auto_class` records, so that a
    # saved folder also works in `pipeline("zero-shot-image-classification", ..., trust_remote_code=True)`.
    _extra_auto_classes = ("AutoModelForZeroShotImageClassification",)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if getattr(self, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            for auto_class in self._extra_auto_classes:
                auto_map[auto_class] = f"{self.__class__.__module__.split('.')[-1]}.{self.__class__.__name__}"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, TCLModel):
            init.constant_(module.temp, self.config.temperature)
        elif isinstance(module, FeatureQueue):
            init.copy_(module.features, F.normalize(torch.randn_like(module.features), dim=1))
            init.constant_(module.ids, -1)
            init.zeros_(module.ptr)


class TCLModel(TCLPreTrainedModel):
    def __init__(self, config: TCLConfig):
        super().__init__(config)
        text_config, vision_config = config.text_config, config.vision_config
        self.vision_model = build_vision_encoder(vision_config)
        self.text_model = build_text_encoder(text_config, config.num_text_layers)
        self.vision_proj = nn.Linear(vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(text_config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temperature)), requires_grad=config.learnable_temperature)
        has_fusion = config.num_fusion_layers > 0
        if has_fusion:
            # fusion layers share the text encoder's config object, so attention-implementation changes reach both
            self.fusion_model = FusionEncoder(self.text_model.config, config.num_fusion_layers, vision_config.hidden_size)
            self.itm_head = nn.Linear(text_config.hidden_size, 2)
            self.mlm_head = MLMHead(text_config)

        if config.use_momentum:
            self.momentum_vision_model = build_vision_encoder(vision_config)
            self.momentum_text_model = build_text_encoder(text_config, config.num_text_layers)
            self.momentum_vision_proj = nn.Linear(vision_config.hidden_size, config.embed_dim)
            self.momentum_text_proj = nn.Linear(text_config.hidden_size, config.embed_dim)
            if has_fusion:
                self.momentum_fusion_model = FusionEncoder(
                    self.momentum_text_model.config, config.num_fusion_layers, vision_config.hidden_size
                )
                self.momentum_mlm_head = MLMHead(text_config)
            self.image_queue = FeatureQueue(config.queue_size, config.embed_dim)
            self.text_queue = FeatureQueue(config.queue_size, config.embed_dim)
        self.post_init()
        if config.use_momentum:
            copy_parameters(*self._momentum_pairs())

    # ------------------------------------------------------------------------------------------------------
    def _momentum_pairs(self) -> tuple[list[nn.Module], list[nn.Module]]:
        names = ["vision_model", "text_model", "vision_proj", "text_proj"]
        if self.config.num_fusion_layers > 0:
            names += ["fusion_model", "mlm_head"]
        return [getattr(self, n) for n in names], [getattr(self, f"momentum_{n}") for n in names]

    def momentum_update(self) -> None:
        """EMA step of every teacher towards its student."""
        ema_update(*self._momentum_pairs(), momentum=self.config.momentum)

    def copy_params_to_momentum(self) -> None:
        """Reset every teacher to an exact copy of its student (after loading student weights)."""
        if self.config.use_momentum:
            copy_parameters(*self._momentum_pairs())

    @property
    def temperature(self) -> torch.Tensor:
        return self.temp.clamp(self.config.temperature_min, self.config.temperature_max)

    def _image_tokens(self, pixel_values: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        model = self.momentum_vision_model if momentum else self.vision_model
        pixel_values = pixel_values.to(self.vision_proj.weight.dtype)
        return model(pixel_values=pixel_values).last_hidden_state

    def _text_tokens(self, input_ids, attention_mask, momentum: bool = False) -> torch.Tensor:
        model = self.momentum_text_model if momentum else self.text_model
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _image_feature(self, image_tokens: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.momentum_vision_proj if momentum else self.vision_proj
        return F.normalize(proj(image_tokens[:, 0]), dim=-1)

    def _text_feature(self, text_tokens: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        proj = self.momentum_text_proj if momentum else self.text_proj
        return F.normalize(proj(text_tokens[:, 0]), dim=-1)

    def _image_locals(self, image_tokens: torch.Tensor, momentum: bool) -> torch.Tensor:
        proj = self.momentum_vision_proj if momentum else self.vision_proj
        grid = self.config.patch_grid_size
        patches = image_tokens[:, image_tokens.shape[1] - grid * grid :]  # drop [CLS] / distillation tokens
        return pool_patch_locals(F.normalize(proj(patches), dim=-1), grid, self.config.lmi_image_grid)

    def _text_locals(self, text_tokens: torch.Tensor, momentum: bool) -> torch.Tensor:
        proj = self.momentum_text_proj if momentum else self.text_proj
        return F.normalize(proj(text_tokens[:, 1:]), dim=-1)

    # ------------------------------------------------------------------------------------------------------
    # Inference API (CLIP-like)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (batch, embed_dim)."""
        return self._image_feature(self._image_tokens(pixel_values))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids=None
    ) -> torch.Tensor:
        """L2-normalised text embeddings (batch, embed_dim)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._text_feature(self._text_tokens(input_ids, attention_mask))

    def get_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image encoder's token states (batch, tokens, hidden), as the fusion encoder consumes them."""
        return self._image_tokens(pixel_values)

    def itm_score(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Probability that text i matches image i (row-aligned pairs), from the fusion encoder's ITM head.

        Pass ``pixel_values`` or precomputed ``image_tokens`` (from `get_image_tokens`) to re-rank many
        candidates without re-encoding the images."""
        if self.config.num_fusion_layers == 0:
            raise ValueError("itm_score needs fusion layers (config.num_fusion_layers > 0)")
        if image_tokens is None:
            if pixel_values is None:
                raise ValueError("itm_score needs pixel_values or image_tokens")
            image_tokens = self._image_tokens(pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_tokens = self._text_tokens(input_ids, attention_mask)
        fused = self.fusion_model(text_tokens, attention_mask, image_tokens)
        return F.softmax(self.itm_head(fused[:, 0]).float(), dim=-1)[:, 1]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_view2: torch.FloatTensor | None = None,
        positive_ids: torch.LongTensor | None = None,
        alpha: float | None = None,
        return_loss: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        return_dict: bool | None = None,
    ) -> TCLOutput:
        r"""
        Args:
            input_ids, attention_mask: tokenised captions (batch, length).
            pixel_values: images, or the first augmented view when training (batch, 3, H, W).
            pixel_values_view2: the second augmented view (training; defaults to `pixel_values`).
            positive_ids: optional (batch,) ids; items with equal ids are positives of each other (several
                captions of one image, or class-level positives). Without them only pair i <-> i is positive.
            alpha: momentum-distillation weight for this step (the trainer's ramp); defaults to `config.alpha`.
            return_loss: compute the training losses (requires images and texts). Otherwise CLIP-style logits.
            token_type_ids: accepted for tokenizer/pipeline compatibility and ignored (single segments only).
        """
        if return_loss:
            if input_ids is None or pixel_values is None:
                raise ValueError("training (return_loss=True) needs both input_ids and pixel_values")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            return self._training_forward(
                input_ids, attention_mask, pixel_values, pixel_values_view2, positive_ids,
                self.config.alpha if alpha is None else float(alpha),
            )

        image_embeds = self.get_image_features(pixel_values) if pixel_values is not None else None
        text_embeds = self.get_text_features(input_ids, attention_mask) if input_ids is not None else None
        logits_per_image = logits_per_text = None
        temperature = self.temperature
        if image_embeds is not None and text_embeds is not None:
            logits_per_text = similarity_logits(text_embeds, image_embeds, temperature)
            logits_per_image = logits_per_text.t()
        return TCLOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            temperature=temperature.detach(),
        )

    # ------------------------------------------------------------------------------------------------------
    def _training_forward(self, input_ids, attention_mask, pixel_values, pixel_values_view2, positive_ids, alpha):
        cfg = self.config
        if pixel_values_view2 is None:
            pixel_values_view2 = pixel_values
        if cfg.learnable_temperature:
            with torch.no_grad():
                self.temp.clamp_(cfg.temperature_min, cfg.temperature_max)
        temp = self.temperature
        batch = input_ids.shape[0]
        use_cma, use_imc, use_lmi = cfg.cma_weight > 0, cfg.imc_weight > 0, cfg.lmi_weight > 0
        use_itm, use_mlm = cfg.itm_weight > 0, cfg.mlm_weight > 0
        text_local_mask = attention_mask[:, 1:]

        image_tokens = self._image_tokens(pixel_values)
        image_feat = self._image_feature(image_tokens)
        text_tokens = self._text_tokens(input_ids, attention_mask)
        text_feat = self._text_feature(text_tokens)

        image_tokens_m = None
        if cfg.use_momentum:
            with torch.no_grad():
                self.momentum_update()
                image_tokens_m = self._image_tokens(pixel_values_view2, momentum=True)
                image_feat_m = self._image_feature(image_tokens_m, momentum=True)
                text_tokens_m = self._text_tokens(input_ids, attention_mask, momentum=True)
                text_feat_m = self._text_feature(text_tokens_m, momentum=True)
                image_keys = self.image_queue.keys(image_feat_m)
                text_keys = self.text_queue.keys(text_feat_m)
                key_ids = self.image_queue.key_ids(positive_ids)
                hard = positive_targets(positive_ids, key_ids, batch, image_keys.shape[0], device=image_feat.device)
                i2t_targets = distillation_targets(similarity_logits(image_feat_m, text_keys, temp), hard, alpha)
                t2i_targets = distillation_targets(similarity_logits(text_feat_m, image_keys, temp), hard, alpha)
                if use_lmi:
                    image_locals = self._image_locals(image_tokens_m, momentum=True)
                    text_locals = self._text_locals(text_tokens_m, momentum=True)
        else:
            # CLIP-style: student keys from every process (gathered with gradient, local rows against all
            # columns); a second student pass gives the other view for IMC
            if use_imc:
                image_view2 = self._image_feature(self._image_tokens(pixel_values_view2))
                text_view2 = self._text_feature(self._text_tokens(input_ids, attention_mask))
            if use_lmi:
                image_locals = self._image_locals(image_tokens, momentum=False)
                text_locals = self._text_locals(text_tokens, momentum=False)

        losses: dict[str, torch.Tensor] = {}
        if use_cma:
            if cfg.use_momentum:
                losses["i2t"] = contrastive_cross_entropy(image_feat, text_keys, temp, i2t_targets)
                losses["t2i"] = contrastive_cross_entropy(text_feat, image_keys, temp, t2i_targets)
            else:
                _, losses["i2t"], losses["t2i"] = info_nce(image_feat, text_feat, temp, positive_ids,
                                                           return_directions=True)
        if use_imc:
            if cfg.use_momentum:
                losses["i2i"] = contrastive_cross_entropy(image_feat, image_keys, temp)
                losses["t2t"] = contrastive_cross_entropy(text_feat, text_keys, temp)
            else:
                losses["i2i"] = intra_modal_info_nce(image_feat, image_view2, temp)
                losses["t2t"] = intra_modal_info_nce(text_feat, text_view2, temp)
        if use_lmi:
            losses["lmi_image"] = local_mutual_information(image_feat, image_locals, temp)
            losses["lmi_text"] = local_mutual_information(text_feat, text_locals, temp, text_local_mask)

        group_weights = {"i2t": cfg.cma_weight, "t2i": cfg.cma_weight, "i2i": cfg.imc_weight,
                         "t2t": cfg.imc_weight, "lmi_image": cfg.lmi_weight, "lmi_text": cfg.lmi_weight}
        alignment_terms = [group_weights[name] * value for name, value in losses.items()]
        total = torch.stack(alignment_terms).sum() / len(alignment_terms) if alignment_terms else None

        if use_itm:
            losses["itm"] = self._itm_loss(
                image_tokens, image_feat, text_tokens, text_feat, attention_mask, positive_ids, temp
            )
        if use_mlm:
            losses["mlm"] = self._mlm_loss(input_ids, attention_mask, image_tokens, image_tokens_m, alpha)
        for name, weight in (("itm", cfg.itm_weight), ("mlm", cfg.mlm_weight)):
            if name in losses:
                total = weight * losses[name] if total is None else total + weight * losses[name]

        if cfg.use_momentum:
            # every process enqueues the features of all processes, in rank order
            self.image_queue.enqueue(image_feat_m, positive_ids)
            self.text_queue.enqueue(text_feat_m, positive_ids)

        return TCLOutput(
            loss=total,
            **{f"loss_{name}": value for name, value in losses.items()},
            image_embeds=image_feat,
            text_embeds=text_feat,
            temperature=temp.detach(),
        )

    def _itm_loss(self, image_tokens, image_feat, text_tokens, text_feat, attention_mask, positive_ids, temp):
        batch = image_feat.shape[0]
        with torch.no_grad():
            positive = torch.eye(batch, dtype=torch.bool, device=image_feat.device)
            if positive_ids is not None:
                positive |= positive_ids.view(-1, 1) == positive_ids.view(1, -1)
            if self.config.itm_hard_negatives:
                sim_t2i = similarity_logits(text_feat, image_feat, temp)
            else:
                sim_t2i = torch.zeros(batch, batch, device=image_feat.device)
            negative_image_for_text = sample_hard_negatives(sim_t2i, positive)
            negative_text_for_image = sample_hard_negatives(sim_t2i.t(), positive.t())
        # one batched fusion pass over the 3B pairs: positives, (text, negative image), (negative text, image)
        text_all = torch.cat([text_tokens, text_tokens, text_tokens[negative_text_for_image]], dim=0)
        mask_all = torch.cat([attention_mask, attention_mask, attention_mask[negative_text_for_image]], dim=0)
        image_all = torch.cat([image_tokens, image_tokens[negative_image_for_text], image_tokens], dim=0)
        fused = self.fusion_model(text_all, mask_all, image_all)
        logits = self.itm_head(fused[:, 0]).float()
        labels = torch.zeros(3 * batch, dtype=torch.long, device=logits.device)
        labels[:batch] = 1
        return F.cross_entropy(logits, labels)

    def _mlm_loss(self, input_ids, attention_mask, image_tokens, image_tokens_m, alpha):
        cfg = self.config
        masked_ids, labels = mask_tokens_for_mlm(
            input_ids, attention_mask, cfg.mask_token_id, cfg.text_config.vocab_size, cfg.mlm_probability
        )
        selected = labels != -100
        fused = self.fusion_model(self._text_tokens(masked_ids, attention_mask), attention_mask, image_tokens)
        logits = self.mlm_head(fused[selected])
        teacher_logits = None
        if cfg.use_momentum and alpha > 0:
            with torch.no_grad():
                fused_m = self.momentum_fusion_model(
                    self._text_tokens(masked_ids, attention_mask, momentum=True), attention_mask, image_tokens_m
                )
                teacher_logits = self.momentum_mlm_head(fused_m[selected])
        return masked_lm_distillation_loss(logits, labels[selected], teacher_logits, alpha)

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path: str, text_model_name_or_path: str,
                                    **config_overrides) -> "TCLModel":
        """Build a TCL model whose towers start from pretrained checkpoints.

        The vision encoder loads from ``vision_model_name_or_path``; the text checkpoint (a BERT-like encoder,
        ideally with its masked-LM head) is split: its first ``num_hidden_layers - num_fusion_layers`` layers
        become the text encoder, the remaining layers the self-attention/feed-forward of the fusion layers (their
        cross-attention starts new), and its MLM head (if present) the MLM head. Teachers start as copies.
        ``config_overrides`` are TCLConfig fields (e.g. ``num_fusion_layers=6, queue_size=4096``).
        """
        vision_config = AutoConfig.from_pretrained(vision_model_name_or_path)
        vision_config = getattr(vision_config, "vision_config", vision_config)  # e.g. a full CLIP checkpoint
        text_config = AutoConfig.from_pretrained(text_model_name_or_path)
        config = TCLConfig(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
                           **config_overrides)
        model = cls(config)

        # load with our tower's own class: e.g. CLIPVisionModel takes the vision half of a full CLIP checkpoint
        vision = type(model.vision_model).from_pretrained(vision_model_name_or_path, use_safetensors=True)
        _load_matching(model.vision_model, vision.state_dict(), "vision tower")

        try:
            text = AutoModelForMaskedLM.from_pretrained(text_model_name_or_path, use_safetensors=True)
        except (ValueError, OSError):
            text = AutoModel.from_pretrained(text_model_name_or_path, use_safetensors=True)
        base = getattr(text, text.base_model_prefix, text)
        text_state = base.state_dict()
        n_text = config.num_text_layers
        encoder_state, fusion_state = {}, {}
        for key, value in text_state.items():
            if ".layer." in key:
                prefix, rest = key.split(".layer.", 1)
                index, tail = rest.split(".", 1)
                if int(index) < n_text:
                    encoder_state[key] = value
                else:
                    fusion_state[f"layer.{int(index) - n_text}.{tail}"] = value
            elif not key.startswith("pooler."):
                encoder_state[key] = value
        _load_matching(model.text_model, encoder_state, "text encoder")
        if config.num_fusion_layers > 0:
            _load_matching(model.fusion_model, fusion_state, "fusion encoder", allow_missing=("crossattention",
                                                                                                "image_proj"))
            head_state = {}
            for key, value in text.state_dict().items():
                for marker in ("predictions.transform.", "predictions.decoder."):
                    if marker in key:
                        head_state[marker.split(".", 1)[1] + key.split(marker, 1)[1]] = value
            if head_state:
                _load_matching(model.mlm_head, head_state, "MLM head")
        model.copy_params_to_momentum()
        return model


def _load_matching(module: nn.Module, state: dict, what: str, allow_missing: tuple[str, ...] = ()) -> None:
    """Load `state` into `module`, raising with the mismatched keys instead of silently keeping random weights."""
    own = module.state_dict()
    # poolers are deliberately not built (we use the [CLS] token states), so theirs are not a mismatch
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not any(marker in k for marker in allow_missing)
               and not k.endswith(("position_ids", "token_type_ids"))]
    if shape_mismatch or unexpected or missing:
        raise ValueError(
            f"pretrained weights do not match the {what}: missing {missing[:20]}, unexpected {unexpected[:20]}, "
            f"shape mismatch {[(k, tuple(own[k].shape), tuple(state[k].shape)) for k in shape_mismatch][:20]}"
        )
    module.load_state_dict(state, strict=False)


__all__ = ["TCLModel", "TCLPreTrainedModel", "TCLOutput"]
