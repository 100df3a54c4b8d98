"""IPOT and Sinkhorn plans (CODIS): marginals, and convergence to the exact assignment."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from vlalign.losses import ipot, sinkhorn


def _cost(rows, cols, seed, dtype=torch.float64):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("solver, kwargs", [
    (ipot, dict(beta=0.5, iterations=50)),               # CODIS's setting
    (sinkhorn, dict(epsilon=0.05, iterations=200)),
])
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
    for plan in (ipot(cost, iterations=300, row_marginal=a, column_marginal=b),
                 sinkhorn(cost, epsilon=0.05, iterations=500, row_marginal=a, column_marginal=b)):
        assert torch.allclose(plan.sum(1), a, atol=1e-6) and torch.allclose(plan.sum(0), b, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("solver, kwargs", [
    (ipot, dict(beta=0.1, iterations=500)),
    (sinkhorn, dict(epsilon=0.005, iterations=3000)),
])
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
