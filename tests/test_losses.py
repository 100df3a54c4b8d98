"""Each loss term against a direct float64 reference computation."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlalign.losses import (
    contrastive_cross_entropy,
    distillation_targets,
    local_mutual_information,
    mask_tokens_for_mlm,
    masked_lm_distillation_loss,
    positive_targets,
    sample_hard_negatives,
)
from vlalign.momentum import FeatureQueue


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_contrastive_cross_entropy_hard_targets_matches_reference():
    q, k = _unit(5, 8, seed=1), _unit(9, 8, seed=2)
    t = 0.07
    expected = 0.0
    for i in range(5):
        logits = [float(q[i] @ k[j]) / t for j in range(9)]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    expected /= 5
    got = contrastive_cross_entropy(q, k, t)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_contrastive_cross_entropy_soft_targets_matches_reference():
    q, k = _unit(4, 6, seed=3), _unit(7, 6, seed=4)
    targets = torch.rand(4, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    targets = targets / targets.sum(1, keepdim=True)
    t = 0.1
    expected = 0.0
    for i in range(4):
        logits = np.array([float(q[i] @ k[j]) / t for j in range(7)])
        log_p = logits - np.log(np.exp(logits).sum())
        expected += -(targets[i].numpy() * log_p).sum()
    assert contrastive_cross_entropy(q, k, t, targets).item() == pytest.approx(expected / 4, rel=1e-10)


def test_contrastive_cross_entropy_computes_in_float32_under_bfloat16():
    q, k = _unit(4, 8).to(torch.bfloat16), _unit(4, 8, seed=9).to(torch.bfloat16)
    out = contrastive_cross_entropy(q, k, torch.tensor(0.07))
    assert out.dtype == torch.float32
    ref = contrastive_cross_entropy(q.double(), k.double(), 0.07)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_positive_targets_spread_over_ids_and_keep_diagonal():
    ids = torch.tensor([3, 1, 3])
    key_ids = torch.tensor([3, 1, 3, 1, 7, 3])
    targets = positive_targets(ids, key_ids, 3, 6)
    expected = torch.tensor([
        [1 / 3, 0, 1 / 3, 0, 0, 1 / 3],
        [0, 1 / 2, 0, 1 / 2, 0, 0],
        [1 / 3, 0, 1 / 3, 0, 0, 1 / 3],
    ])
    assert torch.allclose(targets, expected)
    assert torch.equal(positive_targets(None, None, 2, 4), torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))


def test_distillation_targets_blend():
    teacher = torch.randn(3, 5, dtype=torch.float64)
    hard = positive_targets(None, None, 3, 5).double()
    out = distillation_targets(teacher, hard, 0.4)
    assert torch.allclose(out, 0.4 * torch.softmax(teacher, 1) + 0.6 * hard)
    assert torch.allclose(out.sum(1), torch.ones(3, dtype=torch.float64))


def _lmi_reference(g, loc, t, mask):
    b, p = mask.shape
    total = 0.0
    counted = 0
    for i in range(b):
        terms = []
        neg = sum(
            math.exp(float(g[i] @ loc[k, j]) / t) for k in range(b) if k != i for j in range(p) if mask[k, j]
        )
        for j in range(p):
            if not mask[i, j]:
                continue
            pos = math.exp(float(g[i] @ loc[i, j]) / t)
            terms.append(-math.log(pos / (pos + neg)))
        if terms:
            total += sum(terms) / len(terms)
            counted += 1
    return total / counted


def test_local_mutual_information_matches_reference_with_mask():
    g, loc = _unit(4, 8, seed=10), _unit(4, 5, 8, seed=11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    got = local_mutual_information(g, loc, 0.2, mask)
    assert got.item() == pytest.approx(_lmi_reference(g, loc, 0.2, mask), rel=1e-10)
    full = torch.ones(4, 5, dtype=torch.bool)
    assert local_mutual_information(g, loc, 0.2).item() == pytest.approx(_lmi_reference(g, loc, 0.2, full), rel=1e-10)


def test_local_mutual_information_ignores_padded_locals():
    g, loc = _unit(3, 8, seed=12), _unit(3, 6, 8, seed=13)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    base = local_mutual_information(g, loc, 0.1, mask)
    garbage = loc.clone()
    garbage[~mask] = _unit(int((~mask).sum()), 8, seed=14) * 50  # huge values where padding is
    assert torch.allclose(local_mutual_information(g, garbage, 0.1, mask), base, rtol=0, atol=1e-12)
    # and no gradient reaches padded locals, no NaN anywhere
    garbage.requires_grad_(True)
    local_mutual_information(g, garbage, 0.1, mask).backward()
    assert torch.isfinite(garbage.grad).all()
    assert garbage.grad[~mask].abs().max() == 0


def test_local_mutual_information_single_sample_is_finite():
    g, loc = _unit(1, 4).requires_grad_(True), _unit(1, 3, 4, seed=1)
    loss = local_mutual_information(g, loc, 0.07)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(g.grad).all()


def test_sample_hard_negatives_never_returns_positives():
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 3, 4])
    positive = (ids[:, None] == ids[None, :]) | torch.eye(8, dtype=torch.bool)
    # similarity strongly favouring positives: sampling must still avoid them
    sim = positive.float() * 50 + torch.randn(8, 8, generator=gen)
    for _ in range(200):
        neg = sample_hard_negatives(sim, positive, generator=gen)
        assert not positive[torch.arange(8), neg].any()


def test_sample_hard_negatives_follows_softmax_weights():
    gen = torch.Generator().manual_seed(1)
    sim = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    positive = torch.eye(3, dtype=torch.bool)
    counts = torch.zeros(3)
    for _ in range(4000):
        counts[sample_hard_negatives(sim, positive, generator=gen)[0]] += 1
    expected = torch.softmax(torch.tensor([2.0, 0.0]), 0)  # row 0 over columns 1 and 2
    assert counts[0] == 0
    assert counts[1] / 4000 == pytest.approx(expected[0].item(), abs=0.03)


def test_sample_hard_negatives_fallbacks():
    positive = torch.ones(3, 3, dtype=torch.bool)  # every column a positive
    neg = sample_hard_negatives(torch.zeros(3, 3), positive, generator=torch.Generator().manual_seed(0))
    assert (neg != torch.arange(3)).all()  # falls back to a non-self index
    # underflow: non-positive weights that are exactly zero after softmax
    sim = torch.tensor([[1e4, -1e4, -1e4], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    neg = sample_hard_negatives(sim, torch.eye(3, dtype=torch.bool))
    assert neg[0] in (1, 2)


def test_mlm_masking_statistics():
    gen = torch.Generator().manual_seed(0)
    n, length, vocab, mask_id = 4000, 20, 1000, 3
    ids = torch.randint(10, vocab, (n, length), generator=gen)
    attention = torch.ones(n, length, dtype=torch.long)
    attention[:, 15:] = 0  # padding
    masked, labels = mask_tokens_for_mlm(ids, attention, mask_id, vocab, 0.15, generator=gen)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 15:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen.sum().item() / (n * 14)
    assert rate == pytest.approx(0.15, abs=0.005)
    replaced_by_mask = (masked == mask_id) & chosen
    unchanged = (masked == ids) & chosen
    frac_mask = replaced_by_mask.sum().item() / chosen.sum().item()
    frac_keep = unchanged.sum().item() / chosen.sum().item()
    assert frac_mask == pytest.approx(0.8, abs=0.01)
    assert frac_keep == pytest.approx(0.1 + 0.1 / vocab, abs=0.01)
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_masked_lm_distillation_loss_matches_reference():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 11, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 4, 11, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, -100, 7], [1, -100, -100, -100]])
    alpha = 0.3
    hard = soft = 0.0
    positions = [(0, 1), (0, 3), (1, 0)]
    for b, p in positions:
        log_p = torch.log_softmax(logits[b, p], 0)
        hard += -log_p[labels[b, p]].item()
        soft += -(torch.softmax(teacher[b, p], 0) * log_p).sum().item()
    expected = (1 - alpha) * hard / 3 + alpha * soft / 3
    got = masked_lm_distillation_loss(logits, labels, teacher, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # the teacher distribution is over the vocabulary: a teacher that is one-hot on the label (after softmax over
    # the last dim) makes the soft term equal the hard term
    onehot_teacher = torch.full_like(teacher, -1e4)
    for b, p in positions:
        onehot_teacher[b, p, labels[b, p]] = 1e4
    both = masked_lm_distillation_loss(logits, labels, onehot_teacher, 0.5)
    assert both.item() == pytest.approx(hard / 3, rel=1e-8)


def test_the_queue_is_a_ring_buffer_for_any_batch_size():
    """A queue whose size the batch does not divide (30 and 8) still holds exactly the newest 30 features, in order
    of arrival from the pointer on: no divisibility rule is needed (ALBEF's reference asserts one because it writes
    a contiguous slice; this queue writes modulo its size)."""
    queue = FeatureQueue(30, 4)
    arrived = []
    for step in range(7):
        features = torch.nn.functional.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(step)), dim=1)
        ids = torch.arange(8) + 8 * step
        queue.enqueue(features, ids)
        arrived += list(zip(features, ids.tolist()))
    newest = arrived[-30:]
    ptr = int(queue.ptr)
    assert ptr == (7 * 8) % 30
    order = [(ptr + k) % 30 for k in range(30)]  # oldest first
    assert [int(queue.ids[i]) for i in order] == [i for _, i in newest]
    assert torch.equal(queue.features[order], torch.stack([f for f, _ in newest]))
