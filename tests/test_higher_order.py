"""Second and higher derivatives through the layers, in float64.

The backward and jvp rules of the solve are differentiable (their derivative is again a solve
with the same factorization), exact where the projection Jacobian ``D`` is locally constant: LPs
and QPs at strictly complementary solutions. References: central finite differences of the
(exact, first-order) gradient. Elsewhere, differentiating a derivative raises.
"""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch
from torch.func import jacfwd, jacrev

from diffopt import (
    LPGD,
    CvxpyLayer,
    LogBarrier,
    Perturbed,
    ProblemError,
    QPLayer,
    QuadraticSmoothing,
)
from problems import rel_err

#: Tolerances, in one place: relative errors against central differences of the gradient
#: (step 1e-5 on tight solves: O(eps²) truncation and O(tol/eps) solution noise).
TOL_FD = 1e-6
EPS = 1e-5
SOLVERS = {"native": {"tol": 1e-12}, "clarabel": {"tol": 1e-12}}

N, M, E = 3, 4, 1  # variables, inequalities, equalities


def _qp_point():
    """A QP ``min ½xᵀPx + qᵀx, Gx ≤ h, Ax = b`` with two active inequalities (strictly
    complementary), its data packed into one vector ``θ``."""
    gen = torch.Generator().manual_seed(3)
    L = torch.randn(N, N, generator=gen, dtype=torch.float64)
    q = torch.randn(N, generator=gen, dtype=torch.float64)
    G = torch.randn(M, N, generator=gen, dtype=torch.float64)
    h = torch.rand(M, generator=gen, dtype=torch.float64) * 0.1
    A = torch.randn(E, N, generator=gen, dtype=torch.float64)
    b = torch.randn(E, generator=gen, dtype=torch.float64)
    return torch.cat([L.flatten(), q, G.flatten(), h, A.flatten(), b])


def _qp_loss(solver: str):
    layer = QPLayer(solver=solver, solver_args=SOLVERS[solver])
    w = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)

    def loss(theta):
        sizes = [N * N, N, M * N, M, E * N, E]
        L, q, G, h, A, b = torch.split(theta, sizes)
        L = L.reshape(N, N)
        P = L @ L.T + torch.eye(N, dtype=theta.dtype)
        x = layer(P, q, G.reshape(M, N), h, A.reshape(E, N), b)
        return (w * x).sum() + (x * x).sum()

    return loss, layer


def _lp_loss():
    """An LP through CvxpyLayer whose vertex moves with the constraint data: ``x = A_act⁻¹ b``."""
    x = cp.Variable(2)
    A = cp.Parameter((4, 2))
    b = cp.Parameter(4)
    prob = cp.Problem(cp.Minimize(-x[0] - 2 * x[1]), [A @ x <= b])
    layer = CvxpyLayer(prob, [A, b], [x], solver_args={"tol": 1e-12})

    def loss(theta):
        (sol,) = layer(theta[:8].reshape(4, 2), theta[8:])
        return sol[0] * sol[1] + sol.sum()

    A0 = torch.tensor([[1.0, 0.3], [0.2, 1.0], [-1.0, 0.1], [0.1, -1.0]], dtype=torch.float64)
    b0 = torch.tensor([1.0, 1.2, 1.0, 1.0], dtype=torch.float64)
    return loss, torch.cat([A0.flatten(), b0])


def _fd_hessian(loss, theta):
    """Central differences of the first-order gradient, column by column."""
    def grad(t):
        t = t.detach().requires_grad_()
        return torch.autograd.grad(loss(t), t)[0]

    cols = []
    for k in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[k] = EPS
        cols.append((grad(theta + e) - grad(theta - e)) / (2 * EPS))
    return torch.stack(cols, 1)


def _hessians(loss, theta):
    """The Hessian by each route torch offers."""
    return {
        "autograd.functional": torch.autograd.functional.hessian(loss, theta),
        "jacrev(jacrev)": jacrev(jacrev(loss))(theta),
        "jacfwd(jacrev)": jacfwd(jacrev(loss))(theta),
        "jacrev(jacfwd)": jacrev(jacfwd(loss))(theta),
    }


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_qp_hessian_matches_finite_differences(solver):
    loss, layer = _qp_loss(solver)
    theta = _qp_point()
    H_fd = _fd_hessian(loss, theta)
    assert H_fd.norm() > 1e-1
    for route, H in _hessians(loss, theta).items():
        assert rel_err(H, H_fd) < TOL_FD, route


def test_qp_point_has_active_and_inactive_constraints():
    """The point above is not trivial: some inequalities bind, some do not."""
    loss, layer = _qp_loss("native")
    layer.duals = True
    theta = _qp_point()
    sizes = [N * N, N, M * N, M, E * N, E]
    L, q, G, h, A, b = torch.split(theta, sizes)
    L = L.reshape(N, N)
    _, _, lam = layer(L @ L.T + torch.eye(N, dtype=theta.dtype), q, G.reshape(M, N), h,
                      A.reshape(E, N), b)
    assert 0 < int((lam > 1e-6).sum()) < M


def test_forward_over_forward_refused():
    loss, _ = _qp_loss("native")
    with pytest.raises(ProblemError, match=r"jacfwd\(jacfwd"):
        jacfwd(jacfwd(loss))(_qp_point())


def test_qp_hessian_of_the_duals():
    """The multipliers' second derivatives go through ``D`` and the adjoint's ``g_y`` too."""
    layer = QPLayer(duals=True, solver_args=SOLVERS["native"])
    sizes = [N * N, N, M * N, M, E * N, E]

    def loss(theta):
        L, q, G, h, A, b = torch.split(theta, sizes)
        L = L.reshape(N, N)
        P = L @ L.T + torch.eye(N, dtype=theta.dtype)
        _, nu, lam = layer(P, q, G.reshape(M, N), h, A.reshape(E, N), b)
        return (lam**2).sum() + nu.sum() * lam.sum()

    theta = _qp_point()
    H_fd = _fd_hessian(loss, theta)
    assert H_fd.norm() > 1e-1
    for route, H in _hessians(loss, theta).items():
        assert rel_err(H, H_fd) < TOL_FD, route


