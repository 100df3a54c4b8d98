"""vlalign.losses: every loss term against a direct float64 reference computation.

Contrastive cross-entropy and its targets, local mutual information, hard-negative sampling and MLM; the
decomposable contrastive loss, its log-Z estimates (batch, queue, running) and the latent-modality-structure
regularisers; SigLIP's sigmoid loss against a double loop; CODIS's codebook losses (code prediction, OT cost, OT
code-assignment targets) against loops and the plain-domain IPOT / Sinkhorn of references.py; and the IPOT /
Sinkhorn plans themselves (marginals, convergence to the exact assignment).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from references import (
    code_prediction_loop_reference,
    cosine,
    ot_cost_loop_reference,
    targets_reference,
)
from scipy.optimize import linear_sum_assignment

from vlalign.losses import (
    DecomposableContrastiveLoss,
    RunningLogZ,
    brownian_bridge_loss,
    code_assignment_targets,
    code_prediction_loss,
    code_similarities,
    contrastive_cross_entropy,
    contrastive_cross_entropy_with_ids,
    decomposable_info_nce,
    distillation_targets,
    estimate_log_z,
    feature_separation_loss,
    geometric_consistency_loss,
    info_nce,
    ipot,
    local_mutual_information,
    mask_tokens_for_mlm,
    masked_lm_distillation_loss,
    optimal_transport_loss,
    orthogonality_loss,
    positive_targets,
    sample_hard_negatives,
    sample_log_u,
    sigmoid_contrastive_loss,
    sinkhorn,
    uniformity_loss,
)

# ---------------------------------------------------------------------------------------------------------------------
# ALBEF / TCL terms: contrastive cross-entropy and its targets, local mutual information, hard negatives, MLM
# ---------------------------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("rows_per_block", [1, 3, 7])
def test_contrastive_cross_entropy_with_ids_over_row_blocks_equals_the_dense_loss_and_gradients(ids, rows_per_block):
    """Blocks of query rows (7 queries against 12 keys: this process's rows start at key 2, then other keys as from
    other processes or a queue): the value and the gradients of queries, keys and a learnable temperature equal
    the dense loss against `positive_targets`, including rows with several positives."""
    query_ids = torch.tensor([0, 1, 0, 2, 3, 1, 4]) if ids else None
    key_ids = torch.tensor([5, 6, 0, 1, 0, 2, 3, 1, 4, 0, 7, 1]) if ids else None

    def run(blocked):
        q = _unit(7, 8, seed=11).requires_grad_(True)
        k = _unit(12, 8, seed=12).requires_grad_(True)
        log_t = torch.tensor(math.log(0.07), dtype=torch.float64, requires_grad=True)
        if blocked:
            loss = contrastive_cross_entropy_with_ids(q, k, log_t.exp(), query_ids, key_ids, 2, rows_per_block)
        else:
            targets = positive_targets(query_ids, key_ids, 7, 12, offset=2, dtype=torch.float64)
            loss = contrastive_cross_entropy(q, k, log_t.exp(), targets)
        loss.backward()
        return loss.detach(), q.grad, k.grad, log_t.grad

    for got, expected in zip(run(True), run(False)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_info_nce_above_the_block_size_is_computed_over_row_blocks_with_the_same_value_and_gradients(monkeypatch):
    """`info_nce` at a batch whose logits exceed the block (here set to 16 logits: blocks of 2 of 8 rows) runs
    the row-blocked path and equals the dense one in float32 to rounding; with ids too."""
    import vlalign.losses as losses_module

    images, texts = _unit(8, 16, seed=13).float(), _unit(8, 16, seed=14).float()
    for image_ids in (None, torch.tensor([0, 1, 0, 2, 3, 3, 4, 5])):
        results = []
        for block in (None, 16):
            if block is not None:
                monkeypatch.setattr(losses_module, "_LOGITS_PER_BLOCK", block)
            i, t = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
            loss = info_nce(i, t, 0.05, image_ids)
            loss.backward()
            results.append((loss.detach(), i.grad, t.grad))
        monkeypatch.undo()
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_contrastive_cross_entropy_with_ids_computes_in_float32_under_bfloat16_over_blocks():
    q, k = _unit(6, 8).to(torch.bfloat16), _unit(6, 8, seed=9).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = contrastive_cross_entropy_with_ids(q, k, torch.tensor(0.07), rows_per_block=2)
    assert out.dtype == torch.float32
    ref = contrastive_cross_entropy(q.double(), k.double(), 0.07)
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_positive_targets_spread_over_ids_and_keep_diagonal():
    ids = torch.tensor([3, 1, 3])
    key_ids = torch.tensor([3, 1, 3, 1, 7, 3])
    targets = positive_targets(ids, key_ids, 3, 6)
    expected = torch.tensor(
        [
            [1 / 3, 0, 1 / 3, 0, 0, 1 / 3],
            [0, 1 / 2, 0, 1 / 2, 0, 0],
            [1 / 3, 0, 1 / 3, 0, 0, 1 / 3],
        ]
    )
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
        neg = sum(math.exp(float(g[i] @ loc[k, j]) / t) for k in range(b) if k != i for j in range(p) if mask[k, j])
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


def test_local_mutual_information_over_anchor_blocks_equals_the_whole_batch(monkeypatch):
    """Above the block size (set here to 15 logits: one anchor of 5 against 3 x 5 locals per block) the B x B x P
    logits are computed one block of anchors at a time and recomputed in backward: the value and the gradients of
    globals, locals and a learnable temperature equal the whole-batch computation, with padded locals and a
    sample that has none (it neither counts nor divides)."""
    import vlalign.losses as losses_module

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    results = []
    for block in (None, 15):
        if block is not None:
            monkeypatch.setattr(losses_module, "_LOGITS_PER_BLOCK", block)
        g, loc = _unit(4, 8, seed=10).requires_grad_(True), _unit(4, 5, 8, seed=11).requires_grad_(True)
        log_t = torch.tensor(math.log(0.2), dtype=torch.float64, requires_grad=True)
        loss = local_mutual_information(g, loc, log_t.exp(), mask)
        loss.backward()
        results.append((loss.detach(), g.grad, loc.grad, log_t.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert results[1][0].item() == pytest.approx(_lmi_reference(g.detach(), loc.detach(), 0.2, mask), rel=1e-10)


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


def _np(x):
    return x.detach().numpy().astype(np.float64)


def _log_sum_exp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


# ---------------------------------------------------------------------------------------------------------------------
# Decomposable contrastive loss
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 3])
def test_decomposable_info_nce_matches_loop(offset):
    q, k = _unit(4, 6, seed=1), _unit(9, 6, seed=2)
    log_u = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = 0.1
    qn, kn, un = _np(q), _np(k), _np(log_u)
    expected = 0.0
    for i in range(4):
        z = sum(math.exp(float(qn[i] @ kn[j]) / t) for j in range(9))
        expected += -float(qn[i] @ kn[offset + i]) / t + math.exp(un[i]) * z
    got = decomposable_info_nce(q, k, t, log_u, offset=offset)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected / 4, rel=1e-12)


def test_decomposable_info_nce_treats_log_u_as_constant():
    q, k = _unit(3, 5, seed=4), _unit(3, 5, seed=5)
    log_u = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    decomposable_info_nce(q.requires_grad_(), k, 0.2, log_u).backward()
    assert log_u.grad is None and q.grad is not None


def test_decomposable_gradient_equals_info_nce_gradient_with_batch_mean_u():
    """The defining property: with u_i = 1/Z_i from the same batch, the gradient is exactly InfoNCE's."""
    q0, k0 = _unit(6, 8, seed=6), _unit(6, 8, seed=7)
    t = torch.tensor(0.07, dtype=torch.float64)

    def grads(loss_fn):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        temp = t.clone().requires_grad_()
        loss = loss_fn(q, k, temp)
        loss.backward()
        return loss.detach(), q.grad, k.grad, temp.grad

    def decomposable(q, k, temp):
        log_u = sample_log_u(estimate_log_z(q, k, temp), sample=False)
        return decomposable_info_nce(q, k, temp, log_u)

    info_value, *info_grads = grads(contrastive_cross_entropy)
    dec_value, *dec_grads = grads(decomposable)
    for a, b in zip(info_grads, dec_grads, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    # the value is not log-sum-exp: with u = 1/Z the partition term is exactly 1 per anchor
    assert abs(info_value.item() - dec_value.item()) > 0.1
    diagonal = (q0 * k0).sum(1) / t
    assert dec_value.item() == pytest.approx((1 - diagonal).mean().item(), rel=1e-12)


def test_decomposable_info_nce_is_finite_in_float32_at_small_temperature():
    # Z = sum exp(s/t) overflows float32 at t=0.005, u*Z computed as exp(log u + logsumexp) does not
    q = _unit(4, 6, seed=8).float()
    log_z = estimate_log_z(q, q, 0.005)
    loss = decomposable_info_nce(q.requires_grad_(), q, 0.005, sample_log_u(log_z, False))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()


def test_decomposable_info_nce_float32_under_bfloat16_autocast():
    q, k = _unit(4, 8, seed=9).bfloat16(), _unit(4, 8, seed=10).bfloat16()
    log_u = -estimate_log_z(q.double(), k.double(), 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = decomposable_info_nce(q, k, torch.tensor(0.1), log_u)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(decomposable_info_nce(q.double(), k.double(), 0.1, log_u).item(), rel=1e-5)


@pytest.mark.parametrize("offset", [0, 2])
def test_estimate_log_z_batch_matches_loop(offset):
    q, k = _unit(3, 5, seed=11), _unit(7, 5, seed=12)
    t = 0.2
    qn, kn = _np(q), _np(k)
    got = estimate_log_z(q, k, t, offset=offset)
    expected = [_log_sum_exp([float(qn[i] @ kn[j]) / t for j in range(7)]) for i in range(3)]
    assert np.allclose(got.numpy(), expected, rtol=1e-12, atol=0)


def test_estimate_log_z_queue_matches_loop():
    q, k, queue = _unit(3, 5, seed=13), _unit(7, 5, seed=14), _unit(20, 5, seed=15)
    t, offset = 0.2, 2
    qn, kn, qun = _np(q), _np(k), _np(queue)
    temp = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    got = estimate_log_z(q.requires_grad_(), k, temp, queue=queue, offset=offset)
    assert not got.requires_grad
    for i in range(3):
        positive = math.exp(float(qn[i] @ kn[offset + i]) / t)
        mean_queue = sum(math.exp(float(qn[i] @ qun[j]) / t) for j in range(20)) / 20
        assert got[i].item() == pytest.approx(math.log(positive + 6 * mean_queue), rel=1e-12)


def test_estimate_log_z_queue_equal_to_batch_negatives_gives_batch_estimate():
    # a queue holding exactly the M - 1 batch negatives estimates the batch sum exactly
    q, k = _unit(1, 5, seed=16), _unit(6, 5, seed=17)
    batch = estimate_log_z(q, k, 0.3)
    assert torch.allclose(estimate_log_z(q, k, 0.3, queue=k[1:]), batch, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="queue"):
        estimate_log_z(q, k, 0.3, queue=k[:0])


def test_sample_log_u_mean_mode_and_gamma_sampling():
    log_z = torch.tensor([-1.0, 0.5, 3.0], dtype=torch.float64)
    assert torch.equal(sample_log_u(log_z, sample=False), -log_z)
    draws = 200_000
    repeated = log_z.repeat(draws, 1)
    u = sample_log_u(repeated, sample=True, generator=torch.Generator().manual_seed(0)).exp()
    # u = E / Z, E ~ Exp(1): mean 1/Z and std 1/Z, so the Monte Carlo mean has relative std 1/sqrt(draws) ~ 0.0022
    relative_mean = u.mean(0) * log_z.exp()
    assert torch.allclose(relative_mean, torch.ones(3, dtype=torch.float64), atol=0.012)
    relative_std = u.std(0) * log_z.exp()
    assert torch.allclose(relative_std, torch.ones(3, dtype=torch.float64), atol=0.03)
    # P(u * Z > 1) = e^-1 for an Exponential(1)
    assert ((u * log_z.exp()) > 1).double().mean().item() == pytest.approx(math.exp(-1), abs=0.005)
    again = sample_log_u(repeated, sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.exp(), u)
    other = sample_log_u(repeated, sample=True, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.exp(), u)


def test_running_log_z_exact_updates():
    running = RunningLogZ(5, momentum=0.8)
    assert set(dict(running.named_buffers())) == {"log_z", "seen"}
    assert set(running.state_dict()) == {"log_z", "seen"}
    first = torch.tensor([0.3, -1.2], dtype=torch.float64)
    out = running.update(torch.tensor([1, 3]), first)
    assert out.dtype == torch.float64
    assert torch.allclose(out, first)
    assert running.seen.tolist() == [False, True, False, True, False]
    second = torch.tensor([2.0, 0.7, -0.4], dtype=torch.float64)
    out = running.update(torch.tensor([3, 0, 1]), second)
    expected = [
        math.log(0.8 * math.exp(-1.2) + 0.2 * math.exp(2.0)),  # id 3: seen
        0.7,  # id 0: first sight
        math.log(0.8 * math.exp(0.3) + 0.2 * math.exp(-0.4)),  # id 1: seen
    ]
    assert np.allclose(out.numpy(), expected, rtol=1e-6, atol=0)
    assert np.allclose(running.log_z[[3, 0, 1]].numpy(), expected, rtol=1e-6, atol=0)
    assert running.seen.tolist() == [True, True, False, True, False]


def test_running_log_z_validation():
    running = RunningLogZ(4)
    for bad in ([4], [-1]):
        with pytest.raises(ValueError, match="sample_ids"):
            running.update(torch.tensor(bad), torch.zeros(1))
    with pytest.raises(ValueError, match="num_samples"):
        RunningLogZ(0)
    with pytest.raises(ValueError, match="momentum"):
        RunningLogZ(3, momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        RunningLogZ(3, momentum=-0.1)
    # momentum 0 keeps the latest batch value
    zero = RunningLogZ(2, momentum=0.0)
    zero.update(torch.tensor([0]), torch.tensor([1.0]))
    assert zero.update(torch.tensor([0]), torch.tensor([-2.0])).item() == -2.0


def test_decomposable_module_batch_mode_equals_functional_and_info_nce_gradient():
    img0, txt0 = _unit(5, 8, seed=20), _unit(5, 8, seed=21)
    img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
    loss_i2t, loss_t2i = DecomposableContrastiveLoss()(img, txt, 0.1)
    expected_i2t = decomposable_info_nce(img0, txt0, 0.1, -estimate_log_z(img0, txt0, 0.1))
    expected_t2i = decomposable_info_nce(txt0, img0, 0.1, -estimate_log_z(txt0, img0, 0.1))
    assert loss_i2t.item() == pytest.approx(expected_i2t.item(), rel=1e-12)
    assert loss_t2i.item() == pytest.approx(expected_t2i.item(), rel=1e-12)
    (loss_i2t + loss_t2i).backward()
    ref_img, ref_txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
    (contrastive_cross_entropy(ref_img, ref_txt, 0.1) + contrastive_cross_entropy(ref_txt, ref_img, 0.1)).backward()
    assert torch.allclose(img.grad, ref_img.grad, rtol=0, atol=1e-10)
    assert torch.allclose(txt.grad, ref_txt.grad, rtol=0, atol=1e-10)


def test_decomposable_module_modes_run_and_validate():
    img, txt = _unit(4, 8, seed=22).float(), _unit(4, 8, seed=23).float()
    temperature = torch.tensor(0.07, requires_grad=True)
    queue_img, queue_txt = _unit(16, 8, seed=24).float(), _unit(16, 8, seed=25).float()
    ids = torch.tensor([0, 5, 2, 9])

    running = DecomposableContrastiveLoss("running", num_samples=10, running_momentum=0.5)
    assert set(running.state_dict()) == {
        "running_i2t.log_z",
        "running_i2t.seen",
        "running_t2i.log_z",
        "running_t2i.seen",
    }
    first = running(img, txt, temperature, sample_ids=ids)
    assert torch.equal(running.running_i2t.log_z[ids], estimate_log_z(img, txt, 0.07))
    assert torch.equal(running.running_t2i.log_z[ids], estimate_log_z(txt, img, 0.07))
    # first sight: the running estimate is the batch estimate
    batch_losses = DecomposableContrastiveLoss()(img, txt, temperature)
    for a, b in zip(first, batch_losses, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)

    queue_losses = DecomposableContrastiveLoss("queue")(
        img, txt, temperature, image_queue=queue_img, text_queue=queue_txt
    )
    sampled = DecomposableContrastiveLoss(sample_u=True)
    sampled_losses = sampled(img, txt, temperature, generator=torch.Generator().manual_seed(0))
    repeat = sampled(img, txt, temperature, generator=torch.Generator().manual_seed(0))
    assert [x.item() for x in repeat] == [x.item() for x in sampled_losses]
    second = running(img, txt, temperature, sample_ids=ids)
    for losses in (first, second, queue_losses, sampled_losses):
        assert all(x.dtype == torch.float32 and torch.isfinite(x) for x in losses)
        sum(losses).backward()
        assert torch.isfinite(temperature.grad)
        temperature.grad = None

    with pytest.raises(ValueError, match="z_estimate"):
        DecomposableContrastiveLoss("moving")
    with pytest.raises(ValueError, match="num_samples"):
        DecomposableContrastiveLoss("running")
    with pytest.raises(ValueError, match="num_samples"):
        DecomposableContrastiveLoss("running", num_samples=0)
    with pytest.raises(ValueError, match="running_momentum"):
        DecomposableContrastiveLoss("running", num_samples=3, running_momentum=1.5)
    with pytest.raises(ValueError, match="sample_u"):
        DecomposableContrastiveLoss(sample_u="yes")
    with pytest.raises(ValueError, match="sample_ids"):
        running(img, txt, temperature)
    with pytest.raises(ValueError, match="sample_ids"):
        running(img, txt, temperature, sample_ids=torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="queue"):
        DecomposableContrastiveLoss("queue")(img, txt, temperature, image_queue=queue_img)


# ---------------------------------------------------------------------------------------------------------------------
# Latent modality structures
# ---------------------------------------------------------------------------------------------------------------------


def _structure_inputs(n=5, d=6, seed=30):
    return [_unit(n, d, seed=seed + i) for i in range(6)]


def test_orthogonality_loss_matches_loop_and_vanishes_for_orthogonal_features():
    z_v, z_t, ind_v, ind_t = _structure_inputs()[:4]
    a, b, c, e = map(_np, (z_v, z_t, ind_v, ind_t))
    expected = sum(float(a[j] @ c[j]) ** 2 + float(b[j] @ e[j]) ** 2 for j in range(5)) / 5
    assert orthogonality_loss(z_v, z_t, ind_v, ind_t).item() == pytest.approx(expected, rel=1e-12)
    # independent features = main features with their component along the main one removed (Gram-Schmidt)
    ortho_v = F.normalize(ind_v - (ind_v * z_v).sum(1, keepdim=True) * z_v, dim=1)
    ortho_t = F.normalize(ind_t - (ind_t * z_t).sum(1, keepdim=True) * z_t, dim=1)
    assert orthogonality_loss(z_v, z_t, ortho_v, ortho_t).item() == pytest.approx(0.0, abs=1e-28)


def test_uniformity_loss_matches_loop():
    ind_v, ind_t = _structure_inputs()[2:4]
    v, t = _np(ind_v), _np(ind_t)
    total = 0.0
    for j in range(5):
        for k in range(5):
            total += math.exp(-2 * np.sum((v[j] - v[k]) ** 2)) + math.exp(-2 * np.sum((t[j] - t[k]) ** 2))
    got = uniformity_loss(ind_v, ind_t)
    assert got.item() == pytest.approx(math.log(total / 5), rel=1e-12)
    # all points equal: every kernel is 1, so log(2 N^2 / N) = log(2 N)
    same = ind_v[:1].expand(5, -1)
    assert uniformity_loss(same, same).item() == pytest.approx(math.log(10), rel=1e-12)


def test_feature_separation_loss_terms_and_total():
    z_v, z_t, ind_v, ind_t, ind_v_aug, ind_t_aug = _structure_inputs()
    terms = feature_separation_loss(z_v, z_t, ind_v, ind_t, ind_v_aug, ind_t_aug, 0.1)
    assert set(terms) == {"orthogonality", "independent_contrastive", "uniformity", "total"}
    t = 0.1
    contrastive = 0.0
    for queries, keys in ((_np(ind_v), _np(ind_v_aug)), (_np(ind_t), _np(ind_t_aug))):
        for i in range(5):
            logits = [float(queries[i] @ keys[j]) / t for j in range(5)]
            contrastive += _log_sum_exp(logits) - logits[i]
    assert terms["independent_contrastive"].item() == pytest.approx(contrastive / 10, rel=1e-12)
    assert terms["orthogonality"].item() == pytest.approx(orthogonality_loss(z_v, z_t, ind_v, ind_t).item())
    assert terms["uniformity"].item() == pytest.approx(uniformity_loss(ind_v, ind_t).item())
    parts = terms["orthogonality"] + terms["independent_contrastive"] + terms["uniformity"]
    assert terms["total"].item() == pytest.approx(parts.item(), rel=1e-14)


def test_brownian_bridge_loss_matches_loop_and_vanishes_on_the_bridge():
    z_v, z_t, z_v_aug = _structure_inputs()[:3]
    a, b, c = map(_np, (z_v, z_t, z_v_aug))
    expected = 0.0
    for j in range(5):
        mid = 0.25 * a[j] + 0.75 * b[j]
        mid = mid / np.linalg.norm(mid)
        expected += np.sum((c[j] - mid) ** 2)
    assert brownian_bridge_loss(z_v, z_t, z_v_aug).item() == pytest.approx(expected / 5, rel=1e-12)
    mid = F.normalize(0.6 * z_v + 0.4 * z_t, dim=1)
    assert brownian_bridge_loss(z_v, z_t, mid, t=0.6).item() == pytest.approx(0.0, abs=1e-28)
    # the endpoints: t = 1 pulls the augmented image to the image itself
    assert brownian_bridge_loss(z_v, z_t, z_v, t=1.0).item() == pytest.approx(0.0, abs=1e-28)
    with pytest.raises(ValueError, match="t must"):
        brownian_bridge_loss(z_v, z_t, z_v_aug, t=1.5)


def test_geometric_consistency_loss_matches_loop_and_vanishes_when_consistent():
    z_v, z_t, z_v_aug, z_t_aug = _structure_inputs()[:4]
    v, t, va, ta = map(_np, (z_v, z_t, z_v_aug, z_t_aug))
    n = 5
    cross = augmented = 0.0
    for j in range(n):
        for k in range(n):
            cross += (v[j] @ t[k] - v[k] @ t[j]) ** 2 + (v[j] @ v[k] - t[j] @ t[k]) ** 2
            augmented += (v[j] @ v[k] - va[j] @ va[k]) ** 2 + (t[j] @ t[k] - ta[j] @ ta[k]) ** 2
    paired = sum((v[j] @ t[j] - va[j] @ ta[j]) ** 2 for j in range(n)) / n
    got = geometric_consistency_loss(z_v, z_t, z_v_aug, z_t_aug)
    assert set(got) == {"cross", "augmented", "total"}
    assert got["cross"].item() == pytest.approx(cross / n, rel=1e-12)
    assert got["augmented"].item() == pytest.approx(augmented / n + paired, rel=1e-12)
    assert got["total"].item() == pytest.approx(cross / n + augmented / n + paired, rel=1e-12)
    zero = geometric_consistency_loss(z_v, z_v, z_v, z_v)
    assert all(value.item() == pytest.approx(0.0, abs=1e-28) for value in zero.values())
    # the geometry terms are invariant to a common rotation of all four feature sets
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    rotated = geometric_consistency_loss(*(x @ rotation for x in (z_v, z_t, z_v_aug, z_t_aug)))
    assert rotated["total"].item() == pytest.approx(got["total"].item(), rel=1e-10)


def test_structure_losses_have_finite_gradients_and_float32_under_bfloat16():
    leaves = [x.float().requires_grad_() for x in _structure_inputs()]
    z_v, z_t, ind_v, ind_t, ind_v_aug, ind_t_aug = leaves
    total = (
        feature_separation_loss(z_v, z_t, ind_v, ind_t, ind_v_aug, ind_t_aug, 0.1)["total"]
        + brownian_bridge_loss(z_v, z_t, ind_v_aug)
        + geometric_consistency_loss(z_v, z_t, ind_v_aug, ind_t_aug)["total"]
    )
    total.backward()
    assert torch.isfinite(total)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)

    inputs64 = _structure_inputs()
    bf16 = [x.bfloat16() for x in inputs64]
    rounded = [x.double() for x in bf16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = {
            "orthogonality": orthogonality_loss(*bf16[:4]),
            "uniformity": uniformity_loss(*bf16[2:4]),
            "separation": feature_separation_loss(*bf16, torch.tensor(0.1))["total"],
            "bridge": brownian_bridge_loss(*bf16[:3]),
            "geometric": geometric_consistency_loss(*bf16[:4])["total"],
        }
    references = {
        "orthogonality": orthogonality_loss(*rounded[:4]),
        "uniformity": uniformity_loss(*rounded[2:4]),
        "separation": feature_separation_loss(*rounded, 0.1)["total"],
        "bridge": brownian_bridge_loss(*rounded[:3]),
        "geometric": geometric_consistency_loss(*rounded[:4])["total"],
    }
    for name, value in outputs.items():
        assert value.dtype == torch.float32, name
        assert value.item() == pytest.approx(references[name].item(), rel=1e-4, abs=1e-5), name


def test_decomposable_with_soft_targets_has_the_soft_info_nce_gradient():
    """Several positives per anchor: with u = 1/Z from the batch, the gradient equals that of soft-target
    InfoNCE (`contrastive_cross_entropy` with the same targets)."""
    from vlalign.losses import contrastive_cross_entropy, positive_targets

    g = torch.Generator().manual_seed(7)
    q = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    ids = torch.tensor([0, 1, 1, 2, 2, 2])
    positives = positive_targets(ids, ids, 6, 6) > 0
    targets = positives.double() / positives.double().sum(1, keepdim=True)  # rows sum to 1 exactly in float64
    log_z = estimate_log_z(q, k, 0.1)
    decomposable_info_nce(q, k, 0.1, sample_log_u(log_z, sample=False), targets=targets).backward()
    grad_q, grad_k = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    contrastive_cross_entropy(q, k, 0.1, targets).backward()
    assert torch.allclose(grad_q, q.grad, atol=1e-12) and torch.allclose(grad_k, k.grad, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# The running log-Z estimate keeps non-finite estimates out
# ---------------------------------------------------------------------------------------------------------------------


def test_running_log_z_keeps_nonfinite_estimates_out():
    state = RunningLogZ(num_samples=4, momentum=0.5)
    state.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    out = state.update(torch.tensor([1, 2]), torch.tensor([math.inf, math.nan]))
    assert not torch.isfinite(out).any()  # this step's loss sees it (and the trainer skips the step)
    assert state.log_z.tolist()[:3] == [1.0, 2.0, 0.0] and state.seen.tolist() == [True, True, False, False]


# ---------------------------------------------------------------------------------------------------------------------
# CODIS codebook losses
# ---------------------------------------------------------------------------------------------------------------------


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _soft_targets(n, k, seed):
    t = torch.rand(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 3
    return t / t.sum(1, keepdim=True)


# ----------------------------------------------------------------------------------------------------------------
# 1. code prediction and OT cost vs loops, values and gradients


def test_code_similarities_are_cosines():
    f, c = _randn(5, 6, seed=0) * 3.0, _randn(7, 6, seed=1) * 0.2
    sims = code_similarities(f, c)
    expected = torch.tensor([[cosine(f[i], c[j]).item() for j in range(7)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(sims, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_code_prediction_loss_value_and_gradients_match_loop_reference(temperature):
    student = (_randn(5, 6, seed=2) * 2.0).requires_grad_()  # not normalised: the loss normalises
    codebook = (_randn(7, 6, seed=3) * 0.3).requires_grad_()
    targets = _soft_targets(5, 7, seed=4)
    loss = code_prediction_loss(student, codebook, targets, temperature)
    assert loss.dtype == torch.float64
    loss.backward()

    s_ref, c_ref = student.detach().clone().requires_grad_(), codebook.detach().clone().requires_grad_()
    ref = code_prediction_loop_reference(s_ref, c_ref, targets, temperature)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(student.grad, s_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(codebook.grad, c_ref.grad, rtol=1e-9, atol=1e-12)
    assert codebook.grad.abs().max() > 1e-3 and student.grad.abs().max() > 1e-3


def test_code_prediction_loss_with_one_hot_targets_is_plain_cross_entropy():
    student, codebook = _randn(6, 4, seed=5), _randn(9, 4, seed=6)
    labels = torch.tensor([0, 3, 3, 8, 1, 5])
    logits = F.normalize(student, dim=1) @ F.normalize(codebook, dim=1).t() / 0.2
    got = code_prediction_loss(student, codebook, F.one_hot(labels, 9).double(), 0.2)
    assert got.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-12)


def test_optimal_transport_loss_value_and_gradients_match_loop_reference():
    teacher = (_randn(5, 6, seed=7) * 1.5).requires_grad_()
    codebook = (_randn(7, 6, seed=8) * 0.4).requires_grad_()
    targets = _soft_targets(5, 7, seed=9)
    loss = optimal_transport_loss(teacher, codebook, targets)
    assert loss.dtype == torch.float64
    loss.backward()
    t_ref, c_ref = teacher.detach().clone().requires_grad_(), codebook.detach().clone().requires_grad_()
    ref = ot_cost_loop_reference(t_ref, c_ref, targets)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(teacher.grad, t_ref.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(codebook.grad, c_ref.grad, rtol=1e-9, atol=1e-12)


def test_float32_inputs_under_bf16_autocast_give_float32_results_at_float32_accuracy():
    student, teacher = _randn(6, 8, seed=10), _randn(6, 8, seed=11)
    codebook = _randn(10, 8, seed=12)
    targets = _soft_targets(6, 10, seed=13)
    ref_code = code_prediction_loop_reference(student, codebook, targets, 0.1).item()
    ref_ot = ot_cost_loop_reference(teacher, codebook, targets).item()
    ref_targets = targets_reference(teacher, codebook, "ipot", beta=0.5, iterations=50)
    s32, t32, c32 = student.float().requires_grad_(), teacher.float(), codebook.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        code = code_prediction_loss(s32, c32, targets.float(), 0.1)
        ot = optimal_transport_loss(t32, c32, targets.float())
        assignment = code_assignment_targets(t32, c32, "ipot", beta=0.5, iterations=50)
    for value in (code, ot, assignment):
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
    # computed in float32, not bfloat16 (bf16 matmuls would be off by ~1e-2)
    assert code.item() == pytest.approx(ref_code, rel=1e-5)
    assert ot.item() == pytest.approx(ref_ot, rel=1e-5)
    torch.testing.assert_close(assignment.double(), ref_targets, rtol=0, atol=1e-5)
    (code + ot).backward()
    assert s32.grad.dtype == torch.float32 and torch.isfinite(s32.grad).all() and torch.isfinite(c32.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# 2. code_assignment_targets: marginals, reference plans, no gradient


SOLVER_SETTINGS = [
    ("ipot", dict(beta=0.5, iterations=50)),  # CODIS's setting
    ("ipot", dict(beta=0.3, iterations=40, inner_iterations=3)),
    ("sinkhorn", dict(epsilon=0.05, iterations=50)),
    ("sinkhorn", dict(epsilon=0.1, iterations=120)),
]


@pytest.mark.parametrize("solver, kwargs", SOLVER_SETTINGS)
@pytest.mark.parametrize("n, k", [(8, 12), (16, 4)])
def test_code_assignment_targets_equal_reference_plan_times_n(solver, kwargs, n, k):
    features, codebook = _randn(n, 6, seed=20) * 2.0, _randn(k, 6, seed=21) * 0.5
    got = code_assignment_targets(features, codebook, solver, **kwargs)
    expected = targets_reference(features, codebook, solver, **kwargs)
    assert got.dtype == torch.float64 and got.shape == (n, k)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert (got >= 0).all()
    # each code receives N/K samples in total, up to the solver's convergence (the rows are normalised exactly)
    torch.testing.assert_close(got.sum(0), torch.full((k,), n / k, dtype=torch.float64), rtol=1e-3, atol=0)
    # float32 inputs (the model's path): float32 result, same plan to float32 accuracy
    got32 = code_assignment_targets(features.float(), codebook.float(), solver, **kwargs)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got32.sum(0), torch.full((k,), n / k), rtol=1e-3, atol=0)


@pytest.mark.parametrize("solver, kwargs", SOLVER_SETTINGS)
@pytest.mark.parametrize("n, k", [(8, 12), (16, 4)])
def test_code_assignment_target_rows_are_distributions(solver, kwargs, n, k):
    features, codebook = _randn(n, 6, seed=20) * 2.0, _randn(k, 6, seed=21) * 0.5
    for dtype in (torch.float64, torch.float32):
        got = code_assignment_targets(features.to(dtype), codebook.to(dtype), solver, **kwargs)
        torch.testing.assert_close(got.sum(1), torch.ones(n, dtype=dtype), rtol=0, atol=1e-6)


def test_code_assignment_targets_depend_only_on_directions():
    features, codebook = _randn(8, 5, seed=22), _randn(6, 5, seed=23)
    scales = torch.rand(8, 1, generator=torch.Generator().manual_seed(24), dtype=torch.float64) * 10 + 0.1
    a = code_assignment_targets(features, codebook)
    b = code_assignment_targets(features * scales, codebook * 7.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_code_assignment_targets_follow_the_cost():
    """A nearly exact plan assigns each feature to the codeword it equals (features = a permutation of the
    codewords, N = K: the optimal plan is that permutation)."""
    codebook = F.normalize(_randn(6, 8, seed=25), dim=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    features = codebook[perm] + 0.01 * _randn(6, 8, seed=26)
    targets = code_assignment_targets(features, codebook, "ipot", beta=0.1, iterations=300)
    assert torch.equal(targets.argmax(1), perm)
    assert (targets.max(1).values > 0.99).all()


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_code_assignment_targets_carry_no_gradient(solver):
    features = _randn(8, 6, seed=27).requires_grad_()
    codebook = _randn(5, 6, seed=28).requires_grad_()
    targets = code_assignment_targets(features, codebook, solver)
    assert not targets.requires_grad and targets.grad_fn is None
    # and using them in a loss sends nothing through them
    optimal_transport_loss(features.detach(), codebook, targets).backward()
    assert features.grad is None and codebook.grad is not None


def test_code_assignment_targets_reject_unknown_solver():
    with pytest.raises(ValueError, match="emd"):
        code_assignment_targets(_randn(4, 3, seed=29), _randn(5, 3, seed=30), "emd")


# ----------------------------------------------------------------------------------------------------------------
# 3. OT cost: analytic codebook gradient, nothing to detached teacher features


def test_optimal_transport_loss_gives_codebook_the_analytic_gradient_and_teacher_nothing():
    raw_teacher = _randn(6, 5, seed=31).requires_grad_()
    teacher = raw_teacher.detach() * 1.0
    codebook = (_randn(4, 5, seed=32) * 0.7).requires_grad_()
    targets = code_assignment_targets(teacher, codebook)
    optimal_transport_loss(teacher, codebook, targets).backward()
    # d/dc_k [1/N sum_i t_ik (1 - f_i.c_k / (|f_i| |c_k|))] = -1/N sum_i t_ik (I - c^_k c^_k^T) f^_i / |c_k|
    n = teacher.shape[0]
    f_hat = F.normalize(teacher, dim=1)
    c = codebook.detach()
    expected = torch.zeros_like(c)
    for k in range(c.shape[0]):
        norm = c[k].norm()
        c_hat = c[k] / norm
        pull = (targets[:, k : k + 1] * f_hat).sum(0)  # the features assigned to code k, weighted
        expected[k] = -(pull - (pull @ c_hat) * c_hat) / (n * norm)
    torch.testing.assert_close(codebook.grad, expected, rtol=1e-10, atol=1e-12)
    assert raw_teacher.grad is None and not teacher.requires_grad
    # a gradient step moves each codeword toward the (weighted) mean direction of its assigned features
    before = optimal_transport_loss(teacher, codebook.detach(), targets)
    after = optimal_transport_loss(teacher, codebook.detach() - 0.1 * codebook.grad, targets)
    assert after < before
    assert math.isfinite(before.item())


# ---------------------------------------------------------------------------------------------------------------------
# Optimal transport solvers: IPOT and Sinkhorn plans
# ---------------------------------------------------------------------------------------------------------------------


def _cost(rows, cols, seed, dtype=torch.float64):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize(
    "solver, kwargs",
    [
        (ipot, dict(beta=0.5, iterations=50)),  # CODIS's setting
        (sinkhorn, dict(epsilon=0.05, iterations=200)),
    ],
)
@pytest.mark.parametrize("shape", [(8, 8), (32, 100), (100, 16)])
def test_plans_satisfy_uniform_marginals(solver, kwargs, shape):
    plan = solver(_cost(*shape, seed=1, dtype=torch.float32), **kwargs)
    rows, cols = shape
    assert plan.dtype == torch.float32 and (plan >= 0).all()
    assert torch.allclose(plan.sum(dim=1), torch.full((rows,), 1 / rows), atol=1e-4)
    assert torch.allclose(plan.sum(dim=0), torch.full((cols,), 1 / cols), atol=1e-4)


def test_plans_satisfy_given_marginals():
    cost = _cost(5, 7, seed=2)
    a = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    b = torch.softmax(torch.arange(7, dtype=torch.float64), 0)
    for plan in (
        ipot(cost, iterations=300, row_marginal=a, column_marginal=b),
        sinkhorn(cost, epsilon=0.05, iterations=500, row_marginal=a, column_marginal=b),
    ):
        assert torch.allclose(plan.sum(1), a, atol=1e-6) and torch.allclose(plan.sum(0), b, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "solver, kwargs",
    [
        (ipot, dict(beta=0.1, iterations=500)),
        (sinkhorn, dict(epsilon=0.005, iterations=3000)),
    ],
)
def test_small_square_problems_approach_the_exact_assignment(solver, kwargs, seed):
    """Uniform marginals on an n x n cost: the OT optimum is a permutation (scaled by 1/n); with little entropy
    the plans put their mass on the assignment that scipy's Hungarian solver finds."""
    n = 7
    cost = _cost(n, n, seed=seed)
    rows, cols = linear_sum_assignment(cost.numpy())
    optimum = cost.numpy()[rows, cols].sum() / n
    plan = solver(cost, **kwargs)
    assert np.array_equal(plan.argmax(dim=1).numpy(), cols)
    # Sinkhorn's entropic plan is suboptimal by at most epsilon * (H(a) + H(b)) = 2 epsilon log n; IPOT is not
    entropic_bias = 2 * kwargs.get("epsilon", 0.0) * np.log(n)
    assert optimum - 1e-4 <= (plan * cost).sum().item() <= optimum + entropic_bias + 1e-4  # marginals to ~1e-5


def test_ipot_converges_to_the_exact_plan_for_fixed_beta_where_sinkhorn_stays_blurred():
    cost = _cost(6, 6, seed=3)
    _, cols = linear_sum_assignment(cost.numpy())
    exact = torch.zeros(6, 6, dtype=torch.float64)
    exact[torch.arange(6), torch.as_tensor(cols)] = 1 / 6
    blurred = sinkhorn(cost, epsilon=0.5, iterations=500)
    sharp = ipot(cost, beta=0.5, iterations=2000)
    assert (sharp - exact).abs().max() < 1e-3 < (blurred - exact).abs().max()


def test_solvers_reject_bad_settings_and_take_no_gradient():
    cost = _cost(3, 4, seed=4).requires_grad_(True)
    assert not ipot(cost).requires_grad and not sinkhorn(cost).requires_grad
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(cost, epsilon=0.0)
    with pytest.raises(ValueError, match="beta"):
        ipot(cost, beta=-1.0)


# ---------------------------------------------------------------------------------------------------------------------
# SigLIP's sigmoid contrastive loss (its exchange across processes: test_distributed.py)
# ---------------------------------------------------------------------------------------------------------------------


def _sigmoid_loop_reference(images, texts, temperature, bias, ids=None):
    """``1/B sum_i sum_j -log sigmoid(z_ij * (s_ij / t + b))`` pair by pair, in python floats."""
    total = 0.0
    for i in range(images.shape[0]):
        for j in range(texts.shape[0]):
            positive = i == j or (ids is not None and int(ids[i]) == int(ids[j]))
            logit = float(images[i] @ texts[j]) / temperature + bias
            sign = 1.0 if positive else -1.0
            total += math.log1p(math.exp(-sign * logit))
    return total / images.shape[0]


def test_sigmoid_contrastive_loss_hand_computed_case():
    """Orthonormal pairs, t = 0.5, b = -2: the two positives have logit 2 - 2 = 0 (log 2 each), the two negatives
    logit 0 - 2 (log(1 + e^-2) each); divided by B = 2."""
    eye = torch.eye(2, dtype=torch.float64)
    loss = sigmoid_contrastive_loss(eye, eye, 0.5, -2.0)
    assert loss.item() == pytest.approx(math.log(2.0) + math.log1p(math.exp(-2.0)), rel=1e-12)


@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2, 1]], ids=["pairs", "positive_ids"])
def test_sigmoid_contrastive_loss_equals_double_loop(ids):
    images, texts = _unit(5, 8, seed=21), _unit(5, 8, seed=22)
    id_tensor = None if ids is None else torch.tensor(ids)
    loss = sigmoid_contrastive_loss(images, texts, 0.1, torch.tensor([-10.0], dtype=torch.float64), id_tensor)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(_sigmoid_loop_reference(images, texts, 0.1, -10.0, ids), rel=1e-12)


def test_sigmoid_contrastive_loss_positive_ids_turn_negatives_into_positives():
    """Equal ids make (0, 2) and (2, 0) positives: exactly those two pair terms change, from
    -log sigmoid(-x) to -log sigmoid(x), i.e. by -x each (x their logit)."""
    images, texts = _unit(3, 4, seed=23), _unit(3, 4, seed=24)
    t, b = 0.2, -1.5
    without = sigmoid_contrastive_loss(images, texts, t, b)
    with_ids = sigmoid_contrastive_loss(images, texts, t, b, torch.tensor([7, 8, 7]))
    logits = images @ texts.t() / t + b
    assert (with_ids - without).item() == pytest.approx(-(logits[0, 2] + logits[2, 0]).item() / 3, rel=1e-12)
    # all ids equal: every pair is a positive
    same = sigmoid_contrastive_loss(images, texts, t, b, torch.zeros(3, dtype=torch.long))
    assert same.item() == pytest.approx((-F.logsigmoid(logits)).sum().item() / 3, rel=1e-12)


def test_sigmoid_contrastive_loss_gradients_of_bias_temperature_and_features():
    """d/db = 1/B sum_ij (sigmoid(logit_ij) - y_ij) with y the positives; d/dt and the feature gradients equal the
    autograd of the double loop's formula written out with tensors."""
    images, texts = _unit(4, 6, seed=25).requires_grad_(), _unit(4, 6, seed=26).requires_grad_()
    ids = torch.tensor([0, 1, 1, 2])
    bias = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    temperature = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = sigmoid_contrastive_loss(images, texts, temperature, bias, ids)
    loss.backward()
    with torch.no_grad():
        logits = images @ texts.t() / temperature + bias
        labels = ((ids[:, None] == ids[None, :]) | torch.eye(4, dtype=torch.bool)).double()
        expected_bias_grad = (torch.sigmoid(logits) - labels).sum() / 4
    assert bias.grad.shape == (1,)
    assert bias.grad.item() == pytest.approx(expected_bias_grad.item(), rel=1e-12)
    images2, texts2 = images.detach().clone().requires_grad_(), texts.detach().clone().requires_grad_()
    temperature2 = temperature.detach().clone().requires_grad_()
    reference = -F.logsigmoid((2 * labels - 1) * (images2 @ texts2.t() / temperature2 - 3.0)).sum() / 4
    reference.backward()
    torch.testing.assert_close(images.grad, images2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(texts.grad, texts2.grad, rtol=1e-12, atol=1e-14)
    assert temperature.grad.item() == pytest.approx(temperature2.grad.item(), rel=1e-12)


def test_sigmoid_contrastive_loss_float32_under_bfloat16_autocast():
    images, texts = _unit(6, 8, seed=27).bfloat16(), _unit(6, 8, seed=28).bfloat16()
    bias = torch.tensor([-10.0], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_contrastive_loss(images, texts, torch.tensor(0.1), bias)
    assert loss.dtype == torch.float32
    reference = _sigmoid_loop_reference(images.double(), texts.double(), 0.1, -10.0)
    assert loss.item() == pytest.approx(reference, rel=1e-5)
    loss.backward()
    assert bias.grad.dtype == torch.float32 and torch.isfinite(bias.grad).all()
