"""MIVC: Multiple Instance Visual Component for vision-language models (Wu et al., WACV 2024).

Items that come with several images (products, multi-view scans): each image goes through the vision encoder
(optionally a BLIP-2 Q-Former), `MIVCPooling` fuses the images of an item into one token sequence invariantly to
their order and number (mean / max / attention / gated attention over images, with padding masks), a projector maps
it into the causal LM's embedding space, and the visual tokens replace the image placeholder tokens of the prompt.
`pooling_mode="concatenate"` is the baseline that gives the LM every image's tokens one after another.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Blip2QFormerModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast  # its field set: see MIVCOutput

from .configuration_mivc import MIVCConfig
from .loading import (
    KeepsTrainableFlagsOnLoad,
    _load_matching,
    load_pretrained_part,
    resolve_use_safetensors,
)
from .mivc_pooling import MIVCPooling
from .towers import build_vision_encoder


@dataclass
class MIVCOutput(CausalLMOutputWithPast):
    """Output of [`MIVCForConditionalGeneration`]: the fields of transformers' `CausalLMOutputWithPast` (loss,
    logits, the LM's cache, hidden states, attentions), plus ``image_weights``: how much each image contributed to
    the pooled visual tokens, (batch, images, tokens) for per-token pooling or (batch, images) for per-image scoring
    (None for the concatenation baseline).

    Subclassing `CausalLMOutputWithPast` (a transformers internal we depend on) keeps the LM fields, and the
    cache's name, those of the installed transformers: 5.24 renamed ``past_key_values`` to ``cache``, and
    `generate` reads the cache back under the name its own release uses."""

    image_weights: torch.FloatTensor | None = None

    @classmethod
    def from_language_model_output(cls, lm_output, image_weights=None) -> MIVCOutput:
        # Copy our own declared fields by name, never the LM output's items: a field that a later transformers
        # adds to the LM's output class (or an MoE LM's extra outputs) must not break this constructor.
        values = {f.name: getattr(lm_output, f.name, None) for f in fields(CausalLMOutputWithPast)}
        return cls(**values, image_weights=image_weights)


class MIVCProjector(nn.Module):
    """Visual features -> LM embeddings: one linear layer, or LLaVA-1.5's two-layer GELU MLP."""

    def __init__(self, in_dim: int, out_dim: int, projector_type: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        if projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)
        if hasattr(self, "linear_2"):
            hidden = self.linear_2(self.act(hidden))
        return hidden


class MIVCPreTrainedModel(KeepsTrainableFlagsOnLoad, PreTrainedModel):
    config_class = MIVCConfig
    config: MIVCConfig
    base_model_prefix = "mivc"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _no_split_modules = []

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MIVCForConditionalGeneration) and hasattr(module, "query_tokens"):
            module.query_tokens.normal_(mean=0.0, std=self.config.initializer_range)