def test_lp_hessian_in_constraint_data():
    loss, theta = _lp_loss()
    H_fd = _fd_hessian(loss, theta)
    assert H_fd.norm() > 1e-1
    for route, H in _hessians(loss, theta).items():
        assert rel_err(H, H_fd) < TOL_FD, route


def test_quadratic_smoothing_hessian():
    """An LP under QuadraticSmoothing is a QP: its second derivative in the cost is exact."""
    x = cp.Variable(3)
    c = cp.Parameter(3)
    lp = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
    layer = CvxpyLayer(lp, [c], [x], gradient=QuadraticSmoothing(0.5),
                       solver_args={"tol": 1e-12})

    def loss(cost):
        (sol,) = layer(cost)
        return (sol**3).sum()

    theta = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64)
    H_fd = _fd_hessian(loss, theta)
    assert H_fd.norm() > 1e-1
    for route, H in _hessians(loss, theta).items():
        assert rel_err(H, H_fd) < TOL_FD, route


def test_double_backward_hessian_vector_product():
    """``grad(⟨grad f, v⟩)``, the form MAML uses, against ``(∇f(θ + εv) − ∇f(θ − εv)) / 2ε``."""
    loss, _ = _qp_loss("native")
    theta = _qp_point().requires_grad_()
    v = torch.linspace(-1.0, 1.0, theta.numel(), dtype=torch.float64)
    (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    (hvp,) = torch.autograd.grad(g @ v, theta)

    def grad(t):
        t = t.detach().requires_grad_()
        return torch.autograd.grad(loss(t), t)[0]

    ref = (grad(theta + EPS * v) - grad(theta - EPS * v)) / (2 * EPS)
    assert rel_err(hvp, ref) < TOL_FD


def test_third_order_matches_finite_differences():
    """The derivative's derivative is a solve again, so the next order is exact too."""
    loss, _ = _qp_loss("native")
    theta = _qp_point()
    v = torch.linspace(1.0, -1.0, theta.numel(), dtype=torch.float64)

    def curvature(t):  # vᵀ H(t) v
        return v @ jacrev(jacrev(loss))(t) @ v

    third = jacrev(curvature)(theta)
    ref = torch.stack([(curvature(theta + EPS * e) - curvature(theta - EPS * e)) / (2 * EPS)
                       for e in torch.eye(theta.numel(), dtype=torch.float64)])
    assert rel_err(third, ref) < 1e-5


def _softmax_loss():
    x = cp.Variable(4)
    c = cp.Parameter(4)
    prob = cp.Problem(cp.Maximize(c @ x + cp.sum(cp.entr(x))), [cp.sum(x) == 1])
    layer = CvxpyLayer(prob, [c], [x])
    w = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    return lambda c: (w * layer(c)[0]).sum()


def _soc_loss():
    x = cp.Variable(3)
    z = cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [cp.norm(x[:2]) <= x[2]])
    layer = CvxpyLayer(prob, [z], [x])
    return lambda z: layer(z)[0].pow(2).sum()


@pytest.mark.parametrize("make, point, cone", [
    (_softmax_loss, [0.3, -0.2, 0.5, 0.1], "exp"),
    (_soc_loss, [1.0, 0.5, 0.2], "soc"),
])
@pytest.mark.parametrize("route", ["hessian", "jacrev(jacrev)", "jacfwd(jacrev)",
                                   "double backward"])
def test_curved_cones_refuse_second_order(make, point, cone, route):
    """Where ``D`` moves with the solution the second derivative is refused, never zero."""
    loss = make()
    theta = torch.tensor(point, dtype=torch.float64)
    run = {
        "hessian": lambda: torch.autograd.functional.hessian(loss, theta),
        "jacrev(jacrev)": lambda: jacrev(jacrev(loss))(theta),
        "jacfwd(jacrev)": lambda: jacfwd(jacrev(loss))(theta),
        "double backward": lambda: torch.autograd.grad(
            torch.autograd.grad(loss(theta.requires_grad_()), theta, create_graph=True)[0].sum(),
            theta),
    }[route]
    with pytest.raises(ProblemError, match=f"second-order derivatives .* {cone} cone"):
        run()
    # first order is untouched: jacrev alone and create_graph without a second pass work
    assert torch.isfinite(jacrev(loss)(theta)).all()


def test_log_barrier_refuses_second_order():
    layer = QPLayer(gradient=LogBarrier(0.1))
    P = torch.eye(2, dtype=torch.float64)
    G, h = torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)

    def f(p):
        return layer(P * p[0], p[1:], G, h).pow(2).sum()

    with pytest.raises(ProblemError, match="log-barrier derivative"):
        torch.autograd.functional.hessian(f, torch.tensor([1.0, -2.0, 0.5],
                                                          dtype=torch.float64))


@pytest.mark.parametrize("mode", [LPGD(tau=0.5), Perturbed(sigma=0.5, samples=4, seed=0)])
def test_surrogate_gradients_refuse_second_order(mode):
    x = cp.Variable(3)
    c = cp.Parameter(3)
    lp = cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0])
    layer = CvxpyLayer(lp, [c], [x], gradient=mode)
    cost = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
    (sol,) = layer(cost)
    (g,) = torch.autograd.grad(sol.pow(2).sum(), cost, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order derivatives .* surrogate"):
        torch.autograd.grad(g.sum(), cost)
