"""Gradient caching (GradCache, Gao et al. 2021) for the ALBEF-style models: a batch of any size in the memory of one
chunk, with the parameter gradients of the full-batch loss.

`gradient_cached_backward(model, ...)` runs one training step's forward and backward in pieces. It works over the
hooks that `ALBEFModel` splits its training forward into (the same ones the plain forward runs, so both compute
the same losses):

  model._prepare_training(...)   -> batch dict, clamped temperature
  model._needs()["fusion"]       -> whether ITM / MLM run (they need each chunk's token states)
  model._student_pass(piece, keep_tokens)                   features with gradient, per chunk
  model._teacher_pass(batch, positive_ids, temp, alpha, chunk_size)   EMA update, keys, targets (no gradient)
  model._alignment_losses(student, teacher, batch, ...)     every loss that sees the student only via its features
  model._fusion_losses(student, piece, ids, temp, alpha, teacher_rows)   ITM / MLM of one chunk
  model._loss_total(losses)      the model's total of any subset of its components (ITM and MLM as added terms)
  model._update_queues(student, teacher, positive_ids)
  model.output_class(...)

`RNGState` records the random state before each chunk's first pass, so its second pass draws the same dropout masks.
"""

from __future__ import annotations

import torch


class RNGState:
    """CPU (and current CUDA device) RNG state, so a chunk can be re-run with the same dropout masks."""

    def __init__(self, cpu, cuda):
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, device: torch.device) -> RNGState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def gradient_cached_backward(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.FloatTensor,
    pixel_values_view2: torch.FloatTensor | None = None,
    positive_ids: torch.LongTensor | None = None,
    sample_ids: torch.LongTensor | None = None,
    alpha: float | None = None,
    chunk_size: int | None = None,
    loss_scale: float = 1.0,
    backward_fn=None,
):
    """One training step's forward AND backward of `model` (an `ALBEFModel`) with gradient caching.

    1. The batch is embedded chunk by chunk without gradient (RNG state recorded per chunk; the last chunk
       keeps its graph for step 3);
    2. the alignment losses (CMA / IMC / LMI / decomposable / regularisers) are computed on the cached
       features and back-propagated to them (and to the temperature); the in-batch InfoNCE and LMI terms run
       over blocks of rows once their logits pass `losses._LOGITS_PER_BLOCK`, so that this step's memory grows
       linearly in the batch, not as B^2 (momentum distillation's soft targets, B x (B + queue), stay whole);
    3. every chunk is embedded again with gradient under its recorded RNG state (same dropout), and the
       cached feature gradients are back-propagated through it.
    Peak activation memory is that of one chunk, and the parameter gradients equal those of the
    full-batch loss. ITM and MLM need the token states of a pair's image and text together: they are
    computed per chunk in step 3 (ITM hard negatives are mined within the chunk) and averaged over chunks,
    i.e. their gradients are those of chunk-sized batches.

    ``loss_scale`` multiplies the loss before backward (e.g. 1 / gradient accumulation steps);
    ``backward_fn(tensor)`` replaces ``tensor.backward()`` (e.g. ``accelerator.backward``). Returns the
    detached loss and components.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"gradient_cached_backward: chunk_size must be a positive integer, got {chunk_size!r}")
    alpha = model.config.alpha if alpha is None else float(alpha)
    backward_fn = backward_fn or (lambda tensor: tensor.backward())
    batch, temp = model._prepare_training(input_ids, attention_mask, pixel_values, pixel_values_view2)
    size = input_ids.shape[0]
    chunks = [(start, min(start + chunk_size, size)) for start in range(0, size, chunk_size)]
    keep_tokens = model._needs()["fusion"]

    def piece(start, stop):
        return {k: v[start:stop] for k, v in batch.items()}

    # 1. cached student features, no graph kept -- except for the last chunk, whose graph is kept and reused
    #    in step 3 instead of being recomputed (saves one chunk's forward per step)
    rng_states, cached = [], []
    for index, (start, stop) in enumerate(chunks):
        rng_states.append(RNGState.capture(input_ids.device))
        if index < len(chunks) - 1:
            with torch.no_grad():
                cached.append(model._student_pass(piece(start, stop), keep_tokens=False))
        else:
            last_student = model._student_pass(piece(start, stop), keep_tokens=keep_tokens)
            cached.append({k: v for k, v in last_student.items() if k not in ("image_tokens", "text_tokens")})
    leaves = {k: torch.cat([c[k].detach() for c in cached]).requires_grad_(True) for k in cached[0]}
    teacher = model._teacher_pass(batch, positive_ids, temp, alpha, chunk_size=chunk_size)

    # 2. alignment losses on the cached features -> their gradients (and the temperature's)
    losses = model._alignment_losses(leaves, teacher, batch, positive_ids, sample_ids, temp)
    total = model._loss_total(losses)
    if total is not None:
        backward_fn(total * loss_scale)
    detached = {k: v.detach() for k, v in losses.items()}
    total_value = total.detach() if total is not None else torch.zeros((), device=input_ids.device)

    # 3. re-embed each chunk with gradient and push the cached gradients through it
    fusion_sums: dict[str, torch.Tensor] = {}
    end_state = RNGState.capture(input_ids.device)
    # the last chunk first: its graph from step 1 is then freed before any other chunk builds one
    order = [len(chunks) - 1, *range(len(chunks) - 1)]
    for index in order:
        (start, stop), state = chunks[index], rng_states[index]
        part = piece(start, stop)
        if index < len(chunks) - 1:
            state.restore()
            student = model._student_pass(part, keep_tokens=keep_tokens)
        else:
            student = last_student
        surrogate = sum((student[k] * leaves[k].grad[start:stop]).sum() for k in leaves if leaves[k].grad is not None)
        if keep_tokens:
            ids = None if positive_ids is None else positive_ids[start:stop]
            rows = {
                k: teacher[k][start:stop] for k in ("image_tokens_m", "image_feat_m", "text_feat_m") if k in teacher
            }
            fusion = model._fusion_losses(student, part, ids, temp, alpha, rows)
            weight = (stop - start) / size
            fusion_total = model._loss_total(fusion)
            surrogate = surrogate + fusion_total * weight * loss_scale
            for name, value in fusion.items():
                fusion_sums[name] = fusion_sums.get(name, 0.0) + value.detach() * weight
        if torch.is_tensor(surrogate) and surrogate.requires_grad:
            backward_fn(surrogate)
    end_state.restore()
    detached.update(fusion_sums)
    if fusion_sums:
        total_value = total_value + model._loss_total(fusion_sums)
    model._update_queues(leaves, teacher, positive_ids)
    return model.output_class(
        loss=total_value,
        **{f"loss_{n}": v for n, v in detached.items()},
        image_embeds=leaves["image_feat"].detach(),
        text_embeds=leaves["text_feat"].detach(),
        temperature=temp.detach(),
    )
