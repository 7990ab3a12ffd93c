"""Bring-your-own inner solver, learnable inner hyperparameters, captured tensors, Neumann."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

import diffopt.bilevel as bl

D = torch.float64


class Ridge:
    """Ridge regression with penalty ``lam``; closed-form solution and hypergradient."""

    def __init__(self, n: int = 60, p: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, p, generator=g, dtype=D)
        self.y = self.X @ torch.randn(p, generator=g, dtype=D) + 0.3 * torch.randn(
            n, generator=g, dtype=D
        )
        self.Xv = torch.randn(n // 2, p, generator=g, dtype=D)
        self.yv = torch.randn(n // 2, generator=g, dtype=D)
        self.p = p

    def inner(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.X @ w - self.y) ** 2).mean() + 0.5 * lam * (w**2).sum()

    def grad_inner(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return self.X.T @ (self.X @ w - self.y) / len(self.y) + lam * w

    def hessian(self, lam: torch.Tensor) -> torch.Tensor:
        return self.X.T @ self.X / len(self.y) + lam * torch.eye(self.p, dtype=D)

    def solve(self, lam: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.hessian(lam), self.X.T @ self.y / len(self.y))

    def outer(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).sum()

    def hypergradient(self, lam: float) -> float:
        """dL/dlam = -g^T A^{-1} w*, differentiated by hand (no autograd)."""
        lam_t = torch.tensor(lam, dtype=D)
        w = self.solve(lam_t)
        g = self.Xv.T @ (self.Xv @ w - self.yv)
        return float(-g @ torch.linalg.solve(self.hessian(lam_t), w))


@pytest.fixture
def ridge() -> Ridge:
    return Ridge()


def _lam(value: float = 0.3) -> torch.Tensor:
    return torch.tensor(value, dtype=D, requires_grad=True)


# --- 1. bring your own solver -------------------------------------------------------------


@pytest.mark.parametrize(
    "backward,symmetric",
    [(bl.Implicit(solver="cg"), True), (bl.Implicit(solver="direct"), False),
     (bl.Implicit(solver="neumann"), False)],
)
def test_custom_root_closed_form_ridge_is_exact(ridge: Ridge, backward, symmetric) -> None:
    @bl.custom_root(ridge.grad_inner, backward=backward, symmetric=symmetric)
    def solver(lam):
        return ridge.solve(lam)

    lam = _lam()
    ridge.outer(solver(lam)).backward()
    assert lam.grad.item() == pytest.approx(ridge.hypergradient(0.3), rel=1e-9, abs=1e-12)


def test_argmin_scipy_lbfgsb(ridge: Ridge) -> None:
    lam = _lam()

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        w = torch.from_numpy(x).requires_grad_()
        loss = ridge.inner(w, lam.detach())
        (g,) = torch.autograd.grad(loss, w)
        return float(loss.detach()), g.numpy()

    res = scipy.optimize.minimize(
        fun, np.zeros(ridge.p), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 0}
    )
    w, diag = bl.argmin(ridge.inner, torch.from_numpy(res.x), lam, return_diagnostics=True)
    ridge.outer(w).backward()
    assert diag.steps == 0 and diag.converged
    assert diag.linear_solve.converged
    assert lam.grad.item() == pytest.approx(ridge.hypergradient(0.3), rel=1e-7)


def test_fixed_point_linear_map_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 5, generator=g, dtype=D)
    A = 0.6 * A / torch.linalg.matrix_norm(A, ord=2)  # a contraction, not symmetric
    c = torch.randn(5, generator=g, dtype=D)
    theta = torch.randn(5, generator=g, dtype=D, requires_grad=True)

    def T(w, theta):
        return A @ w + torch.tanh(theta)

    w = torch.zeros(5, dtype=D)
    with torch.no_grad():
        for _ in range(200):
            w = T(w, theta)
    (c @ bl.fixed_point(T, w, theta)).backward()
    # w* = (I - A)^{-1} tanh(theta): dL/dtheta = (1 - tanh^2) * (I - A)^{-T} c
    I_minus_A = torch.eye(5, dtype=D) - A
    exact = (1 - torch.tanh(theta.detach()) ** 2) * torch.linalg.solve(I_minus_A.T, c)
    torch.testing.assert_close(theta.grad, exact, rtol=1e-8, atol=1e-12)


def test_root_and_argmin_gradcheck(ridge: Ridge) -> None:
    def via_root(lam):
        return bl.root(ridge.grad_inner, ridge.solve(lam.detach()), lam,
                       backward=bl.Implicit(solver="direct"))

    def via_argmin(lam):
        return bl.argmin(ridge.inner, ridge.solve(lam.detach()), lam)

    lam = _lam()
    assert torch.autograd.gradcheck(via_root, (lam,))
    assert torch.autograd.gradcheck(via_argmin, (lam,))


def test_minimize_steps_zero_takes_init_as_solution(ridge: Ridge) -> None:
    lam = _lam()
    w = bl.minimize(ridge.inner, ridge.solve(lam.detach()), lam, steps=0, lr=0.1)
    ridge.outer(w).backward()
    assert lam.grad.item() == pytest.approx(ridge.hypergradient(0.3), rel=1e-9)


def test_minimize_torch_lbfgs(ridge: Ridge) -> None:
    lam = _lam()
    w, diag = bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=D), lam, steps=10, lr=1.0,
                          optimizer=torch.optim.LBFGS, tol=1e-10,
                          optimizer_options={"line_search_fn": "strong_wolfe",
                                             "tolerance_grad": 1e-14, "tolerance_change": 0.0},
                          return_diagnostics=True)
    ridge.outer(w).backward()
    assert diag.converged and diag.steps < 10
    assert lam.grad.item() == pytest.approx(ridge.hypergradient(0.3), rel=1e-7)


def test_root_errors(ridge: Ridge) -> None:
    lam = _lam()
    w = ridge.solve(lam.detach())
    with pytest.raises(ValueError, match=r"'cg'\) needs a symmetric Jacobian.*symmetric=True"):
        bl.root(ridge.grad_inner, w, lam, backward=bl.Implicit(solver="cg"))
    with pytest.raises(ValueError, match=r"shaped like the solution, \[\(8,\)\]; received"):
        bl.root(lambda w, lam: w.sum() - lam, w, lam)
    with pytest.raises(TypeError, match=r"backward must be Implicit\(...\).*Unrolled"):
        bl.argmin(ridge.inner, w, lam, backward=bl.Unrolled())
    with pytest.raises(TypeError, match=r"backward must be an Implicit\(...\) strategy"):
        bl.fixed_point(lambda w, lam: w, w, lam, backward=bl.Truncated(2))
    with pytest.raises(ValueError, match=r"fixed_point cannot use Implicit\(solver='cg'\).*argmin"):
        bl.fixed_point(lambda w, lam: w, w, lam, backward=bl.Implicit(solver="cg"))
    with pytest.warns(bl.NotConvergedWarning, match=r"residual norm is .* > .*stationarity_tol"):
        bl.root(ridge.grad_inner, w + 0.1, lam)


# --- 2. learnable inner hyperparameters -------------------------------------------------


def _hand_unrolled(ridge: Ridge, lam, lr, momentum, steps: int) -> torch.Tensor:
    w = torch.zeros(ridge.p, dtype=D)
    buf = torch.zeros_like(w)
    for _ in range(steps):
        buf = momentum * buf + ridge.grad_inner(w, lam)
        w = w - lr * buf
    return ridge.outer(w)


def test_tensor_lr_and_momentum_unrolled_match_hand_loop_and_fd(ridge: Ridge) -> None:
    lam, lr, mom = _lam(), _lam(0.2), _lam(0.5)
    w = bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=D), lam, steps=15, lr=lr,
                    optimizer="sgd", optimizer_options={"momentum": mom}, backward=bl.Unrolled())
    grads = torch.autograd.grad(ridge.outer(w), (lam, lr, mom))
    hand = torch.autograd.grad(_hand_unrolled(ridge, lam, lr, mom, 15), (lam, lr, mom))
    for a, b in zip(grads, hand):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    eps = 1e-6
    with torch.no_grad():
        fd_lr = (_hand_unrolled(ridge, lam, lr + eps, mom, 15)
                 - _hand_unrolled(ridge, lam, lr - eps, mom, 15)) / (2 * eps)
        fd_mom = (_hand_unrolled(ridge, lam, lr, mom + eps, 15)
                  - _hand_unrolled(ridge, lam, lr, mom - eps, 15)) / (2 * eps)
    assert grads[1].item() == pytest.approx(fd_lr.item(), rel=1e-6, abs=1e-8)
    assert grads[2].item() == pytest.approx(fd_mom.item(), rel=1e-6, abs=1e-8)
    assert grads[1].abs() > 1e-3  # the step size matters after 15 steps


def test_tensor_lr_truncated_gets_gradient_of_last_steps(ridge: Ridge) -> None:
    lam, lr = _lam(), _lam(0.2)
    w = bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=D), lam, steps=12, lr=lr,
                    backward=bl.Truncated(4))
    (g_lr,) = torch.autograd.grad(ridge.outer(w), lr)

    def truncated(lr_value):
        w = torch.zeros(ridge.p, dtype=D)
        with torch.no_grad():
            for _ in range(8):
                w = w - 0.2 * ridge.grad_inner(w, lam)
        for _ in range(4):
            w = w - lr_value * ridge.grad_inner(w, lam.detach())
        return ridge.outer(w)

    eps = 1e-6
    fd = (truncated(0.2 + eps) - truncated(0.2 - eps)) / (2 * eps)
    assert g_lr.item() == pytest.approx(fd.item(), rel=1e-6)


def test_learnable_lr_under_implicit_raises(ridge: Ridge) -> None:
    with pytest.raises(ValueError, match=r"lr require\(s\) grad.*zero by the implicit function"):
        bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=D), _lam(), steps=5, lr=_lam(0.2))
    with pytest.raises(ValueError, match=r"momentum require\(s\) grad.*Unrolled\(\)"):
        bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=D), _lam(), steps=5, lr=0.2,
                    optimizer="sgd", optimizer_options={"momentum": _lam(0.5)})
    with pytest.raises(ValueError, match=r"positive floating-point scalar tensor.*shape \(2,\)"):
        bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=D), _lam(), steps=5,
                    lr=torch.ones(2, dtype=D), backward=bl.Unrolled())


# --- 3. tensors captured by the inner function ------------------------------------------

SHIFT = torch.tensor(1.0, dtype=D, requires_grad=True)


def test_captured_closure_tensor_warns_under_implicit_only(ridge: Ridge) -> None:
    scale = torch.tensor(2.0, dtype=D, requires_grad=True)

    def inner(w, lam):
        return ridge.inner(w, lam) + scale * (w**2).sum()

    kwargs = dict(steps=300, lr=0.2)
    with pytest.warns(bl.CapturedTensorWarning, match=r"not in hparams: scale\..*Pass them"):
        bl.minimize(inner, torch.zeros(ridge.p, dtype=D), _lam(), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = bl.minimize(inner, torch.zeros(ridge.p, dtype=D), _lam(), backward=bl.Unrolled(),
                        **kwargs)
        # passed through hparams instead: no warning, and the gradient arrives
        both = (_lam(), scale)
        w = bl.minimize(lambda w, h: ridge.inner(w, h[0]) + h[1] * (w**2).sum(),
                        torch.zeros(ridge.p, dtype=D), both, **kwargs)
    ridge.outer(w).backward()
    assert scale.grad is not None and scale.grad != 0


def test_captured_global_and_module_warn(ridge: Ridge) -> None:
    def inner(w, lam):
        return ridge.inner(w, lam) + SHIFT * w.sum()

    with pytest.warns(bl.CapturedTensorWarning, match=r"SHIFT"):
        bl.argmin(inner, torch.zeros(ridge.p, dtype=D), _lam(),
                  backward=bl.Implicit(stationarity_tol=float("inf")))

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor(0.1, dtype=D))

        def loss(self, w, lam):
            return ridge.inner(w, lam) + self.weight * (w**2).sum()

    with pytest.warns(bl.CapturedTensorWarning, match=r"self\.weight"):
        bl.argmin(Inner().loss, torch.zeros(ridge.p, dtype=D), _lam(),
                  backward=bl.Implicit(stationarity_tol=float("inf")))


# --- 4. Neumann defaults ----------------------------------------------------------------


def _conditioned_ridge() -> Ridge:
    """p = 100 ridge whose Hessian has condition number ~66 at lam = 0.01."""
    ridge = Ridge(n=500, p=100, seed=3)
    ridge.X = ridge.X * torch.logspace(0, -1, 100, dtype=D)
    return ridge


def test_neumann_default_reaches_cg_accuracy_on_ridge() -> None:
    ridge = _conditioned_ridge()
    exact = ridge.hypergradient(0.01)
    errors = {}
    for solver in ("cg", "neumann"):
        lam = _lam(0.01)
        w, diag = bl.argmin(ridge.inner, ridge.solve(lam.detach()), lam,
                            backward=bl.Implicit(solver=solver), return_diagnostics=True)
        ridge.outer(w).backward()
        assert diag.linear_solve.converged
        errors[solver] = abs(lam.grad.item() - exact) / abs(exact)
    assert errors["cg"] < 1e-9 and errors["neumann"] < 1e-9, errors


def test_neumann_warns_when_budget_too_small() -> None:
    ridge = _conditioned_ridge()
    lam = _lam(0.01)
    w = bl.argmin(ridge.inner, ridge.solve(lam.detach()), lam,
                  backward=bl.Implicit(solver="neumann", maxiter=100))
    with pytest.warns(bl.NotConvergedWarning, match=r"solver='neumann'.*Raise Implicit\(maxiter"):
        ridge.outer(w).backward()
    # the old 100-product default: several percent off, hence the warning
    assert abs(lam.grad.item() - ridge.hypergradient(0.01)) > 0.01 * abs(lam.grad.item())


# --- warm-started implicit solves -------------------------------------------------------


def test_warm_start_saves_products_with_the_same_hypergradient() -> None:
    ridge = _conditioned_ridge()
    warm = bl.Implicit(solver="cg", maxiter=1000, warm_start=bl.WarmStart())
    cold = bl.Implicit(solver="cg", maxiter=1000)
    used = {"warm": [], "cold": []}
    for value in (0.05, 0.0501):  # two nearby outer iterates
        for name, strategy in (("warm", warm), ("cold", cold)):
            lam = _lam(value)
            w, diag = bl.argmin(ridge.inner, ridge.solve(lam.detach()), lam, backward=strategy,
                                return_diagnostics=True)
            ridge.outer(w).backward()
            assert lam.grad.item() == pytest.approx(ridge.hypergradient(value), rel=1e-8)
            used[name].append(diag.linear_solve.iterations)
    assert used["warm"][0] == used["cold"][0]  # nothing stored yet: a cold start
    assert used["warm"][1] < used["cold"][1], used


def _batched_ridge(B: int = 5, n: int = 40, p: int = 6, seed: int = 3):
    """B independent ridge problems, one penalty each; closed-form solutions and hypergradients."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, p, generator=g, dtype=D)
    y = torch.randn(B, n, generator=g, dtype=D)
    target = torch.randn(B, p, generator=g, dtype=D)
    lam = torch.linspace(0.1, 2.0, B, dtype=D)

    def grad_inner(w, lam):
        return torch.einsum("bnp,bn->bp", X, torch.einsum("bnp,bp->bn", X, w) - y) / n \
            + lam[:, None] * w

    def inner(w, lam):  # a sum of per-problem losses
        r = torch.einsum("bnp,bp->bn", X, w) - y
        return 0.5 * (r**2).mean(1).sum() + 0.5 * (lam * (w**2).sum(1)).sum()

    H = X.mT @ X / n + lam[:, None, None] * torch.eye(p, dtype=D)
    w = torch.linalg.solve(H, (X.mT @ y[..., None] / n)).squeeze(-1)
    # L = 1/2 sum_b ||w_b - t_b||^2: dL/dlam_b = -(w_b - t_b)^T H_b^{-1} w_b
    exact = -((w - target) * torch.linalg.solve(H, w[..., None]).squeeze(-1)).sum(1)
    return lam, w, target, grad_inner, inner, exact


