"""MIVC: order-free pooling of a variable number of images per item (Multiple Instance Visual Component).

MIVC (Wu et al., WACV 2024) fuses the visual features of all images of one item (e.g. a product's photos) into a
single representation before the projection into the language model, instead of concatenating the images. It is
the attention-based multiple-instance pooling of Ilse et al. (2018): each image is an instance of the bag "item",
and the bag representation is a weighted sum of the instances,

- ``mean``: uniform weights over the real images;
- ``max``: element-wise max over the real images;
- ``attention``: ``a_k = softmax_k(w^T tanh(V h_k))``, ``z = sum_k a_k h_k``;
- ``gated_attention``: ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``.

Items have different numbers of images, so a batch is padded to N images and ``image_mask`` marks the real ones.
Padded images are *replaced* (``torch.where``), never multiplied by the mask, because ``0 * inf = NaN``: whatever a
padded slot contains, it gets weight exactly 0 and gradient exactly 0.

This file imports only torch and ``transformers.utils.ModelOutput`` so that a model file can import it as
``from .mivc_pooling import MIVCPooling`` and ``save_pretrained`` can copy it next to the model for
``trust_remote_code`` loading.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

# Finite score for padded images: exp() of it underflows to exactly 0 in float32/float64, and unlike -inf it can
# never produce inf - inf = NaN in the softmax or its backward.
_MASKED_SCORE = -1e9


@dataclass
class MIVCPoolingOutput(ModelOutput):
    """Output of :class:`MIVCPooling`.

    Args:
        pooled_features: (B, T, D) for token inputs (B, N, T, D), (B, D) for vector inputs (B, N, D); in the input
            dtype.
        image_weights: how much each image contributed, >= 0, summing to 1 over the real images and exactly 0 on
            padded ones; (B, N, T) for token inputs with ``granularity="token"``, (B, N) otherwise. Float32 (float64
            for float64 inputs) whatever the input precision.
    """

    pooled_features: torch.FloatTensor | None = None
    image_weights: torch.FloatTensor | None = None


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class MIVCPooling(nn.Module):
    """Permutation-invariant pooling of the features of a variable number of images per item (MIVC).

    Input ``features`` are (B, N, T, D) - every image a sequence of T tokens or Q-Former queries - or (B, N, D) - one
    vector per image - with ``image_mask`` (B, N), True for a real image and False for padding.

    Modes:
        - ``"mean"``: masked mean over the real images.
        - ``"max"``: masked element-wise max over the real images. Its ``image_weights`` are the share of feature
          entries for which each image supplies the maximum (ties are split), so they sum to 1 like the others.
        - ``"attention"``: ``a_k = softmax_k(w^T tanh(V h_k))``, ``z = sum_k a_k h_k`` with V = ``attention_proj``
          (Linear(D, L)) and w = ``score_proj`` (Linear(L, 1, bias=False)). The ungated variant was the best one in
          the MIVC paper.
        - ``"gated_attention"``: ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))`` with U = ``gate_proj``.

    Granularity (token inputs only): ``"token"`` pools every token position separately over the images, with shared
    V, U, w (one score per image and token); ``"image"`` scores each image once from its mean token and applies
    that weight at every token position (for ``max``: one share per image over all its token entries).

    Why it is permutation invariant: an image's score depends only on its own features, the softmax (or mean, or
    max) normalises over *all* images of the item, and the pooled feature is a sum over images - none of which
    depends on the order of the images. Reordering an item's images (with its mask) leaves the pooled features
    unchanged and reorders the weights the same way.

    Scores and softmaxes run in float32 (float64 for float64 inputs) with autocast disabled, so bf16 inputs work;
    the pooled features are cast back to the input dtype.
    """

    MODES = ("mean", "max", "attention", "gated_attention")
    GRANULARITIES = ("token", "image")

    def __init__(self, hidden_size: int, mode: str = "attention", attention_dim: int = 128, granularity: str = "token"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if granularity not in self.GRANULARITIES:
            raise ValueError(f"granularity must be one of {self.GRANULARITIES}, got {granularity!r}")
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("attention_dim", attention_dim)
        self.hidden_size = hidden_size
        self.mode = mode
        self.attention_dim = attention_dim
        self.granularity = granularity
        if mode in ("attention", "gated_attention"):
            self.attention_proj = nn.Linear(hidden_size, attention_dim)
            if mode == "gated_attention":
                self.gate_proj = nn.Linear(hidden_size, attention_dim)
            self.score_proj = nn.Linear(attention_dim, 1, bias=False)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, mode={self.mode!r}, attention_dim={self.attention_dim}, "
            f"granularity={self.granularity!r}"
        )

    def forward(self, features: torch.Tensor, image_mask: torch.Tensor | None = None) -> MIVCPoolingOutput:
        """Pool ``features`` (B, N, T, D) or (B, N, D) over the N images; ``image_mask`` (B, N), None = all real."""
        mask = self._check_inputs(features, image_mask)
        vector_input = features.dim() == 3
        per_token = not vector_input and self.granularity == "token"
        compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        # Autocast would re-cast our float32 linear layers to bf16/fp16; the scores must stay in full precision.
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            h = features.unsqueeze(2) if vector_input else features  # (B, N, T, D); vectors are one-token images
            mask4 = mask[:, :, None, None]
            if self.mode == "max":
                pooled, weights = self._max(h, mask4, per_token, compute_dtype)
            else:
                # Replace, not multiply: a padded image holding inf/NaN must not reach a sum (0 * inf = NaN), and
                # where() gives the padded slots exactly zero gradient.
                h = torch.where(mask4, h.to(compute_dtype), torch.zeros((), dtype=compute_dtype, device=h.device))
                weights = self._weights(h, mask, per_token)  # (B, N, T) per token, (B, N, 1) per image
                pooled = (weights.unsqueeze(-1) * h).sum(dim=1).to(features.dtype)  # (B, T, D)
        if vector_input:
            pooled = pooled.squeeze(1)
        if not per_token:
            weights = weights.squeeze(-1)
        return MIVCPoolingOutput(pooled_features=pooled, image_weights=weights)

    def _weights(self, h: torch.Tensor, mask: torch.Tensor, per_token: bool) -> torch.Tensor:
        """Image weights for mean / (gated) attention: (B, N, T) when scoring each token, else (B, N, 1)."""
        batch, n_images, n_tokens, _ = h.shape
        real = mask[:, :, None]  # (B, N, 1), broadcasts over tokens
        if self.mode == "mean":
            weights = real.to(h.dtype) / mask.sum(dim=1).to(h.dtype)[:, None, None]
            return weights.expand(batch, n_images, n_tokens).contiguous() if per_token else weights
        x = h if per_token else h.mean(dim=2, keepdim=True)  # per-image scoring uses the image's mean token
        hidden = torch.tanh(self._linear(self.attention_proj, x))
        if self.mode == "gated_attention":
            hidden = hidden * torch.sigmoid(self._linear(self.gate_proj, x))
        scores = self._linear(self.score_proj, hidden).squeeze(-1)  # (B, N, T or 1)
        scores = torch.where(real, scores, torch.full((), _MASKED_SCORE, dtype=scores.dtype, device=scores.device))
        weights = torch.softmax(scores, dim=1)
        return torch.where(real, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))

    @staticmethod
    def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """The layer in the compute dtype, so a bf16 module still scores in float32 (the cast keeps gradients)."""
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.weight.to(x.dtype), bias)

    @staticmethod
    def _max(h: torch.Tensor, mask4: torch.Tensor, per_token: bool, compute_dtype: torch.dtype):
        """Masked element-wise max (exact in the input dtype) and each image's share of the maxima."""
        filled = torch.where(mask4, h, torch.full((), float("-inf"), dtype=h.dtype, device=h.device))
        pooled = filled.amax(dim=1)  # (B, T, D); -inf padding never wins since every item has a real image
        supplies = ((filled == pooled.unsqueeze(1)) & mask4).to(compute_dtype)  # (B, N, T, D)
        share = supplies / supplies.sum(dim=1, keepdim=True).clamp_min(1)  # ties split evenly
        weights = share.mean(dim=-1) if per_token else share.mean(dim=(2, 3)).unsqueeze(-1)
        return pooled, weights

    def _check_inputs(self, features: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        """Validate shapes and return the mask as a (B, N) bool tensor on the features' device."""
        if not isinstance(features, torch.Tensor) or features.dim() not in (3, 4):
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(
                f"features must be (batch, images, hidden) or (batch, images, tokens, hidden), got {shape}"
            )
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got {features.dtype}")
        if features.shape[-1] != self.hidden_size:
            raise ValueError(
                f"features' last dimension must be hidden_size={self.hidden_size}, got {tuple(features.shape)}"
            )
        batch, n_images = features.shape[:2]
        if n_images == 0:
            raise ValueError(f"features hold no image (images dimension is 0), got {tuple(features.shape)}")
        if image_mask is None:
            return torch.ones(batch, n_images, dtype=torch.bool, device=features.device)
        if not isinstance(image_mask, torch.Tensor) or tuple(image_mask.shape) != (batch, n_images):
            shape = tuple(image_mask.shape) if isinstance(image_mask, torch.Tensor) else type(image_mask).__name__
            raise ValueError(f"image_mask must have shape (batch, images) = {(batch, n_images)}, got {shape}")
        mask = image_mask.to(features.device)
        mask = mask if mask.dtype == torch.bool else mask != 0
        empty = (~mask.any(dim=1)).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"items {empty.tolist()} have no real image (image_mask all False); every item needs at least one"
            )
        return mask
