"""Building blocks of the ALBEF-style image / text / fusion encoder stack shared by TCL and CODIS.

Everything is built from transformers' own blocks: the towers are `AutoModel.from_config` models and the fusion
layers are BERT attention / feed-forward modules (`BertAttention`, `BertIntermediate`, `BertOutput`) arranged as
bidirectional self-attention -> cross-attention to the image tokens -> feed-forward. (A decoder `BertLayer` would
have cross-attention too, but its self-attention is causal, which is wrong for ITM and MLM.)

This file is imported by the model files as `from .albef_stack import ...` so that `save_pretrained` copies it
next to them for `trust_remote_code` loading.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
)


def build_vision_encoder(vision_config: PreTrainedConfig) -> nn.Module:
    """Any transformers vision encoder whose `last_hidden_state` is [prefix tokens] + patch tokens."""
    try:
        # ViT-like models carry a pooler we never use; leaving it out keeps DDP free of unused parameters
        return AutoModel.from_config(vision_config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(vision_config)


def build_text_encoder(text_config: PreTrainedConfig, num_layers: int) -> nn.Module:
    """The first `num_layers` layers of a BERT-like encoder (the others become fusion layers)."""
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = num_layers
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


class FusionLayer(GradientCheckpointingLayer):
    """Bidirectional self-attention over text tokens, cross-attention to image tokens, feed-forward.

    Submodule names mirror `BertLayer` (`attention`, `crossattention`, `intermediate`, `output`) so that the
    upper layers of a pretrained BERT load into it key for key (the cross-attention starts new).
    """

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.attention = BertAttention(config, is_causal=False)
        self.crossattention = BertAttention(config, is_causal=False, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states, _ = self.attention(hidden_states, attention_mask)
        hidden_states, _ = self.crossattention(
            hidden_states,
            None,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
        )
        return self.output(self.intermediate(hidden_states), hidden_states)


class FusionEncoder(nn.Module):
    """Stack of `FusionLayer`s. Image tokens wider or narrower than the text are linearly mapped to the text
    width first (ALBEF assumes equal widths; we allow any vision/text pair)."""

    def __init__(self, text_config: PreTrainedConfig, num_layers: int, image_hidden_size: int):
        super().__init__()
        self.config = text_config
        self.layer = nn.ModuleList([FusionLayer(text_config) for _ in range(num_layers)])
        self.image_proj = (
            nn.Identity()
            if image_hidden_size == text_config.hidden_size
            else nn.Linear(image_hidden_size, text_config.hidden_size)
        )

    def forward(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_states: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        image_states = self.image_proj(image_states)
        self_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=text_states, attention_mask=attention_mask
        )
        cross_mask = None
        if image_mask is not None:
            cross_mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=text_states,
                attention_mask=image_mask,
                encoder_hidden_states=image_states,
            )
        hidden = text_states
        for layer in self.layer:
            hidden = layer(hidden, self_mask, image_states, cross_mask)
        return hidden


class MLMHead(nn.Module):
    """BERT's masked-LM head (transform + vocabulary decoder). Names match `BertForMaskedLM.cls.predictions`."""

    def __init__(self, config: PreTrainedConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


# ------------------------------------------------------------------------------------------------------------
# EMA teachers (the feature queues live in losses.FeatureQueue)


@torch.no_grad()
def copy_parameters(students: list[nn.Module], teachers: list[nn.Module]) -> None:
    """Make each teacher an exact copy of its student and freeze it."""
    for student, teacher in zip(students, teachers, strict=True):
        for p_s, p_t in zip(student.parameters(), teacher.parameters(), strict=True):
            p_t.copy_(p_s)
            p_t.requires_grad_(False)


@torch.no_grad()
def ema_update(students: list[nn.Module], teachers: list[nn.Module], momentum: float) -> None:
    """`teacher = momentum * teacher + (1 - momentum) * student`, for every parameter pair."""
    student_params = [p for m in students for p in m.parameters()]
    teacher_params = [p for m in teachers for p in m.parameters()]
    if not teacher_params:
        return
    if len(student_params) != len(teacher_params):
        raise RuntimeError("student and teacher modules have different numbers of parameters")
    torch._foreach_mul_(teacher_params, momentum)
    students_detached = [p.detach().to(t.dtype) for p, t in zip(student_params, teacher_params, strict=True)]
    torch._foreach_add_(teacher_params, students_detached, alpha=1.0 - momentum)


def pool_patch_locals(patch_features: torch.Tensor, grid_size: int, pooled_grid: int) -> torch.Tensor:
    """Average-pool (B, grid*grid, D) patch features on their spatial grid to (B, pooled_grid**2, D)."""
    batch, num_patches, dim = patch_features.shape
    if num_patches != grid_size * grid_size:
        raise ValueError(f"expected {grid_size}x{grid_size} patch tokens, got {num_patches}")
    grid = patch_features.transpose(1, 2).reshape(batch, dim, grid_size, grid_size)
    kernel = grid_size // pooled_grid
    pooled = F.avg_pool2d(grid, kernel_size=kernel, stride=kernel)
    return pooled.flatten(2).transpose(1, 2)