class MIVCForConditionalGeneration(MIVCPreTrainedModel, GenerationMixin):
    def __init__(self, config: MIVCConfig):
        super().__init__(config)
        self.vision_model = build_vision_encoder(config.vision_config)
        if config.qformer_config is not None:
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
            self.qformer = Blip2QFormerModel(config.qformer_config)
        if config.pooling_mode != "concatenate":
            self.pooling = MIVCPooling(
                config.vision_feature_dim,
                mode=config.pooling_mode,
                attention_dim=config.pooling_attention_dim,
                granularity=config.pooling_granularity,
            )
        self.projector = MIVCProjector(config.vision_feature_dim, config.text_config.hidden_size, config.projector_type)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()
        self.apply_freeze_flags()

    # ------------------------------------------------------------------------------------------------------
    def _frozen_modules(self) -> list[nn.Module]:
        cfg = self.config
        frozen = []
        if cfg.freeze_vision_model:
            frozen.append(self.vision_model)
        if cfg.freeze_qformer and hasattr(self, "qformer"):
            frozen += [self.qformer, _ParameterHolder(self.query_tokens)]
        if cfg.freeze_language_model:
            frozen.append(self.language_model)
        return frozen

    def apply_freeze_flags(self) -> None:
        """Set `requires_grad` from the config's freeze flags (exactly the flagged parts are frozen)."""
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        for module in self._frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    def _set_trainable(self) -> None:
        self.apply_freeze_flags()

    def train(self, mode: bool = True):
        # frozen parts keep eval-mode behaviour (no dropout), as in BLIP-2
        super().train(mode)
        for module in self._frozen_modules():
            module.train(False)
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # ------------------------------------------------------------------------------------------------------
    def _per_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(M, C, H, W) real images -> (M, T, D) features (Q-Former queries or selected vision tokens)."""
        dtype = self.projector.linear_1.weight.dtype
        tokens = self.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state
        if self.config.qformer_config is not None:
            queries = self.query_tokens.expand(tokens.shape[0], -1, -1)
            return self.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state
        if self.config.vision_feature_select_strategy == "default":
            grid = self.config.image_seq_length
            tokens = tokens[:, tokens.shape[1] - grid :]  # drop [CLS] / other prefix tokens
        return tokens

    def get_image_features(
        self, pixel_values: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Visual tokens in the LM's embedding space for a batch of items.

        Args:
            pixel_values: (batch, images, channels, height, width); padded image slots may hold anything.
            image_mask: (batch, images), True for real images (default: all real).
        Returns:
            ``(visual_tokens, image_weights)``: with pooling, visual tokens (batch, tokens_per_image, hidden) and the
            per-image weights; for "concatenate", (real images, tokens_per_image, hidden) in item order (an item's
            images one after another) and None.
        """
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values must be (batch, images, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        batch, num_images = pixel_values.shape[:2]
        if image_mask is None:
            image_mask = torch.ones(batch, num_images, dtype=torch.bool, device=pixel_values.device)
        image_mask = image_mask.to(device=pixel_values.device, dtype=torch.bool)
        if image_mask.shape != (batch, num_images):
            raise ValueError(
                f"image_mask must be (batch, images) = {(batch, num_images)}, got {tuple(image_mask.shape)}"
            )
        if not image_mask.any(dim=1).all():
            raise ValueError("every item needs at least one real image (a row of image_mask is all False)")
        # only the real images go through the encoders
        features = self._per_image_features(pixel_values[image_mask])
        if self.config.pooling_mode == "concatenate":
            return self.projector(features), None
        padded = features.new_zeros(batch, num_images, *features.shape[1:])
        padded[image_mask] = features
        pooled = self.pooling(padded, image_mask)
        return self.projector(pooled.pooled_features), pooled.image_weights

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MIVCOutput:
        r"""
        Args:
            input_ids: prompt (+ target) tokens in which the image placeholder token (`config.image_token_id`) is
                repeated once per visual token (`MIVCProcessor` expands it).
            pixel_values: (batch, images, channels, height, width); only needed on the first forward of `generate`.
            image_mask: (batch, images), True for real images.
            labels: LM targets (-100 for prompt, image and padding positions); the loss is the LM's shifted
                cross-entropy.
            kwargs: passed to the language model as they are, the cache among them (``cache`` from transformers
                5.24, ``past_key_values`` before): `generate` sends it under the name its release uses.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_weights = None
        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("images need input_ids with image placeholder tokens")
            if self.config.image_token_id is None:
                raise ValueError("config.image_token_id is not set: set it to the processor's image token id")
            visual, image_weights = self.get_image_features(pixel_values, image_mask)
            placeholders = input_ids == self.config.image_token_id
            if int(placeholders.sum()) != visual.shape[0] * visual.shape[1]:
                raise ValueError(
                    f"the prompts hold {int(placeholders.sum())} image placeholder tokens but the images give "
                    f"{visual.shape[0] * visual.shape[1]} visual tokens ({visual.shape[1]} per "
                    f"{'image' if self.config.pooling_mode == 'concatenate' else 'item'}): build the inputs with "
                    f"MIVCProcessor for pooling_mode={self.config.pooling_mode!r}"
                )
            inputs_embeds = inputs_embeds.masked_scatter(placeholders.unsqueeze(-1), visual.to(inputs_embeds.dtype))
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return MIVCOutput.from_language_model_output(outputs, image_weights=image_weights)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # the images are read once, on the prefill forward; later steps only extend the LM's cache (transformers
        # internal, listed in vlalign/__init__.py: GenerationMixin stops passing pixel_values after the prefill)
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if inputs.get("pixel_values") is None:
            inputs.pop("image_mask", None)
        return inputs

    @classmethod
    def from_pretrained_components(
        cls,
        vision_path: str,
        llm_path: str,
        qformer_path: str | None = None,
        *,
        allow_pickle: bool = False,
        **config_overrides,
    ):
        """Build from pretrained parts: any vision encoder checkpoint (the vision half of a CLIP checkpoint works),
        any causal LM, optionally a Q-Former (a `Blip2QFormerModel` folder, or the `qformer` of a BLIP-2
        checkpoint). The pooling, projector and (without a Q-Former checkpoint) the queries start new.
        ``config_overrides`` are MIVCConfig fields (e.g. ``pooling_mode="gated_attention"``, ``image_token_id``).

        Only safetensors weights are read unless ``allow_pickle=True``. A part whose checkpoint does not fit its own
        config (keys missing, unexpected or of another shape) raises `CheckpointMismatchError` instead of leaving
        random weights behind.
        """
        from transformers import AutoConfig

        for path in (vision_path, llm_path, qformer_path):
            if path is not None:
                resolve_use_safetensors(path, allow_pickle)  # refuse pickle-only folders before building the model

        vision_config = AutoConfig.from_pretrained(vision_path)
        vision_config = getattr(vision_config, "vision_config", vision_config)
        text_config = AutoConfig.from_pretrained(llm_path)
        qformer_config = None
        if qformer_path is not None:
            qformer_config = AutoConfig.from_pretrained(qformer_path)
            qformer_config = getattr(qformer_config, "qformer_config", qformer_config)
            qformer_config = qformer_config.to_dict()
        config = MIVCConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config.to_dict(),
            qformer_config=qformer_config,
            **config_overrides,
        )
        model = cls(config)
        parts = [
            (model.vision_model, type(model.vision_model), vision_path, "vision encoder"),
            (model.language_model, AutoModelForCausalLM, llm_path, "language model"),
        ]
        if qformer_path is not None:
            parts.append((model.qformer, Blip2QFormerModel, qformer_path, "Q-Former"))
        for module, loader, path, what in parts:
            pretrained = load_pretrained_part(loader, path, what, allow_pickle)
            _load_matching(module, pretrained.state_dict(), what)
        model.apply_freeze_flags()
        return model


class _ParameterHolder(nn.Module):
    """Wraps a bare parameter so that it can be frozen / put in eval mode like a module."""

    def __init__(self, parameter: nn.Parameter):
        super().__init__()
        self.parameter = parameter


__all__ = ["MIVCForConditionalGeneration", "MIVCOutput", "MIVCPreTrainedModel", "MIVCProjector"]
