"""The transformers encoder families the ALBEF-style models take as towers: what each one outputs, how it is pooled
to one global feature, and how its tokens lie on the image's patch grid.

Families differ in ways that matter here:

- ViT-like vision encoders (ViT, DeiT, BEiT, Data2Vec-vision, DINOv2, CLIP vision, ViT-MSN) return [CLS], maybe more
  prefix tokens (DeiT's distillation token, DINOv2's registers), then the patch grid;
- SigLIP vision returns only patch tokens, pooled by its attention-pooling head;
- hierarchical encoders (Swin, ConvNeXt) return the last stage's feature map, downsampled 2x per stage after the
  first; ConvNeXt as a (B, C, H, W) map, Swin as (B, H * W, C) tokens;
- text encoders put [CLS] (BERT-like, DistilBERT, ModernBERT) or a start token (CLIP, whose causal attention makes
  the end-of-text token the one that has seen the caption) first.

The model files import this module as `from .towers import ...`, so that it travels with a saved model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig

# Vision families whose `last_hidden_state` starts with a [CLS] token, followed by any prefix tokens and the grid.
CLS_VISION_MODEL_TYPES = (
    "vit",
    "deit",
    "beit",
    "data2vec-vision",
    "dinov2",
    "dinov2_with_registers",
    "clip_vision_model",
    "vit_msn",
)
# ... whose output is the patch grid alone (no [CLS]): SigLIP, and the last stage of the hierarchical ones.
GRID_VISION_MODEL_TYPES = ("siglip_vision_model", "swin", "convnext")
VISION_MODEL_TYPES = CLS_VISION_MODEL_TYPES + GRID_VISION_MODEL_TYPES

# What `pooler_output` is for each family that has one (the `pooler` pooling); ViT-MSN has none.
VISION_POOLERS = {
    "vit": "tanh(dense([CLS])), ViT's pooler",
    "deit": "tanh(dense([CLS])), DeiT's pooler",
    "beit": "layer norm of the mean patch token (use_mean_pooling) or the [CLS] token",
    "data2vec-vision": "layer norm of the mean patch token (use_mean_pooling) or the [CLS] token",
    "dinov2": "the layer-normed [CLS] token",
    "dinov2_with_registers": "the layer-normed [CLS] token",
    "clip_vision_model": "post_layernorm([CLS]), how CLIP pools",
    "siglip_vision_model": "the multi-head attention-pooling head, how SigLIP pools (vision_use_head)",
    "swin": "the average of the last stage's tokens",
    "convnext": "layer norm of the average of the last feature map, how ConvNeXt pools",
}

# Vision families refused, with why and what to use instead.
REFUSED_VISION_MODEL_TYPES = {
    "siglip2_vision_model": "SigLIP2's NaFlex encoder takes pre-cut patches of variable-resolution images "
    "(pixel_attention_mask, spatial_shapes), not the (batch, 3, H, W) images the processors here produce; use "
    "a fixed-resolution SigLIP vision tower (siglip_vision_model, e.g. a SigLIP2 checkpoint's 'siglip' variant)",
    "swinv2": "not tested here; Swin (model_type 'swin') is",
    "convnextv2": "not tested here; ConvNeXt (model_type 'convnext') is",
}

# Text families whose layers are BERT's (post-LN self-attention `attention.self.{query,key,value}` +
# `attention.output`, `intermediate`, `output`): their upper layers load key for key into the fusion layers.
FUSION_TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
# Text families that work as the text tower of a dual encoder (no fusion layers).
TEXT_MODEL_TYPES = FUSION_TEXT_MODEL_TYPES + ("distilbert", "modernbert", "clip_text_model", "siglip_text_model")
# ... of which these have a pooler (`pooler`): BERT's tanh(dense([CLS])) and CLIP's end-of-text token.
TEXT_POOLERS = {
    "bert": "tanh(dense([CLS])), BERT's next-sentence pooler",
    "roberta": "tanh(dense(<s>)), RoBERTa's pooler",
    "xlm-roberta": "tanh(dense(<s>)), XLM-R's pooler",
    "clip_text_model": "the end-of-text token (the first eos_token_id), how CLIP pools",
    "siglip_text_model": "the last position through SigLIP's head (SigLIP pads every text to max_length)",
}
# causal text encoders: their first token has seen only itself
CAUSAL_TEXT_MODEL_TYPES = ("clip_text_model",)
# text encoders trained without an attention mask: the padding up to max_length is part of every input (SigLIP)
UNMASKED_TEXT_MODEL_TYPES = ("siglip_text_model",)


def _stages(config: PreTrainedConfig) -> int:
    if config.model_type == "swin":
        return len(config.depths)
    if config.model_type == "convnext":
        return config.num_stages
    return 1


def _siglip_head(config: PreTrainedConfig) -> bool:
    """Whether a SigLIP vision tower has its attention-pooling head (configs of older transformers 5 releases, e.g.
    5.20, have no `vision_use_head` field and always build it)."""
    return getattr(config, "vision_use_head", True)


def vision_hidden_size(config: PreTrainedConfig) -> int:
    """Width of the vision tower's tokens and pooled feature (ConvNeXt: its last stage's)."""
    if config.model_type == "convnext":
        return config.hidden_sizes[-1]
    return config.hidden_size


def vision_downsampling(config: PreTrainedConfig) -> int:
    """Pixels per side of one output token: the patch size, times 2 per stage after the first (hierarchical)."""
    return config.patch_size * 2 ** (_stages(config) - 1)


def vision_grid_size(config: PreTrainedConfig) -> int:
    """Side of the output token grid (the last stage's feature map for hierarchical families)."""
    return config.image_size // vision_downsampling(config)


def vision_poolings(config: PreTrainedConfig) -> tuple[str, ...]:
    """The poolings a vision family supports: `cls` where it has a [CLS] token, `pooler` where it has a pooler."""
    model_type = config.model_type
    poolings = ["mean"]
    if model_type in CLS_VISION_MODEL_TYPES:
        poolings.insert(0, "cls")
    if model_type in VISION_POOLERS and (model_type != "siglip_vision_model" or _siglip_head(config)):
        poolings.append("pooler")
    return tuple(poolings)


def default_vision_pooling(config: PreTrainedConfig) -> str:
    """How the family pools when it is trained for classification or contrast: CLIP's post-layer-normed [CLS],
    SigLIP's attention-pooling head, BEiT's normed mean patch token and Data2Vec-vision's mean patch token (when their
    configs say so), Swin's average, ConvNeXt's normed average; [CLS] otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type in ("clip_vision_model", "convnext"):
        return "pooler"
    if model_type == "siglip_vision_model":
        return "pooler" if _siglip_head(config) else "mean"
    if model_type == "beit" and config.use_mean_pooling:
        return "pooler"
    if model_type == "data2vec-vision" and config.use_mean_pooling:
        # its model class builds no pooler by default, so checkpoints rarely carry the pooler's norm
        return "mean"
    if model_type == "swin":
        return "mean"
    return "cls"


def text_poolings(config: PreTrainedConfig) -> tuple[str, ...]:
    model_type = config.model_type
    if model_type in CAUSAL_TEXT_MODEL_TYPES:
        return ("pooler",)
    if model_type == "siglip_text_model":  # its tokenizer adds no start token to pool
        return ("mean", "pooler")
    return ("cls", "mean", "pooler") if model_type in TEXT_POOLERS else ("cls", "mean")


def default_text_pooling(config: PreTrainedConfig) -> str:
    """[CLS] (the ALBEF / TCL text feature), CLIP's end-of-text token, ModernBERT's `classifier_pooling`."""
    model_type = getattr(config, "model_type", None)
    if model_type in CAUSAL_TEXT_MODEL_TYPES + ("siglip_text_model",):
        return "pooler"
    if model_type == "modernbert":
        return config.classifier_pooling
    return "cls"


def _build(config: PreTrainedConfig, with_pooler: bool) -> nn.Module:
    try:
        # a pooler that is not used stays out: DDP refuses parameters without gradient
        return AutoModel.from_config(config, add_pooling_layer=with_pooler)
    except TypeError:  # the family has no such switch (its pooler, if any, is always built)
        return AutoModel.from_config(config)


def vision_prefix_tokens(config: PreTrainedConfig) -> int:
    """Tokens before the patch grid in the tower's output: [CLS], DeiT's distillation token, DINOv2's registers
    (none for SigLIP and the hierarchical families)."""
    model_type = config.model_type
    if model_type not in CLS_VISION_MODEL_TYPES:
        return 0
    if model_type == "deit":
        return 2
    if model_type == "dinov2_with_registers":
        return 1 + config.num_register_tokens
    return 1


def patch_dropout_refusal(config: PreTrainedConfig) -> str | None:
    """Why the vision family cannot drop patch tokens after its embeddings (None: it can). The layers of the others
    treat each token alike whatever the sequence length (the position is in the token, added by the embeddings)."""
    model_type = config.model_type
    if model_type in ("swin", "convnext"):
        return (
            f"{model_type} is hierarchical: its windowed attention / convolutions and downsampling stages need the "
            "full patch grid"
        )
    if model_type in ("beit", "data2vec-vision") and (
        config.use_relative_position_bias or config.use_shared_relative_position_bias
    ):
        return (
            f"{model_type} with a relative position bias (use_relative_position_bias / "
            "use_shared_relative_position_bias) adds a bias defined on the full patch grid to every attention map"
        )
    return None


class PatchDropout:
    """Patch dropout (FLIP, Li et al. 2023), as a forward hook on a vision tower's embeddings module: in training
    mode each image keeps its prefix tokens and a random subset of `max(1, int(N * (1 - prob)))` of its N patch
    tokens (open_clip's count), after the position embeddings are added; the layers then run on the kept tokens.
    The subset is drawn from torch's RNG (on the tokens' device), so gradient caching's replay of a chunk draws the
    same one. A plain object (no parameters, nothing in the state dict): the config's `patch_dropout` re-creates it.
    """

    def __init__(self, prob: float, num_prefix_tokens: int):
        self.prob, self.num_prefix_tokens = prob, num_prefix_tokens
        # None: drop in the embeddings module's training mode. The ALBEF models set it from their own mode, so that
        # a locked tower, whose frozen modules run in eval mode, still drops patches while the model trains.
        self.active: bool | None = None

    def num_kept(self, num_patches: int) -> int:
        return max(1, int(num_patches * (1 - self.prob)))

    def keep_indices(self, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
        """(batch, kept) indices of the patch tokens each image keeps: the top-k of Gaussian noise, as open_clip."""
        noise = torch.randn(batch, num_patches, device=device)
        return noise.topk(self.num_kept(num_patches), dim=-1).indices

    def drop(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(batch, prefix + N, hidden) -> (batch, prefix + kept, hidden)."""
        prefix, patches = embeddings[:, : self.num_prefix_tokens], embeddings[:, self.num_prefix_tokens :]
        keep = self.keep_indices(patches.shape[0], patches.shape[1], patches.device)
        kept = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, kept], dim=1)

    def __call__(self, module: nn.Module, args, output):
        active = module.training if self.active is None else self.active
        if not active or self.prob == 0:
            return output
        if isinstance(output, tuple):  # Data2Vec-vision's embeddings return (tokens, patch grid shape)
            return (self.drop(output[0]), *output[1:])
        return self.drop(output)


