"""Decomposable contrastive loss and latent-modality-structure regularisers against float64 references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlalign.losses import (
    DecomposableContrastiveLoss,
    RunningLogZ,
    brownian_bridge_loss,
    contrastive_cross_entropy,
    decomposable_info_nce,
    estimate_log_z,
    feature_separation_loss,
    geometric_consistency_loss,
    orthogonality_loss,
    sample_log_u,
    uniformity_loss,
)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


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
    assert set(running.state_dict()) == {"running_i2t.log_z", "running_i2t.seen", "running_t2i.log_z",
                                         "running_t2i.seen"}
    first = running(img, txt, temperature, sample_ids=ids)
    assert torch.equal(running.running_i2t.log_z[ids], estimate_log_z(img, txt, 0.07))
    assert torch.equal(running.running_t2i.log_z[ids], estimate_log_z(txt, img, 0.07))
    # first sight: the running estimate is the batch estimate
    batch_losses = DecomposableContrastiveLoss()(img, txt, temperature)
    for a, b in zip(first, batch_losses, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)

    queue_losses = DecomposableContrastiveLoss("queue")(img, txt, temperature, image_queue=queue_img,
                                                         text_queue=queue_txt)
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
