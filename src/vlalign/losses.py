"""Contrastive and alignment losses for vision-language models.

Each function here is small: it takes embeddings / logits and returns a scalar loss (or the targets a loss needs),
works on any model's outputs, and computes in float32 (or float64 when given float64) whatever the input precision,
so that bf16 autocast never reaches a softmax. Features are expected L2-normalised where a function says so. Two
things are not pure functions, and say so where they are defined: ``RunningLogZ`` (held by the decomposable loss
with ``z_estimate="running"``) is a stateful module whose buffers change in place (as is the feature queue, in
momentum.py), and the losses that can take their negatives from every process (``info_nce``,
``intra_modal_info_nce``, the sigmoid loss, the decomposable loss, the OT assignment) do so only when told, by
their ``gather`` argument (the models pass `gather_across_processes()`). Names follow the paper terms:

- ``info_nce``: symmetric image-text InfoNCE, exact across processes (gather with gradient + local loss);
- ``sigmoid_contrastive_loss``: SigLIP's pairwise sigmoid loss, across processes by passing the text features
  around the ring of processes one block at a time instead of gathering them;
- ``contrastive_cross_entropy``: one direction of InfoNCE (queries vs keys) with hard or soft targets;
  ``contrastive_cross_entropy_with_ids`` the same with positives given by ids, over blocks of rows when large;
- ``positive_targets`` / ``distillation_targets``: the target distributions of TCL/ALBEF's momentum distillation;
- ``local_mutual_information``: TCL's global-to-local InfoNCE (LMI) with a padding mask;
- ``sample_hard_negatives``: ALBEF/TCL's ITM negative mining;
- ``masked_lm_distillation_loss``: MLM cross-entropy blended with soft targets from a teacher;
- ``all_gather_with_grad`` / ``all_gather_no_grad``: feature gathering across processes;
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

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


# Above this many logits (4 MiB in float32) an InfoNCE with positives given by ids is computed over blocks of query
# rows: the whole N x M matrix (and the half-dozen temporaries of its softmax, targets and gradient) would otherwise
# be held at once -- B^2 at the batch sizes gradient caching reaches, where one chunk's activations are far smaller.
_LOGITS_PER_BLOCK = 1 << 20


def _row_blocks(count: int, rows_per_block: int) -> list[slice]:
    return [slice(start, min(start + rows_per_block, count)) for start in range(0, count, rows_per_block)]


def _block_positive_targets(query_ids, key_ids, rows: slice, keys: torch.Tensor, offset: int, dtype) -> torch.Tensor:
    """`positive_targets` of the query rows `rows` only (row i's own positive is key ``offset + i``)."""
    ids = None if query_ids is None else query_ids[rows]
    count, num_keys = rows.stop - rows.start, keys.shape[0]
    return positive_targets(ids, key_ids, count, num_keys, device=keys.device, offset=offset + rows.start, dtype=dtype)


class _BlockedContrastiveCrossEntropy(torch.autograd.Function):
    """`contrastive_cross_entropy` with id-defined targets, one block of query rows at a time in forward and again in
    backward: memory O(block x M) instead of O(N x M), the same value and gradients up to float rounding.

    With s_ij = q_i . k_j / t and targets t_ij (rows summing to 1), L = (1/N) sum_i (logsumexp_j s_ij - sum_j t_ij
    s_ij), so dL/ds_ij = (softmax_j(s_i)_j - t_ij) / N; forward keeps only each row's logsumexp."""

    @staticmethod
    def forward(ctx, queries, keys, temperature, query_ids, key_ids, offset, rows_per_block):
        total = queries.new_zeros(())
        log_normalisers = []
        for rows in _row_blocks(queries.shape[0], rows_per_block):
            logits = (queries[rows] @ keys.t()) / temperature
            targets = _block_positive_targets(query_ids, key_ids, rows, keys, offset, logits.dtype)
            lse = torch.logsumexp(logits, dim=1)
            total = total + (lse - (targets * logits).sum(dim=1)).sum()
            log_normalisers.append(lse)
        ctx.save_for_backward(queries, keys, temperature, torch.cat(log_normalisers))
        ctx.ids, ctx.offset, ctx.rows_per_block = (query_ids, key_ids), offset, rows_per_block
        return total / queries.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        queries, keys, temperature, log_normalisers = ctx.saved_tensors
        (query_ids, key_ids), count = ctx.ids, queries.shape[0]
        grad_queries, grad_keys = torch.zeros_like(queries), torch.zeros_like(keys)
        grad_inverse_temperature = queries.new_zeros(())
        for rows in _row_blocks(count, ctx.rows_per_block):
            similarities = queries[rows] @ keys.t()
            logits = similarities / temperature
            targets = _block_positive_targets(query_ids, key_ids, rows, keys, ctx.offset, logits.dtype)
            grad_logits = (torch.exp(logits - log_normalisers[rows, None]) - targets) * (grad_output / count)
            grad_inverse_temperature = grad_inverse_temperature + (grad_logits * similarities).sum()
            grad_logits = grad_logits / temperature
            grad_queries[rows] = grad_logits @ keys
            grad_keys += grad_logits.t() @ queries[rows]
        # s = (q . k) * (1 / t): dL/dt = -dL/d(1/t) / t^2
        grad_temperature = -grad_inverse_temperature / temperature**2 if ctx.needs_input_grad[2] else None
        return grad_queries, grad_keys, grad_temperature, None, None, None, None


@full_precision
def contrastive_cross_entropy_with_ids(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: torch.Tensor | float,
    query_ids: torch.Tensor | None = None,
    key_ids: torch.Tensor | None = None,
    offset: int = 0,
    rows_per_block: int | None = None,
) -> torch.Tensor:
    """`contrastive_cross_entropy` against `positive_targets(query_ids, key_ids, ..., offset)` (query i's positive
    is key ``offset + i``, plus, with ids, every key of the same id), without building the N x M targets.

    Up to `_LOGITS_PER_BLOCK` logits it is exactly `contrastive_cross_entropy` with those dense targets; above, it
    runs over blocks of ``rows_per_block`` query rows (default: as many as fit in `_LOGITS_PER_BLOCK`), so memory
    stays linear in N at any batch size."""
    dtype = _loss_dtype(queries, keys)
    num_queries, num_keys = queries.shape[0], keys.shape[0]
    if rows_per_block is None:
        rows_per_block = max(1, _LOGITS_PER_BLOCK // max(num_keys, 1))
    if rows_per_block >= num_queries:
        targets = positive_targets(
            query_ids, key_ids, num_queries, num_keys, device=queries.device, offset=offset, dtype=dtype
        )
        return contrastive_cross_entropy(queries, keys, temperature, targets)
    temperature = _as_temperature(temperature, dtype, queries.device)
    return _BlockedContrastiveCrossEntropy.apply(
        queries.to(dtype), keys.to(dtype), temperature, query_ids, key_ids, offset, rows_per_block
    )


@full_precision
def similarity_logits(queries: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """``queries @ keys.T / temperature`` in float32 (or float64), e.g. teacher logits for distillation targets."""
    dtype = _loss_dtype(queries, keys)
    return (queries.to(dtype) @ keys.to(dtype).t()) / _as_temperature(temperature, dtype, queries.device)


def positive_targets(
    query_ids: torch.Tensor | None,
    key_ids: torch.Tensor | None,
    num_queries: int,
    num_keys: int,
    device: torch.device | None = None,
    offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Target distribution spreading mass uniformly over the positives of each query.

    With ids, key j is a positive of query i iff ``query_ids[i] == key_ids[j]`` (several captions of one image, or
    class-level positives). Without ids, query i's only positive is key ``offset + i`` (``offset`` is where this
    process's rows start among keys gathered from all processes). That key is always a positive, whatever the ids
    say, so no row is ever empty.
    """
    eye = torch.zeros(num_queries, num_keys, device=device, dtype=dtype)
    rows = torch.arange(num_queries, device=device)
    eye[rows, rows + offset] = 1.0
    if query_ids is None or key_ids is None:
        return eye
    positives = (query_ids.view(-1, 1) == key_ids.view(1, -1)).to(dtype)
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
    counts = valid.sum(dim=1)
    has_locals = counts > 0
    rows_per_block = max(1, _LOGITS_PER_BLOCK // max(batch * num_locals, 1))
    if rows_per_block >= batch:
        per_sample = _lmi_per_anchor(g, loc, valid, counts, t, 0)
        return per_sample[has_locals].mean() if has_locals.any() else per_sample.sum() * 0.0
    # B x B x P logits over blocks of anchors, each block recomputed in backward: memory linear in B
    total = g.new_zeros(())
    for rows in _row_blocks(batch, rows_per_block):
        # no random draws inside: no RNG state to keep for the recomputation
        per_sample = torch.utils.checkpoint.checkpoint(
            _lmi_per_anchor, g[rows], loc, valid, counts, t, rows.start, use_reentrant=False, preserve_rng_state=False
        )
        total = total + per_sample[has_locals[rows]].sum()
    return total / has_locals.sum() if has_locals.any() else total * 0.0


def _lmi_per_anchor(g, loc, valid: torch.Tensor, counts: torch.Tensor, t: torch.Tensor, start: int) -> torch.Tensor:
    """`local_mutual_information` of the anchors ``start, start + 1, ...`` (the rows of `g`), one value each
    (`counts`: every sample's number of valid locals)."""
    rows, (batch, num_locals) = g.shape[0], valid.shape
    # logits[i, k, j] = g_i . l_kj / t
    logits = torch.einsum("id,kjd->ikj", g, loc) / t
    row = torch.arange(rows, device=g.device)
    own = row + start
    positive = logits[row, own]  # (rows, P)
    # negatives of anchor i: every valid local of every other sample
    negative_mask = valid.unsqueeze(0).expand(rows, batch, num_locals).clone()
    negative_mask[row, own] = False
    negatives = logits.masked_fill(~negative_mask, _MASKED_LOGIT).flatten(1)
    negative_lse = torch.logsumexp(negatives, dim=1, keepdim=True)  # (rows, 1)
    per_local = torch.logaddexp(positive, negative_lse) - positive  # (rows, P)
    per_local = per_local * valid[own]
    return per_local.sum(dim=1) / counts[own].clamp(min=1)


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
        # non-finite similarities (a broken input; the trainer skips that step) fall back to uniform sampling
        # instead of crashing multinomial
        weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
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
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of the real tokens (never position 0 or padding); of those, 80% become
    [MASK], 10% a random token, 10% stay. Returns ``(masked_input_ids, labels)`` with labels -100 at unchosen
    positions. As in ALBEF / TCL's reference `mask`, only [CLS] and padding are excluded: [SEP] may be chosen."""
    device = input_ids.device
    probs = torch.full(input_ids.shape, probability, device=device)
    maskable = attention_mask.bool().clone()
    maskable[:, 0] = False  # [CLS]/BOS is the global feature, never masked
    probs = probs * maskable
    chosen = torch.bernoulli(probs, generator=generator).bool()
    labels = input_ids.masked_fill(~chosen, -100)
    masked = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8, device=device), generator=generator).bool() & chosen
    masked[to_mask] = mask_token_id
    to_random = (
        torch.bernoulli(torch.full(input_ids.shape, 0.5, device=device), generator=generator).bool() & chosen & ~to_mask
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


def gather_across_processes() -> bool:
    """Whether torch.distributed runs with more than one process: what a model passes as the `gather` argument
    of the losses here (they never decide it themselves, as open_clip's `ClipLoss` takes its `world_size`)."""
    return _distributed()


def _gather_sizes(count: int, device: torch.device) -> list[int]:
    """Number of rows held by every process (processes may hold different batch sizes, e.g. after the collator
    dropped unreadable images)."""
    size = torch.tensor([count], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _padded_all_gather(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of tensors whose first dimensions differ: pad to the largest, gather, drop the padding."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(gathered, sizes, strict=True)], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: rows of every process in rank order. Backward: the gradient w.r.t. the gathered tensor is summed
    over processes (every process's loss used these rows) and each process keeps the slice of its own rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.start = sum(sizes[: dist.get_rank()])
        ctx.count = tensor.shape[0]
        return _padded_all_gather(tensor.detach(), sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.count], None


def _all_gather(tensor: torch.Tensor, with_grad: bool, gather: bool = True) -> tuple[torch.Tensor, int]:
    """(rows of all processes in rank order, offset of this process's rows among them); this process's own rows
    (offset 0) when `gather` is False or there is a single process."""
    if not (gather and _distributed()):
        return (tensor if with_grad else tensor.detach()), 0
    sizes = _gather_sizes(tensor.shape[0], tensor.device)
    offset = sum(sizes[: dist.get_rank()])
    if with_grad and tensor.requires_grad:
        return _AllGatherWithGrad.apply(tensor, sizes), offset
    return _padded_all_gather(tensor.detach(), sizes), offset


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0 in rank order (identity when not distributed). The
    result carries no gradient: use it for queue updates and negative mining. Processes may hold different
    numbers of rows."""
    return _all_gather(tensor, with_grad=False)[0]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all processes along dim 0 in rank order, keeping the autograd graph: the
    gradient of each rank's slice flows back to the rank that produced it (summed over ranks), so that a loss
    computed on local rows against all gathered columns gives the full-batch gradient. Processes may hold
    different numbers of rows."""
    return _all_gather(tensor, with_grad=True)[0]


def gathered_keys(local: torch.Tensor, gather: bool) -> tuple[torch.Tensor, int]:
    """Keys from every process (with gradient) and the offset of this process's rows among them (the local keys
    and 0 when `gather` is False)."""
    return _all_gather(local, with_grad=True, gather=gather)


def _gathered_ids(ids: torch.Tensor | None, gather: bool) -> torch.Tensor | None:
    return None if ids is None else _all_gather(ids, with_grad=False, gather=gather)[0]


def info_nce(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    temperature: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
    return_directions: bool = False,
    gather: bool = False,
):
    """Symmetric image-text InfoNCE (the CLIP loss): ``(L_i2t + L_t2i) / 2``.

    Args:
        image_embeds, text_embeds: (B, D) normalised features of matching pairs (row i <-> row i).
        temperature: scalar.
        image_ids: optional (B,) ids; pairs with equal ids are all positives of each other (soft targets spread
            uniformly over them), e.g. several captions of one image or class-level positives.
        return_directions: also return ``(L_i2t, L_t2i)``.
        gather: take the negatives of every process (`gather_across_processes()` tells whether there are others).

    With ``gather=True`` under torch.distributed, both embeddings are gathered from all processes *with gradient*
    and each process computes the loss of its own rows against all columns (open_clip's "local loss"). The
    mean of the per-process losses is the single-process loss on the concatenated batch, and since the gather's
    backward sums the gradients of every process, DDP's gradient averaging yields exactly the full-batch gradient.
    All processes must use the same batch size.
    """
    all_images, offset = gathered_keys(image_embeds, gather)
    all_texts, _ = gathered_keys(text_embeds, gather)
    all_ids = _gathered_ids(image_ids, gather)
    loss_i2t = contrastive_cross_entropy_with_ids(image_embeds, all_texts, temperature, image_ids, all_ids, offset)
    loss_t2i = contrastive_cross_entropy_with_ids(text_embeds, all_images, temperature, image_ids, all_ids, offset)
    loss = (loss_i2t + loss_t2i) / 2
    return (loss, loss_i2t, loss_t2i) if return_directions else loss


def intra_modal_info_nce(
    queries: torch.Tensor,
    other_view: torch.Tensor,
    temperature: torch.Tensor | float,
    ids: torch.Tensor | None = None,
    gather: bool = False,
):
    """One-direction InfoNCE between two views of the same inputs (IMC / SimCLR-style): query i's positive is
    view i, the other views (with ``gather=True``, those of every process, gathered with gradient) are negatives --
    except, with ``ids``, the views of items with the query's id, which are positives too (targets spread
    uniformly over them)."""
    keys, offset = gathered_keys(other_view, gather)
    all_ids = _gathered_ids(ids, gather)
    return contrastive_cross_entropy_with_ids(queries, keys, temperature, ids, all_ids, offset)


# ---------------------------------------------------------------------------------------------------------------------
# Sigmoid contrastive loss (SigLIP, Zhai et al. 2023): every image-text pair is its own binary classification,
# ``-log sigmoid(z_ij * (s_ij / t + b))`` with z_ij = +1 for positives and -1 otherwise, so no softmax couples a row
# to the rest of the batch. Across processes, the text features travel around the ring of processes one block at a
# time (open_clip's `SigLipLoss` exchanges them between neighbours instead of gathering them); here the backward
# passes them around once more and recomputes each block's logits, so that no process ever holds more than one
# other process's block (open_clip's autograd graph keeps every block it received until the backward).
# ---------------------------------------------------------------------------------------------------------------------

_FEATURES_TAG, _IDS_TAG = 0, 1  # two messages to the same peer in one step: tags keep them apart


def _post_and_wait(sends: list[tuple[torch.Tensor, int, int]], receives: list[tuple[torch.Tensor, int, int]]) -> None:
    """Post every send (tensor, peer, tag) and receive (buffer, peer, tag) as point-to-point ops at once, then wait
    for all: posting them together is what keeps a ring of processes that all send first from deadlocking."""
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), peer, tag=tag) for tensor, peer, tag in sends]
    ops += [dist.P2POp(dist.irecv, buffer, peer, tag=tag) for buffer, peer, tag in receives]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


def _ring_step(block: torch.Tensor, ids: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Send `block` (and `ids`) to the next process of the ring and receive the previous one's, of `rows` rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    following, preceding = (rank + 1) % world, (rank - 1) % world
    received = block.new_empty((rows, *block.shape[1:]))
    sends, receives = [(block, following, _FEATURES_TAG)], [(received, preceding, _FEATURES_TAG)]
    received_ids = None
    if ids is not None:
        received_ids = ids.new_empty((rows,))
        sends.append((ids, following, _IDS_TAG))
        receives.append((received_ids, preceding, _IDS_TAG))
    _post_and_wait(sends, receives)
    return received, received_ids


def _sigmoid_pair_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    temperature: torch.Tensor | float,
    logit_bias: torch.Tensor,
    positives: torch.Tensor,
) -> torch.Tensor:
    """``sum_ij -log sigmoid(z_ij * (images_i . texts_j / t + b))``, z_ij = +1 where `positives` (bool) else -1."""
    logits = similarity_logits(images, texts, temperature) + logit_bias
    signs = positives.to(logits.dtype) * 2.0 - 1.0
    return -F.logsigmoid(signs * logits).sum()


def _sigmoid_positives(
    image_ids: torch.Tensor | None, text_ids: torch.Tensor | None, rows: int, cols: int, own: bool, device
) -> torch.Tensor:
    """(rows, cols) bool: equal ids, and with `own` (this process's texts) the pairs (i, i)."""
    if image_ids is None or text_ids is None:
        positives = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    else:
        positives = image_ids.view(-1, 1) == text_ids.view(1, -1)
    if own:
        positives = positives | torch.eye(rows, cols, dtype=torch.bool, device=device)
    return positives


class _RingSigmoidLoss(torch.autograd.Function):
    """Sum of the sigmoid pair losses of this process's images with the texts of every process.

    Forward: the text blocks (and ids) go around the ring, each process passing on what it received from the
    previous one, so after k steps the block of rank ``rank - k`` is here; each block adds its pairs and is dropped.
    Backward: the blocks go around again, each carrying the gradient of its texts accumulated by the processes it
    has visited; every process recomputes its pairs with the block, adds its share to the block's gradient and its
    images', temperature's and bias's gradients, and one last step brings every block's gradient home. Memory: one
    other block, its gradient and one (B, B_other) block of logits at a time."""

    @staticmethod
    def forward(ctx, images, texts, temperature, logit_bias, ids, sizes):
        rank, world = dist.get_rank(), dist.get_world_size()
        batch = images.shape[0]
        total = _sigmoid_pair_loss(
            images,
            texts,
            temperature,
            logit_bias,
            _sigmoid_positives(ids, ids, batch, texts.shape[0], True, images.device),
        )
        block, block_ids = texts, ids
        for step in range(1, world):
            block, block_ids = _ring_step(block, block_ids, sizes[(rank - step) % world])
            positives = _sigmoid_positives(ids, block_ids, batch, block.shape[0], False, images.device)
            total = total + _sigmoid_pair_loss(images, block, temperature, logit_bias, positives)
        ctx.save_for_backward(images, texts, temperature, logit_bias, ids)
        ctx.sizes = sizes
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return _RingSigmoidLoss._backward(ctx, grad_total)

    @staticmethod
    def _backward(ctx, grad_total):
        images, texts, temperature, logit_bias, ids = ctx.saved_tensors
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = ctx.sizes
        leaves = [x.detach().requires_grad_() for x in (images, temperature, logit_bias)]
        grads = [torch.zeros_like(x) for x in leaves]
        block, block_ids = texts.detach(), ids
        block_grad = torch.zeros_like(block)
        for step in range(world):
            if step > 0:
                # the block and the gradient it has gathered so far travel as one message
                packed, block_ids = _ring_step(
                    torch.cat([block, block_grad], dim=1), block_ids, sizes[(rank - step) % world]
                )
                block, block_grad = packed.split(texts.shape[1], dim=1)
            block_leaf = block.detach().requires_grad_()
            with torch.enable_grad():
                positives = _sigmoid_positives(
                    ids, block_ids, images.shape[0], block.shape[0], step == 0, images.device
                )
                pairs = _sigmoid_pair_loss(leaves[0], block_leaf, leaves[1], leaves[2], positives)
                *leaf_grads, text_grad = torch.autograd.grad(pairs, [*leaves, block_leaf], grad_total)
            grads = [g + d for g, d in zip(grads, leaf_grads, strict=True)]
            block_grad = block_grad + text_grad
        # the block here is the next process's, with every process's share: send it home, receive ours
        own_text_grad, _ = _ring_step(block_grad, None, texts.shape[0])
        image_grad, temperature_grad, bias_grad = grads
        return image_grad, own_text_grad, temperature_grad, bias_grad, None, None


@full_precision
def sigmoid_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    temperature: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
    gather: bool = False,
) -> torch.Tensor:
    """SigLIP's sigmoid loss (Zhai et al. 2023), normalised as open_clip's `SigLipLoss`:
    ``1/B sum_i sum_j -log sigmoid(z_ij * (s_ij / t + b))`` over this process's B images i and every text j, with
    ``s_ij = image_i . text_j`` and ``z_ij = +1`` for a positive pair, -1 otherwise. SigLIP's logit scale is
    ``1 / temperature``; its initialisation is ``temperature = 0.1`` (scale 10) and ``logit_bias = -10``, which
    starts every pair near the negatives' prior.

    Args:
        image_embeds, text_embeds: (B, D) normalised features of matching pairs (row i <-> row i).
        temperature: scalar (float or 0-dim tensor, may require grad).
        logit_bias: the learnable bias b (float, or a tensor of one element, may require grad).
        image_ids: optional (B,) ids; pairs with equal ids are positives too (as in `info_nce`), across processes
            as well. Pair (i, i) is always a positive.
        gather: take the texts of every process as well (`gather_across_processes()` tells whether there are
            others).

    With ``gather=True`` under torch.distributed, the texts (and ids) of the other processes come one block at a
    time around the ring of processes (`_RingSigmoidLoss`, point-to-point sends to the next process), never as one
    gathered tensor, and each block adds its pairs with this process's images; in the backward the blocks go
    around again and each block's gradient returns to the process that owns the texts. Memory stays that of two
    blocks whatever the number of processes. The full-batch equivalent: with W processes holding B rows each, the
    mean over processes of this loss is the single-process loss on the concatenated batch of W * B pairs (every
    pair counted once, divided by W * B). A process's feature gradient is the sum over processes of their losses'
    gradients, i.e. W times the full-batch one, and DDP's averaging over processes gives exactly the full-batch
    gradient, also for the replicated bias and temperature. Processes may hold different numbers of rows (each
    loss is then divided by its own B).
    """
    dtype = _loss_dtype(image_embeds, text_embeds)
    device = image_embeds.device
    images, texts = image_embeds.to(dtype), text_embeds.to(dtype)
    bias = (
        logit_bias.to(device=device, dtype=dtype).reshape(())
        if isinstance(logit_bias, torch.Tensor)
        else torch.tensor(logit_bias, dtype=dtype, device=device)
    )
    batch = images.shape[0]
    ids = None if image_ids is None else image_ids.to(device=device).flatten()
    if gather and _distributed():
        sizes = _gather_sizes(batch, device)
        return (
            _RingSigmoidLoss.apply(images, texts, _as_temperature(temperature, dtype, device), bias, ids, sizes) / batch
        )
    positives = _sigmoid_positives(ids, ids, batch, texts.shape[0], True, device)
    return _sigmoid_pair_loss(images, texts, temperature, bias, positives) / batch


# ---------------------------------------------------------------------------------------------------------------------
# Decomposable contrastive loss by Bayesian data augmentation (Chen et al., NeurIPS 2022)
#
# InfoNCE's log Z_i is not linear in the negatives, so a minibatch estimate of Z_i gives a biased gradient of log Z_i.
# Using 1/Z = integral_0^inf exp(-u Z) du, the loss -s_ii/t + u_i * Z_i (u_i fixed by an E-step, stop-gradient) is
# linear in Z_i: with u_i = 1/Z_i its gradient is exactly InfoNCE's, and Z_i itself may come from more samples (a
# queue, or a running average across steps) than the batch whose gradient is taken.
# ---------------------------------------------------------------------------------------------------------------------

_Z_ESTIMATES = ("batch", "queue", "running")


def _positive_logits(logits: torch.Tensor, offset: int) -> torch.Tensor:
    """``logits[i, offset + i]``: query i's positive among keys gathered from all processes."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, rows + offset]


@full_precision
def decomposable_info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: torch.Tensor | float,
    log_u: torch.Tensor,
    offset: int = 0,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Augmented (decomposable) InfoNCE: ``mean_i [ -s_ii/t + u_i * sum_j exp(s_ij/t) ]``.

    Args:
        queries: (N, D) normalised features.
        keys: (M, D) normalised features (in-batch keys, possibly gathered from all processes); every key enters
            the sum, the positive included.
        temperature: scalar (float or 0-dim tensor, may require grad).
        log_u: (N,) log of the auxiliary variables; treated as a constant (detached here).
        offset: query i's positive is key ``offset + i``.
        targets: optional (N, M) rows summing to 1 (several positives): the positive term becomes
            ``sum_j targets_ij * s_ij / t``, the soft-target InfoNCE's, and the defining property below still holds.

    With ``log_u = -logsumexp_j(s_ij/t)`` from the same logits, the gradient equals InfoNCE's while the value does
    not (it is ``mean_i(-s_ii/t) + 1``).
    """
    logits = similarity_logits(queries, keys, temperature)
    log_u = log_u.detach().to(device=logits.device, dtype=logits.dtype)
    # u * Z as one exp of a sum of logs: Z alone overflows float32 at small temperatures
    partition_term = torch.exp(log_u + torch.logsumexp(logits, dim=1))
    if targets is None:
        positive = _positive_logits(logits, offset)
    else:
        positive = (targets.to(logits.dtype) * logits).sum(dim=1)
    return (partition_term - positive).mean()


@torch.no_grad()
@full_precision
def estimate_log_z(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: torch.Tensor | float,
    queue: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """E-step estimate of log Z_i (no gradient), on the scale of the in-batch sum ``sum_j exp(s_ij/t)``.

    Without ``queue``: ``logsumexp_j(s_ij/t)`` over the M batch keys. With a queue (Q, D) of past key features:
    ``log[ exp(s_ii/t) + (M - 1) * mean_q exp(s_iq/t) ]``, i.e. the M - 1 in-batch negatives replaced by M - 1 times
    the mean over the (many more) queue negatives, a lower-variance estimate of the same quantity.
    """
    logits = similarity_logits(queries, keys, temperature)
    if queue is None:
        return torch.logsumexp(logits, dim=1)
    if queue.dim() != 2 or queue.shape[0] == 0 or queue.shape[1] != queries.shape[1]:
        raise ValueError(f"queue must be a non-empty (Q, {queries.shape[1]}) tensor, got shape {tuple(queue.shape)}")
    positive = _positive_logits(logits, offset)
    num_negatives = keys.shape[0] - 1
    if num_negatives == 0:
        return positive
    queue_logits = similarity_logits(queries, queue, temperature)
    log_mean_queue = torch.logsumexp(queue_logits, dim=1) - math.log(queue.shape[0])
    return torch.logaddexp(positive, log_mean_queue + math.log(num_negatives))


@torch.no_grad()
def sample_log_u(log_z: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """log of the auxiliary u_i ~ Gamma(shape 1, rate Z_i) (``sample=True``: u = E / Z with E ~ Exponential(1)), or
    of its mean 1/Z_i (``sample=False``). No gradient."""
    log_z = log_z.detach()
    if not sample:
        return -log_z
    exponential = torch.empty_like(log_z).exponential_(generator=generator)
    # E == 0 has probability ~0 but would give log u = -inf; the clamp only changes that measure-zero event
    return torch.log(exponential.clamp_min(torch.finfo(log_z.dtype).tiny)) - log_z


class RunningLogZ(torch.nn.Module):
    """Per-sample moving average of Z_i across steps (SogCLR-like), stored as log Z for range. A stateful module:
    every `update` changes its buffers in place.

    ``update(ids, batch_log_z)``: a sample seen for the first time takes its batch value; afterwards
    ``Z <- momentum * Z_old + (1 - momentum) * Z_batch``, computed in log space. Buffers are persistent (exact
    resume). The buffers are not synchronised here: `DecomposableContrastiveLoss(..., gather=True)` gathers ids and
    estimates of all processes before updating, so every process holds the same state.
    """

    def __init__(self, num_samples: int, momentum: float = 0.1):
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("log_z", torch.zeros(num_samples))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))

    @property
    def num_samples(self) -> int:
        return self.log_z.shape[0]

    @torch.no_grad()
    def update(self, sample_ids: torch.Tensor, batch_log_z: torch.Tensor) -> torch.Tensor:
        """Fold ``batch_log_z`` (N,) into the running state of ``sample_ids`` (N,) and return their new log Z in
        the dtype of ``batch_log_z``. With repeated ids in one call, each row's result is computed from the state
        before the call and the last one is stored."""
        ids = sample_ids.to(device=self.log_z.device, dtype=torch.long).flatten()
        if ids.shape[0] != batch_log_z.numel():
            raise ValueError(f"sample_ids has {ids.shape[0]} entries but batch_log_z has {batch_log_z.numel()}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise ValueError(
                f"sample_ids must lie in [0, {self.num_samples}), got range [{int(ids.min())}, {int(ids.max())}]"
            )
        batch = batch_log_z.detach().flatten().to(device=self.log_z.device, dtype=self.log_z.dtype)
        if self.momentum == 0.0:
            blended = batch
        else:
            blended = torch.logaddexp(self.log_z[ids] + math.log(self.momentum), batch + math.log1p(-self.momentum))
        new = torch.where(self.seen[ids], blended, batch)
        # a non-finite estimate (a bad step the trainer skips) is not stored: it would stick to its samples forever
        finite = torch.isfinite(new)
        self.log_z[ids] = torch.where(finite, new, self.log_z[ids])
        self.seen[ids] = self.seen[ids] | finite
        return new.to(device=batch_log_z.device, dtype=batch_log_z.dtype)


class DecomposableContrastiveLoss(torch.nn.Module):
    """Symmetric image-text decomposable contrastive loss (one stochastic-EM step per call).

    E-step (no gradient): estimate log Z_i of each anchor, from the batch (``"batch"``), from the batch positive
    plus a queue of past features (``"queue"``), or as a per-sample running average across steps (``"running"``,
    needs ``num_samples`` and per-call ``sample_ids``); then u_i = 1/Z_i, or u_i ~ Gamma(1, Z_i) with
    ``sample_u=True``. M-step: `decomposable_info_nce` of local queries against the keys of all processes
    (gathered with gradient), so the gradient is the full-batch one as for `info_nce`.

    ``forward`` returns ``(loss_i2t, loss_t2i)``.
    """

    def __init__(
        self,
        z_estimate: str = "batch",
        sample_u: bool = False,
        num_samples: int | None = None,
        running_momentum: float = 0.1,
    ):
        super().__init__()
        if z_estimate not in _Z_ESTIMATES:
            raise ValueError(f"z_estimate must be one of {_Z_ESTIMATES}, got {z_estimate!r}")
        if not isinstance(sample_u, bool):
            raise ValueError(f"sample_u must be a bool, got {sample_u!r}")
        if not 0.0 <= float(running_momentum) < 1.0:
            raise ValueError(f"running_momentum must be in [0, 1), got {running_momentum!r}")
        if z_estimate == "running" and num_samples is None:
            raise ValueError("num_samples is required with z_estimate='running' (size of the per-sample state)")
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0
        ):
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.z_estimate = z_estimate
        self.sample_u = sample_u
        if z_estimate == "running":
            self.running_i2t = RunningLogZ(num_samples, running_momentum)
            self.running_t2i = RunningLogZ(num_samples, running_momentum)
        else:
            self.running_i2t = self.running_t2i = None

    def _log_z(self, queries, keys, temperature, offset, queue, running, sample_ids, gather):
        if self.z_estimate == "queue":
            return estimate_log_z(queries, keys, temperature, queue=queue, offset=offset)
        log_z = estimate_log_z(queries, keys, temperature, offset=offset)
        if self.z_estimate == "running":
            # update with every process's rows so that all processes keep identical state, then keep ours
            all_log_z = running.update(_gathered_ids(sample_ids, gather), _all_gather(log_z, False, gather)[0])
            log_z = all_log_z[offset : offset + queries.shape[0]]
        return log_z

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        temperature: torch.Tensor | float,
        sample_ids: torch.Tensor | None = None,
        image_queue: torch.Tensor | None = None,
        text_queue: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        image_ids: torch.Tensor | None = None,
        gather: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_ids`` (optional, (B,)): pairs with equal ids are all positives of each other, as in
        `info_nce` (soft targets spread over them). ``gather``: the keys (and with ``"running"`` the per-sample
        state) span every process, as in `info_nce`."""
        batch = image_embeds.shape[0]
        if self.z_estimate == "running":
            if sample_ids is None or sample_ids.numel() != batch:
                raise ValueError(f"sample_ids of shape ({batch},) are required with z_estimate='running'")
            sample_ids = sample_ids.to(device=image_embeds.device, dtype=torch.long).flatten()
        if self.z_estimate == "queue" and (image_queue is None or text_queue is None):
            raise ValueError("image_queue and text_queue (Q, D) are required with z_estimate='queue'")
        if isinstance(temperature, torch.Tensor):
            estimate_temperature = temperature.detach()
        else:
            estimate_temperature = temperature
        all_images, offset = gathered_keys(image_embeds, gather)
        all_texts, _ = gathered_keys(text_embeds, gather)
        targets = None
        if image_ids is not None:
            targets = positive_targets(
                image_ids,
                _gathered_ids(image_ids, gather),
                batch,
                all_texts.shape[0],
                device=image_embeds.device,
                offset=offset,
            )
        directions = (
            (image_embeds, all_texts, text_queue, self.running_i2t),
            (text_embeds, all_images, image_queue, self.running_t2i),
        )
        losses = []
        for queries, keys, queue, running in directions:
            log_z = self._log_z(queries, keys, estimate_temperature, offset, queue, running, sample_ids, gather)
            log_u = sample_log_u(log_z, self.sample_u, generator)
            losses.append(decomposable_info_nce(queries, keys, temperature, log_u, offset=offset, targets=targets))
        return losses[0], losses[1]


# ---------------------------------------------------------------------------------------------------------------------
# Latent modality structures (Jiang et al., CVPR 2023): regularisers on L2-normalised (N, D) features. The double
# sums over pairs (j, k) are normalised by 1/N, not 1/N^2, as in the paper's formulas.
# ---------------------------------------------------------------------------------------------------------------------


@full_precision
def orthogonality_loss(
    z_v: torch.Tensor, z_t: torch.Tensor, independent_v: torch.Tensor, independent_t: torch.Tensor
) -> torch.Tensor:
    """``1/N sum_j (<z_Vj, z^i_Vj>^2 + <z_Tj, z^i_Tj>^2)``: independent features orthogonal to the shared ones."""
    dtype = _loss_dtype(z_v, z_t, independent_v, independent_t)
    cos_v = (z_v.to(dtype) * independent_v.to(dtype)).sum(dim=1)
    cos_t = (z_t.to(dtype) * independent_t.to(dtype)).sum(dim=1)
    return (cos_v.square() + cos_t.square()).mean()


def _pairwise_squared_distances(x: torch.Tensor) -> torch.Tensor:
    # the clamp removes rounding below 0 on the diagonal, where the true gradient is 0 anyway (no sqrt: no NaN)
    squared_norms = x.square().sum(dim=1)
    return (squared_norms[:, None] + squared_norms[None, :] - 2.0 * (x @ x.t())).clamp_min(0.0)


@full_precision
def uniformity_loss(independent_v: torch.Tensor, independent_t: torch.Tensor) -> torch.Tensor:
    """``log 1/N sum_j sum_k [G(z^i_Vj, z^i_Vk) + G(z^i_Tj, z^i_Tk)]`` with ``G(u, v) = exp(-2 ||u - v||^2)``,
    as a logsumexp over the 2 N^2 Gaussian-kernel exponents (this process's batch only)."""
    dtype = _loss_dtype(independent_v, independent_t)
    exponents = torch.cat(
        [
            -2.0 * _pairwise_squared_distances(independent_v.to(dtype)).flatten(),
            -2.0 * _pairwise_squared_distances(independent_t.to(dtype)).flatten(),
        ]
    )
    return torch.logsumexp(exponents, dim=0) - math.log(independent_v.shape[0])


def feature_separation_loss(
    z_v: torch.Tensor,
    z_t: torch.Tensor,
    independent_v: torch.Tensor,
    independent_t: torch.Tensor,
    independent_v_aug: torch.Tensor,
    independent_t_aug: torch.Tensor,
    temperature: torch.Tensor | float,
) -> dict[str, torch.Tensor]:
    """Deep feature separation ``L_sep = L_ortho + L^i_con + L^i_uni``.

    ``"independent_contrastive"`` is the mean over the two modalities of the in-modal InfoNCE of the independent
    features, the augmented view's independent feature being the positive (negatives gathered from all processes).
    """
    terms = {
        "orthogonality": orthogonality_loss(z_v, z_t, independent_v, independent_t),
        "independent_contrastive": (
            intra_modal_info_nce(independent_v, independent_v_aug, temperature)
            + intra_modal_info_nce(independent_t, independent_t_aug, temperature)
        )
        / 2,
        "uniformity": uniformity_loss(independent_v, independent_t),
    }
    terms["total"] = terms["orthogonality"] + terms["independent_contrastive"] + terms["uniformity"]
    return terms


@full_precision
def brownian_bridge_loss(z_v: torch.Tensor, z_t: torch.Tensor, z_v_aug: torch.Tensor, t: float = 0.25) -> torch.Tensor:
    """``1/N sum_j ||z^a_Vj - mu_j||^2`` with ``mu = normalise(t z_V + (1 - t) z_T)``: the augmented image should lie
    on the path from the text to the image, closer to the text for small t."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t!r}")
    dtype = _loss_dtype(z_v, z_t, z_v_aug)
    bridge = F.normalize(t * z_v.to(dtype) + (1.0 - t) * z_t.to(dtype), dim=1)
    return (z_v_aug.to(dtype) - bridge).square().sum(dim=1).mean()


@full_precision
def geometric_consistency_loss(
    z_v: torch.Tensor, z_t: torch.Tensor, z_v_aug: torch.Tensor, z_t_aug: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Geometric consistency (a generalised CyCLIP).

    ``"cross"``: ``1/N sum_jk [(<z_Vj,z_Tk> - <z_Vk,z_Tj>)^2 + (<z_Vj,z_Vk> - <z_Tj,z_Tk>)^2]`` (symmetric cross-modal
    similarities, matching in-modal geometry). ``"augmented"``: ``1/N sum_jk [(<z_Vj,z_Vk> - <z^a_Vj,z^a_Vk>)^2 +
    (<z_Tj,z_Tk> - <z^a_Tj,z^a_Tk>)^2] + 1/N sum_j (<z_Vj,z_Tj> - <z^a_Vj,z^a_Tj>)^2`` (augmentation keeps the
    geometry). ``"total"``: their sum.
    """
    dtype = _loss_dtype(z_v, z_t, z_v_aug, z_t_aug)
    v, t, v_aug, t_aug = (x.to(dtype) for x in (z_v, z_t, z_v_aug, z_t_aug))
    num = v.shape[0]
    cross_vt = v @ t.t()
    gram_v, gram_t = v @ v.t(), t @ t.t()
    gram_v_aug, gram_t_aug = v_aug @ v_aug.t(), t_aug @ t_aug.t()
    cross = ((cross_vt - cross_vt.t()).square().sum() + (gram_v - gram_t).square().sum()) / num
    paired = (v * t).sum(dim=1)
    paired_aug = (v_aug * t_aug).sum(dim=1)
    augmented = ((gram_v - gram_v_aug).square().sum() + (gram_t - gram_t_aug).square().sum()) / num
    augmented = augmented + (paired - paired_aug).square().mean()
    return {"cross": cross, "augmented": augmented, "total": cross + augmented}


# ---------------------------------------------------------------------------------------------------------------------
# Optimal transport (CODIS, Duan et al., CVPR 2022): plans between a batch of features and a codebook, computed
# without gradient. Marginals default to uniform: 1/N per row (sample), 1/K per column (code).
# ---------------------------------------------------------------------------------------------------------------------


def _uniform_marginals(cost: torch.Tensor, row_marginal, column_marginal):
    rows, cols = cost.shape
    a = torch.full((rows,), 1.0 / rows, dtype=cost.dtype, device=cost.device) if row_marginal is None else row_marginal
    b = (
        torch.full((cols,), 1.0 / cols, dtype=cost.dtype, device=cost.device)
        if column_marginal is None
        else column_marginal
    )
    return a.to(cost.dtype), b.to(cost.dtype)


def _scaling_step(log_kernel, log_a, log_b, log_v):
    """One Sinkhorn scaling of rows then columns, in the log domain: returns the new (log_u, log_v)."""
    log_u = log_a - torch.logsumexp(log_kernel + log_v[None, :], dim=1)
    log_v = log_b - torch.logsumexp(log_kernel + log_u[:, None], dim=0)
    return log_u, log_v


@torch.no_grad()
@full_precision
def sinkhorn(
    cost: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 100,
    row_marginal: torch.Tensor | None = None,
    column_marginal: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropic OT plan (Sinkhorn-Knopp) for an (N, K) cost: ``argmin <T, C> - epsilon * H(T)`` subject to the
    marginals, by alternating scalings in the log domain (stable for small epsilon). No gradient. The final row
    scaling makes the row marginals exact; the column marginals converge with `iterations`."""
    if epsilon <= 0 or iterations <= 0:
        raise ValueError(f"sinkhorn needs epsilon > 0 and iterations > 0, got {epsilon}, {iterations}")
    dtype = _loss_dtype(cost)
    cost = cost.to(dtype)
    a, b = _uniform_marginals(cost, row_marginal, column_marginal)
    log_kernel = -cost / epsilon
    log_a, log_b = a.log(), b.log()
    log_v = torch.zeros_like(log_b)
    for _ in range(iterations):
        log_u, log_v = _scaling_step(log_kernel, log_a, log_b, log_v)
    log_u = log_a - torch.logsumexp(log_kernel + log_v[None, :], dim=1)
    return torch.exp(log_u[:, None] + log_kernel + log_v[None, :])


@torch.no_grad()
@full_precision
def ipot(
    cost: torch.Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_iterations: int = 1,
    row_marginal: torch.Tensor | None = None,
    column_marginal: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inexact proximal point OT (IPOT, Xie et al. 2019) for an (N, K) cost: each outer step solves
    ``argmin <T, C> + beta * KL(T || T_prev)`` approximately with `inner_iterations` Sinkhorn scalings of the kernel
    ``exp(-C / beta) * T_prev``. Unlike Sinkhorn it converges to the exact (unregularised) OT plan as iterations
    grow, for a fixed beta. No gradient; computed in the log domain."""
    if beta <= 0 or iterations <= 0 or inner_iterations <= 0:
        raise ValueError(
            f"ipot needs beta > 0 and positive iteration counts, got {beta}, {iterations}, {inner_iterations}"
        )
    dtype = _loss_dtype(cost)
    cost = cost.to(dtype)
    a, b = _uniform_marginals(cost, row_marginal, column_marginal)
    log_a, log_b = a.log(), b.log()
    log_plan = log_a[:, None] + log_b[None, :]  # independent coupling as the starting point
    log_v = torch.zeros_like(log_b)
    for _ in range(iterations):
        log_q = -cost / beta + log_plan
        for _ in range(inner_iterations):
            log_u, log_v = _scaling_step(log_q, log_a, log_b, log_v)
        log_plan = log_u[:, None] + log_q + log_v[None, :]
    return torch.exp(log_plan)


def code_similarities(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (N, K) between features (N, D) and codewords (K, D); both are L2-normalised here."""
    return F.normalize(features, dim=-1) @ F.normalize(codebook, dim=-1).t()


@torch.no_grad()
@full_precision
def code_assignment_targets(
    teacher_features: torch.Tensor,
    codebook: torch.Tensor,
    solver: str = "ipot",
    *,
    gather: bool = False,
    **solver_kwargs,
) -> torch.Tensor:
    """CODIS's cluster assignments of a batch: the OT plan T between the teacher features and the codebook for the
    cost ``1 - cosine`` under uniform marginals (1/N per sample, 1/K per code), scaled by N so that each sample's
    row is a distribution over the K codes. No gradient.

    With ``gather=True`` under torch.distributed the plan is solved over the features of all processes (the
    equipartition constraint is then global, as for one large batch) and this process's rows are returned.

    Args:
        teacher_features: (N, D) features (normalised here).
        codebook: (K, D) codewords (normalised here).
        solver: "ipot" (keyword arguments of `ipot`: beta, iterations, inner_iterations) or "sinkhorn" (epsilon,
            iterations).
    Returns:
        (N, K) targets, rows summing to 1.
    """
    solvers = {"ipot": ipot, "sinkhorn": sinkhorn}
    if solver not in solvers:
        raise ValueError(f"unknown OT solver {solver!r}: use 'ipot' or 'sinkhorn'")
    dtype = _loss_dtype(teacher_features, codebook)
    gathered, offset = _all_gather(teacher_features.detach().to(dtype), with_grad=False, gather=gather)
    cost = 1.0 - code_similarities(gathered, codebook.detach().to(dtype))
    plan = solvers[solver](cost, **solver_kwargs)[offset : offset + teacher_features.shape[0]]
    # each row of the plan holds 1/N up to the solver's convergence (IPOT ends on the column scaling): normalise
    # so that every sample's target is exactly a distribution (the columns stay within that tolerance of N/K)
    return plan / plan.sum(dim=1, keepdim=True)


@full_precision
def code_prediction_loss(
    student_features: torch.Tensor,
    codebook: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Cross-entropy of the student's code distribution ``softmax(cos(student, codebook) / temperature)`` against
    target assignments (rows summing to 1, e.g. `code_assignment_targets`), averaged over the batch."""
    dtype = _loss_dtype(student_features, codebook)
    logits = code_similarities(student_features.to(dtype), codebook.to(dtype)) / temperature
    return -(F.log_softmax(logits, dim=1) * targets.to(dtype)).sum(dim=1).mean()


@full_precision
def optimal_transport_loss(
    teacher_features: torch.Tensor,
    codebook: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """The OT cost ``<1 - cos(teacher, codebook), T>`` of a plan T given as per-sample targets ``N * T`` (rows
    summing to 1): the mean over samples of ``sum_k (1 - cos_ik) * targets_ik``. The plan is a constant, so the
    gradient pulls each codeword toward the features assigned to it (pass teacher features without gradient)."""
    dtype = _loss_dtype(teacher_features, codebook)
    cost = 1.0 - code_similarities(teacher_features.to(dtype), codebook.to(dtype))
    return (cost * targets.to(dtype)).sum(dim=1).mean()
