"""Contrastive and alignment losses for vision-language models.

Every function here is small and pure: it takes embeddings / logits and returns a scalar loss (or the targets a
loss needs), works on any model's outputs, and computes in float32 (or float64 when given float64) whatever the
input precision, so that bf16 autocast never reaches a softmax. Features are expected L2-normalised where a
function says so. Names follow the paper terms:

- ``info_nce``: symmetric image-text InfoNCE, exact across processes (gather with gradient + local loss);
- ``contrastive_cross_entropy``: one direction of InfoNCE (queries vs keys) with hard or soft targets;
- ``positive_targets`` / ``distillation_targets``: the target distributions of TCL/ALBEF's momentum distillation;
- ``local_mutual_information``: TCL's global-to-local InfoNCE (LMI) with a padding mask;
- ``sample_hard_negatives``: ALBEF/TCL's ITM negative mining;
- ``masked_lm_distillation_loss``: MLM cross-entropy blended with soft targets from a teacher;
- ``all_gather_with_grad`` / ``all_gather_no_grad``: feature gathering across processes;
- ``FeatureQueue``: the memory bank (queue) of TCL / ALBEF / CODIS, filled with features of all processes.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Large negative used instead of -inf for masked logits: exp() of it is 0 in float32, but unlike -inf it keeps the
# softmax/logsumexp backward finite when a whole row is masked.
_MASKED_LOGIT = -1e9


def full_precision(fn):
    """Run `fn` with autocast disabled, so its matmuls and softmaxes really happen in float32/float64 even when
    the caller is under bf16/fp16 autocast (autocast would otherwise re-cast our float32 matmul inputs)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (reference computations), everything else is promoted to float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_temperature(temperature: torch.Tensor | float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A python float goes straight to `dtype` (not via float32, which would round 0.07 in float64 references)."""
    if isinstance(temperature, torch.Tensor):
        return temperature.to(device=device, dtype=dtype)
    return torch.tensor(temperature, dtype=dtype, device=device)


@full_precision
def contrastive_cross_entropy(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: torch.Tensor | float,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE in one direction: cross-entropy of ``softmax(queries @ keys.T / temperature)`` against targets.

    Args:
        queries: (N, D) normalised features.
        keys: (M, D) normalised features, M >= N. With ``targets=None`` query i's positive is key i (the in-batch
            keys come first, followed by e.g. queue entries).
        temperature: scalar (float or 0-dim tensor, may require grad).
        targets: optional (N, M) rows summing to 1 (soft targets, several positives, or distillation targets).

    Returns:
        Mean over queries of ``-sum_j targets_ij * log p_ij``.
    """
    logits = similarity_logits(queries, keys, temperature)
    dtype = logits.dtype
    if targets is None:
        labels = torch.arange(queries.shape[0], device=queries.device)
        return F.cross_entropy(logits, labels)
    return -(F.log_softmax(logits, dim=1) * targets.to(dtype)).sum(dim=1).mean()


@full_precision
def similarity_logits(queries: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """``queries @ keys.T / temperature`` in float32 (or float64), e.g. teacher logits for distillation targets."""
    dtype = _loss_dtype(queries, keys)
    return (queries.to(dtype) @ keys.to(dtype).t()) / _as_temperature(temperature, dtype, queries.device)


def positive_targets(query_ids: torch.Tensor | None, key_ids: torch.Tensor | None, num_queries: int, num_keys: int,
                     device: torch.device | None = None, offset: int = 0) -> torch.Tensor:
    """Target distribution spreading mass uniformly over the positives of each query.

    With ids, key j is a positive of query i iff ``query_ids[i] == key_ids[j]`` (several captions of one image, or
    class-level positives). Without ids, query i's only positive is key ``offset + i`` (``offset`` is where this
    process's rows start among keys gathered from all processes). That key is always a positive, whatever the ids
    say, so no row is ever empty.
    """
    eye = torch.zeros(num_queries, num_keys, device=device)
    rows = torch.arange(num_queries, device=device)
    eye[rows, rows + offset] = 1.0
    if query_ids is None or key_ids is None:
        return eye
    positives = (query_ids.view(-1, 1) == key_ids.view(1, -1)).float()
    positives = torch.maximum(positives, eye)
    return positives / positives.sum(dim=1, keepdim=True)


@full_precision
def distillation_targets(teacher_logits: torch.Tensor, hard_targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum-distillation targets: ``alpha * softmax(teacher) + (1 - alpha) * hard_targets`` (no gradient)."""
    with torch.no_grad():
        dtype = _loss_dtype(teacher_logits)
        soft = F.softmax(teacher_logits.to(dtype), dim=1)
        return alpha * soft + (1.0 - alpha) * hard_targets.to(dtype)


@full_precision
def local_mutual_information(
    global_features: torch.Tensor,
    local_features: torch.Tensor,
    temperature: torch.Tensor | float,
    local_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TCL's local mutual information loss (global-to-local InfoNCE, in-batch).

    For sample i, global feature g_i must pick out each of its own locals l_ij against the locals of every other
    sample: ``-log( e^{g_i.l_ij/t} / (e^{g_i.l_ij/t} + sum_{k != i} sum_j' e^{g_i.l_kj'/t}) )``, averaged over the
    valid locals of i, then over the batch. The other locals of sample i itself are neither positive nor negative.

    Args:
        global_features: (B, D) normalised.
        local_features: (B, P, D) normalised (e.g. pooled patch features, or token features).
        temperature: scalar.
        local_mask: optional (B, P), 1/True for real locals. Masked locals (padding tokens) are excluded both as
            positives and as negatives.
    """
    dtype = _loss_dtype(global_features, local_features)
    g = global_features.to(dtype)
    loc = local_features.to(dtype)
    batch, num_locals = loc.shape[:2]
    if local_mask is None:
        valid = torch.ones(batch, num_locals, dtype=torch.bool, device=loc.device)
    else:
        valid = local_mask.to(device=loc.device).bool()
    t = _as_temperature(temperature, dtype, g.device)
    # logits[i, k, j] = g_i . l_kj / t
    logits = torch.einsum("id,kjd->ikj", g, loc) / t
    idx = torch.arange(batch, device=g.device)
    positive = logits[idx, idx]  # (B, P)
    # negatives of anchor i: every valid local of every other sample
    negative_mask = valid.unsqueeze(0).expand(batch, batch, num_locals).clone()
    negative_mask[idx, idx] = False
    negatives = logits.masked_fill(~negative_mask, _MASKED_LOGIT).flatten(1)
    negative_lse = torch.logsumexp(negatives, dim=1, keepdim=True)  # (B, 1)
    per_local = torch.logaddexp(positive, negative_lse) - positive  # (B, P)
    per_local = per_local * valid
    counts = valid.sum(dim=1)
    has_locals = counts > 0
    per_sample = per_local.sum(dim=1) / counts.clamp(min=1)
    return per_sample[has_locals].mean() if has_locals.any() else per_sample.sum() * 0.0


def sample_hard_negatives(
    similarity: torch.Tensor,
    positive_mask: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one negative column per row by multinomial sampling from ``softmax(similarity)`` with positives zeroed.

    Args:
        similarity: (N, M) logits (e.g. ``text_feat @ image_feat.T / t``).
        positive_mask: (N, M) bool, True where column j is a positive of row i (at least the diagonal). Positives
            are never returned.
        generator: optional torch.Generator for reproducible sampling.

    Returns:
        (N,) long indices. A row whose non-positive weights all underflow to zero falls back to a uniform choice
        among its non-positives; a row with no non-positive at all (every column is a positive) falls back to a
        uniform choice among the columns other than itself, or itself when M == 1.
    """
    with torch.no_grad():
        weights = F.softmax(similarity.float(), dim=1).masked_fill(positive_mask, 0.0)
        no_mass = weights.sum(dim=1) <= 0
        if no_mass.any():
            # underflow or all-positive rows: uniform over non-positives, else over non-self columns
            fallback = (~positive_mask[no_mass]).float()
            empty = fallback.sum(dim=1) == 0
            if empty.any():
                rows = torch.nonzero(no_mass).flatten()[empty]
                non_self = torch.ones(len(rows), similarity.shape[1], device=similarity.device)
                in_range = rows < similarity.shape[1]
                non_self[in_range, rows[in_range]] = 0.0
                non_self[non_self.sum(dim=1) == 0] = 1.0
                fallback[empty] = non_self
            weights[no_mass] = fallback
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mask_tokens_for_mlm(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    special_token_ids: list[int] | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of the real tokens (never position 0, padding or special ids); of
    those, 80% become [MASK], 10% a random token, 10% stay. Returns ``(masked_input_ids, labels)`` with labels
    -100 at unchosen positions."""
    device = input_ids.device
    probs = torch.full(input_ids.shape, probability, device=device)
    maskable = attention_mask.bool().clone()
    maskable[:, 0] = False  # [CLS]/BOS is the global feature, never masked
    for token_id in special_token_ids:
        maskable &= input_ids != token_id
    probs = probs * maskable
    chosen = torch.bernoulli(probs, generator=generator).bool()
    labels = input_ids.masked_fill(~chosen, -100)
    masked = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8, device=device), generator=generator).bool() & chosen
    masked[to_mask] = mask_token_id
    to_random = (
        torch.bernoulli(torch.full(input_ids.shape, 0.5, device=device), generator=generator).bool()
        & chosen
        & ~to_mask
    )
    random_tokens = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator)
    masked[to_random] = random_tokens[to_random]
    return masked, labels


@full_precision
def masked_lm_distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(logits, labels) + alpha * H(softmax(teacher_logits), softmax(logits))`` over the masked
    positions (labels != -100). The teacher distribution is a softmax over the *vocabulary* dimension."""
    dtype = _loss_dtype(logits)
    selected = labels != -100
    if not selected.any():
        return logits.sum() * 0.0
    student = logits[selected].to(dtype)
    log_probs = F.log_softmax(student, dim=-1)
    hard = F.nll_loss(log_probs, labels[selected])
    if teacher_logits is None or alpha == 0:
        return hard
    with torch.no_grad():
        soft = F.softmax(teacher_logits[selected].to(dtype), dim=-1)
    distill = -(log_probs * soft).sum(dim=-1).mean()
    return (1.0 - alpha) * hard + alpha * distill


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0 in rank order (identity when not distributed). The
    result carries no gradient: use it for queue updates and negative mining."""
    if not _distributed():
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return torch.cat(gathered, dim=0)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0 in rank order, keeping the autograd graph: the
    gradient of each rank's slice flows back to the rank that produced it (summed over ranks), so that a loss
    computed on local rows against all gathered columns gives the full-batch gradient."""
    if not _distributed():
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0)


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if _distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gathered_keys(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Keys from every process (with gradient) and the offset of this process's rows among them."""
    rank, _ = rank_and_world_size()
    return all_gather_with_grad(local), rank * local.shape[0]


def info_nce(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    temperature: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
    return_directions: bool = False,
):
    """Symmetric image-text InfoNCE (the CLIP loss): ``(L_i2t + L_t2i) / 2``.

    Args:
        image_embeds, text_embeds: (B, D) normalised features of matching pairs (row i <-> row i).
        temperature: scalar.
        image_ids: optional (B,) ids; pairs with equal ids are all positives of each other (soft targets spread
            uniformly over them), e.g. several captions of one image or class-level positives.
        return_directions: also return ``(L_i2t, L_t2i)``.

    When `torch.distributed` is initialised, both embeddings are gathered from all processes *with gradient*
    and each process computes the loss of its own rows against all columns (open_clip's "local loss"). The
    mean of the per-process losses is the single-process loss on the concatenated batch, and since the gather's
    backward sums the gradients of every process, DDP's gradient averaging yields exactly the full-batch gradient.
    All processes must use the same batch size.
    """
    all_images, offset = gathered_keys(image_embeds)
    all_texts, _ = gathered_keys(text_embeds)
    all_ids = None if image_ids is None else all_gather_no_grad(image_ids)
    targets = positive_targets(image_ids, all_ids, image_embeds.shape[0], all_texts.shape[0],
                               device=image_embeds.device, offset=offset)
    loss_i2t = contrastive_cross_entropy(image_embeds, all_texts, temperature, targets)
    loss_t2i = contrastive_cross_entropy(text_embeds, all_images, temperature, targets)
    loss = (loss_i2t + loss_t2i) / 2
    return (loss, loss_i2t, loss_t2i) if return_directions else loss


def intra_modal_info_nce(queries: torch.Tensor, other_view: torch.Tensor, temperature: torch.Tensor | float):
    """One-direction InfoNCE between two views of the same inputs (IMC / SimCLR-style): query i's positive is
    view i, the other views of every process (gathered with gradient) are negatives."""
    keys, offset = gathered_keys(other_view)
    targets = positive_targets(None, None, queries.shape[0], keys.shape[0], device=queries.device, offset=offset)
    return contrastive_cross_entropy(queries, keys, temperature, targets)


class FeatureQueue(torch.nn.Module):
    """A ring buffer of past (teacher) features and their ids: the memory bank of MoCo / ALBEF / TCL / CODIS.

    `keys(batch_features)` gives ``[batch_features; queue]`` (the in-batch keys first, so key i is query i's
    positive), `ids(batch_ids)` the matching ids, and `enqueue(features, ids)` gathers the features of all
    processes (in rank order) and writes them over the oldest entries, wrapping around, so that every process
    holds the same queue. Buffers are persistent: they are saved with the model (exact resume).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"FeatureQueue needs a positive size and dim, got size={size}, dim={dim}")
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.features.copy_(F.normalize(torch.randn_like(self.features), dim=1))
            self.ids.fill_(-1)
            self.ptr.zero_()

    def keys(self, batch_features: torch.Tensor) -> torch.Tensor:
        return torch.cat([batch_features, self.features.clone().detach().to(batch_features.dtype)], dim=0)

    def key_ids(self, batch_ids: torch.Tensor | None) -> torch.Tensor | None:
        return None if batch_ids is None else torch.cat([batch_ids, self.ids.clone()])

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        features = all_gather_no_grad(features)
        if ids is None:
            ids = torch.full((features.shape[0],), -1, dtype=torch.long, device=features.device)
        else:
            ids = all_gather_no_grad(ids)
        count = min(features.shape[0], self.size)
        start = int(self.ptr.item())
        index = (start + torch.arange(count, device=self.features.device)) % self.size
        self.features[index] = features[-count:].to(self.features.dtype)
        self.ids[index] = ids[-count:].to(self.ids.dtype)
        self.ptr.fill_((start + count) % self.size)
