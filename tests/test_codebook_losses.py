"""CODIS's codebook losses (`vlalign.losses`): code prediction, OT cost and OT code-assignment targets, each
against an explicit float64 reference (loops, and plain non-log-domain IPOT / Sinkhorn written from the papers:
references.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from references import (
    cosine,
    code_prediction_loop_reference,
    ot_cost_loop_reference,
    targets_reference,
)

from vlalign.losses import (
    code_assignment_targets,
    code_prediction_loss,
    code_similarities,
    optimal_transport_loss,
)

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