def vision_embeddings(model: nn.Module) -> nn.Module:
    """The module that embeds the patches (and adds the position embeddings) of a ViT-like vision tower."""
    # CLIPVisionModel and SiglipVisionModel hold their transformer as `vision_model`
    return getattr(model, "vision_model", model).embeddings


def build_vision_encoder(
    vision_config: PreTrainedConfig, pooling: str | None = None, patch_dropout: float = 0.0
) -> nn.Module:
    """The vision tower, with its pooler only when `pooling == "pooler"` (SigLIP: its attention-pooling head), and
    with `PatchDropout` of share `patch_dropout` on its embeddings when it is > 0 (families with
    `patch_dropout_refusal(config) is None`)."""
    if vision_config.model_type == "siglip_vision_model" and _siglip_head(vision_config) and pooling != "pooler":
        vision_config = copy.deepcopy(vision_config)
        vision_config.vision_use_head = False
    model = _build(vision_config, pooling == "pooler")
    if patch_dropout > 0:
        refusal = patch_dropout_refusal(vision_config)
        if refusal is not None:
            raise ValueError(f"patch_dropout: {refusal}")
        model.patch_dropout = PatchDropout(patch_dropout, vision_prefix_tokens(vision_config))
        vision_embeddings(model).register_forward_hook(model.patch_dropout)
    return model


