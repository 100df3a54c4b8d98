"""Independent float64 references that tests compare the library against: the OT solvers written from the papers
(plain domain, numpy), and per-sample loops of the codebook losses. Used by test_losses.py, test_modeling_codis.py
and the distributed test."""

import numpy as np
import torch


def ipot_reference(cost, beta=0.5, iterations=50, inner_iterations=1):
    """IPOT (Xie et al. 2019, Algorithm 1) in the plain domain with numpy float64, uniform marginals:
    T0 = 1/(NK); each outer step Q = exp(-C/beta) * T, `inner_iterations` of (a = mu / (Q b), b = nu / (Q^T a))
    with b kept across outer steps, then T = diag(a) Q diag(b)."""
    cost = np.asarray(cost, dtype=np.float64)
    n, k = cost.shape
    mu, nu = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    plan = np.full((n, k), 1.0 / (n * k))
    b = np.full(k, 1.0 / k)  # its scale cancels out of the first a, b update
    kernel = np.exp(-cost / beta)
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(inner_iterations):
            a = mu / (q @ b)
            b = nu / (q.T @ a)
        plan = a[:, None] * q * b[None, :]
    return plan


def sinkhorn_reference(cost, epsilon=0.05, iterations=50):
    """Sinkhorn-Knopp in the plain domain with numpy float64, uniform marginals: kernel exp(-C/eps), v = 1,
    alternate u = a / (K v), v = b / (K^T u), a final u = a / (K v); T = diag(u) K diag(v)."""
    cost = np.asarray(cost, dtype=np.float64)
    n, k = cost.shape
    a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    kernel = np.exp(-cost / epsilon)
    v = np.ones(k)
    for _ in range(iterations):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    u = a / (kernel @ v)
    return u[:, None] * kernel * v[None, :]


def reference_solver(solver, cost, **kwargs):
    return {"ipot": ipot_reference, "sinkhorn": sinkhorn_reference}[solver](cost, **kwargs)


def cosine_cost_reference(features, codebook):
    """1 - cosine (N, K) in numpy float64 from any (N, D) features and (K, D) codewords."""
    f = np.asarray(torch.as_tensor(features).detach().double().numpy())
    c = np.asarray(torch.as_tensor(codebook).detach().double().numpy())
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    return 1.0 - f @ c.T


def targets_reference(features, codebook, solver, **kwargs):
    """The float64 reference plan with each row normalised to a distribution over the codes (N x the plan for a
    converged plan)."""
    cost = cosine_cost_reference(features, codebook)
    plan = reference_solver(solver, cost, **kwargs)
    return torch.from_numpy(plan / plan.sum(axis=1, keepdims=True))


def cosine(x, y):
    """Cosine of two vectors (torch float64 scalars)."""
    return (x * y).sum() / (x.square().sum().sqrt() * y.square().sum().sqrt())


def code_prediction_loop_reference(student, codebook, targets, temperature):
    """-1/N sum_i sum_k t_ik log softmax_k(cos(s_i, c_k) / tau), written per sample and per code (torch float64
    scalars so that autograd gives the reference gradient)."""
    n, k = student.shape[0], codebook.shape[0]
    total = 0.0
    for i in range(n):
        logits = [cosine(student[i], codebook[j]) / temperature for j in range(k)]
        log_z = torch.logsumexp(torch.stack(logits), dim=0)
        total = total - sum(targets[i, j] * (logits[j] - log_z) for j in range(k))
    return total / n


def ot_cost_loop_reference(teacher, codebook, targets):
    """1/N sum_i sum_k (1 - cos(f_i, c_k)) t_ik, per sample and per code (torch float64 scalars)."""
    n, k = teacher.shape[0], codebook.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(k):
            total = total + (1.0 - cosine(teacher[i], codebook[j])) * targets[i, j]
    return total / n