@pytest.mark.parametrize("how", ["root", "argmin", "custom_root"])
def test_batched_direct_takes_per_problem_products_and_matches_closed_form(how: str) -> None:
    lam, w, target, grad_inner, inner, exact = _batched_ridge()
    lam = lam.clone().requires_grad_(True)
    direct = bl.Implicit(solver="direct")
    if how == "root":
        out, diag = bl.root(grad_inner, w, lam, backward=direct, symmetric=True, batched=True,
                            return_diagnostics=True)
    elif how == "argmin":
        out, diag = bl.argmin(inner, w, lam, backward=direct, batched=True,
                              return_diagnostics=True)
    else:
        solver = bl.custom_root(grad_inner, backward=direct, symmetric=True, batched=True)(
            lambda lam: w)
        out, diag = solver(lam), None
    (0.5 * ((out - target) ** 2).sum()).backward()
    assert torch.allclose(lam.grad, exact, rtol=1e-10, atol=1e-13)
    if diag is not None:  # the 6 variables of one problem, not the 30 of the stack
        assert diag.linear_solve.iterations == w.shape[1]


def test_batched_matches_unbatched_for_every_solver() -> None:
    lam, w, target, grad_inner, _, exact = _batched_ridge()
    eta = 0.2  # a gradient step: a contraction, so Neumann converges too

    def step(w, lam):
        return w - eta * grad_inner(w, lam)

    for backward in (bl.Implicit(solver="direct"), bl.Implicit(solver="neumann", alpha=1.0)):
        grads = []
        for batched in (True, False):
            lam_b = lam.clone().requires_grad_(True)
            out = bl.fixed_point(step, w, lam_b, backward=backward, batched=batched)
            (0.5 * ((out - target) ** 2).sum()).backward()
            grads.append(lam_b.grad)
        assert torch.allclose(grads[0], grads[1], rtol=1e-8, atol=1e-12)
        assert torch.allclose(grads[0], exact, rtol=1e-8, atol=1e-12)


def test_batched_needs_a_common_leading_dimension() -> None:
    a = torch.tensor(2.0, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="batched=True needs every solution tensor to lead"):
        bl.root(lambda w, a: (w[0] - a, w[1] - a), (torch.full((3, 2), 2.0, dtype=D),
                torch.full((4,), 2.0, dtype=D)), a, batched=True)
    with pytest.raises(ValueError, match=r"received shapes \[\(\)\]"):
        bl.root(lambda w, a: w - a, torch.tensor(2.0, dtype=D), a, batched=True)