def build_text_encoder(text_config: PreTrainedConfig, num_layers: int, pooling: str | None = None) -> nn.Module:
    """The first `num_layers` layers of the text tower (the others become fusion layers), its pooler only when
    `pooling == "pooler"`."""
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = num_layers
    if config.model_type == "siglip_text_model":  # not in AutoModel's mapping (a part of SiglipModel)
        from transformers import SiglipTextModel

        return SiglipTextModel(config)
    return _build(config, pooling == "pooler")


def encode_image(
    model: nn.Module, pixel_values: torch.Tensor, pooling: str, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token states (batch, tokens, hidden): `num_prefix_tokens` prefix tokens, then the patch tokens (the whole
    grid, or those patch dropout kept), pooled feature (batch, hidden)). A (B, C, H, W) feature map (ConvNeXt) is
    laid out as row-major tokens."""
    output = model(pixel_values=pixel_values)
    tokens = output.last_hidden_state
    if tokens.dim() == 4:
        tokens = tokens.flatten(2).transpose(1, 2)
    if pooling == "cls":
        pooled = tokens[:, 0]
    elif pooling == "mean":
        pooled = tokens[:, num_prefix_tokens:].mean(dim=1)
    else:
        pooled = output.pooler_output
    return tokens, pooled


def encode_text(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token states (batch, length, hidden), pooled feature (batch, hidden)); `mean` averages the unpadded
    tokens. SigLIP's text tower sees the whole padded text, as it was trained."""
    unmasked = model.config.model_type in UNMASKED_TEXT_MODEL_TYPES
    output = model(input_ids=input_ids, attention_mask=None if unmasked else attention_mask)
    tokens = output.last_hidden_state
    if pooling == "cls":
        pooled = tokens[:, 0]
    elif pooling == "mean":
        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    else:
        pooled = output.pooler_output
    return tokens, pooled


__all__ = [
    "CLS_VISION_MODEL_TYPES",
    "FUSION_TEXT_MODEL_TYPES",
    "PatchDropout",
    "TEXT_MODEL_TYPES",
    "VISION_MODEL_TYPES",
    "build_text_encoder",
    "build_vision_encoder",
    "default_text_pooling",
    "default_vision_pooling",
    "encode_image",
    "encode_text",
    "patch_dropout_refusal",
    "text_poolings",
    "vision_grid_size",
    "vision_hidden_size",
    "vision_poolings",
    "vision_prefix_tokens",
]
