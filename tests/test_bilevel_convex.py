"""Convex inner problems through CvxpyLayer: exact (KKT) hypergradients of regularization weights.

The inner problem is a regularized least-squares fit written in CVXPY, with the regularization
weights as (nonnegative) ``cp.Parameter``\\ s; the outer loss is the validation error of its
solution. The layer differentiates the solution through the KKT conditions, so the hypergradient
is exact up to the solver tolerance:

* ridge (smooth): against the closed form, and against :func:`diffopt.bilevel.minimize` with
  :class:`~diffopt.bilevel.Implicit` on the same problem written in torch;
* lasso / elastic net (nonsmooth): against central differences of independent tight CVXPY solves,
  at points checked to be away from a change of support (where the hypergradient jumps).
"""

from __future__ import annotations

from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import pytest
import torch

import diffopt.bilevel as bl
from diffopt import CvxpyLayer, ProblemError

DT = torch.float64

# Every tolerance used below, in one place.
TOL = {
    "ridge_closed_form": 1e-5,  # layer hypergradient vs closed form (the bar)
    "lasso_fd": 1e-4,  # layer hypergradient vs central differences of tight solves
    "implicit_vs_layer": 1e-5,  # two exact routes to the same ridge hypergradient
    "off_support": 1e-9,  # |dL/dalpha_i| for a feature outside the lasso support (exactly 0)
}
LAYER_ARGS = {"tol": 1e-10}  # Clarabel gap / feasibility tolerance for the layer solves
FD_STEP = 1e-4  # central-difference step in the penalty
# Distance from a support change required before comparing with finite differences: nonzero
# coefficients at least this large, inactive correlations at most this fraction of the penalty.
SUPPORT_MARGIN = {"coef": 1e-2, "dual": 0.95}


@dataclass
class Data:
    """A small regression problem with a sparse ground truth, split into train and validation."""

    X: torch.Tensor
    y: torch.Tensor
    Xv: torch.Tensor
    yv: torch.Tensor

    @classmethod
    def make(cls, n: int = 40, m: int = 30, p: int = 6, seed: int = 0) -> Data:
        g = torch.Generator().manual_seed(seed)
        w_true = torch.randn(p, generator=g, dtype=DT) * (torch.arange(p) % 2 == 0)
        X = torch.randn(n, p, generator=g, dtype=DT)
        Xv = torch.randn(m, p, generator=g, dtype=DT)
        y = X @ w_true + torch.randn(n, generator=g, dtype=DT)
        yv = Xv @ w_true + torch.randn(m, generator=g, dtype=DT)
        return cls(X, y, Xv, yv)

    @property
    def p(self) -> int:
        return self.X.shape[1]

    def val_loss(self, w: torch.Tensor) -> torch.Tensor:
        """Outer loss: half the validation mean squared error (broadcasts over a batch of w)."""
        return 0.5 * ((w @ self.Xv.T - self.yv) ** 2).mean(-1)


@pytest.fixture(scope="module")
def data() -> Data:
    return Data.make()


def fit_term(data: Data, w: cp.Variable) -> cp.Expression:
    """The training loss 1/(2n) ||X w - y||^2 shared by every inner problem below."""
    n = data.X.shape[0]
    return cp.sum_squares(data.X.numpy() @ w - data.y.numpy()) / (2 * n)


# --------------------------------------------------------------------------------------------
# Ridge with one weight per feature:  f(w, lam) = 1/(2n)||Xw - y||^2 + 1/2 sum_i lam_i w_i^2.
#
# lam multiplies the parameter-free convex expression square(w) elementwise, which is DPP.
# (Writing it as sum_squares(multiply(sqrt(lam), w)) is not: sqrt(lam) is not parameter-affine.)
#
#   w* = (A + diag(lam))^{-1} b,  A = X^T X / n,  b = X^T y / n
#   dL/dlam_i = -(H^{-1} grad L(w*))_i w*_i,   H = A + diag(lam)
# --------------------------------------------------------------------------------------------


def ridge_layer(data: Data, scalar: bool = False) -> CvxpyLayer:
    w = cp.Variable(data.p)
    lam = cp.Parameter(() if scalar else data.p, nonneg=True)
    penalty = 0.5 * (lam * cp.sum_squares(w) if scalar else cp.sum(cp.multiply(lam, cp.square(w))))
    problem = cp.Problem(cp.Minimize(fit_term(data, w) + penalty))
    assert problem.is_dpp()
    return CvxpyLayer(problem, parameters=[lam], variables=[w], solver_args=LAYER_ARGS)


def ridge_closed_form(data: Data, lam: torch.Tensor) -> torch.Tensor:
    n = data.X.shape[0]
    lam_vec = lam.expand(data.p)
    H = data.X.T @ data.X / n + torch.diag(lam_vec)
    w = torch.linalg.solve(H, data.X.T @ data.y / n)
    g = data.Xv.T @ (data.Xv @ w - data.yv) / data.Xv.shape[0]
    grad = -torch.linalg.solve(H, g) * w
    return grad.sum() if lam.ndim == 0 else grad


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("scalar", [False, True], ids=["per-feature", "scalar"])
def test_ridge_hypergradient_matches_closed_form(data: Data, scalar: bool) -> None:
    layer = ridge_layer(data, scalar)
    g = torch.Generator().manual_seed(1)
    lam0 = 0.1 + torch.rand(data.p, generator=g, dtype=DT)
    if scalar:
        lam0 = torch.tensor(0.3, dtype=DT)
    lam = lam0.clone().requires_grad_()
    (w,) = layer(lam)
    data.val_loss(w).backward()
    assert layer.info is not None and all(s.ok for s in layer.info.status)
    assert lam.grad is not None
    assert rel_error(lam.grad, ridge_closed_form(data, lam0)) <= TOL["ridge_closed_form"]


def test_ridge_batch_of_penalties(data: Data) -> None:
    """A batch of penalty vectors in one call: each row gets its own closed-form hypergradient."""
    layer = ridge_layer(data)
    g = torch.Generator().manual_seed(2)
    lam = (0.05 + torch.rand(4, data.p, generator=g, dtype=DT)).requires_grad_()
    (w,) = layer(lam)
    assert w.shape == (4, data.p)
    data.val_loss(w).sum().backward()
    assert lam.grad is not None
    for i in range(4):
        want = ridge_closed_form(data, lam[i].detach())
        assert rel_error(lam.grad[i], want) <= TOL["ridge_closed_form"]


def test_ridge_gradcheck(data: Data) -> None:
    """torch's own finite-difference check of the layer, composed with the outer loss."""
    layer = ridge_layer(data)
    lam = torch.full((data.p,), 0.5, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: data.val_loss(layer(t)[0]), (lam,))


def test_non_dpp_penalty_is_rejected(data: Data) -> None:
    """The tempting sqrt form of a weighted ridge penalty is DCP but not DPP."""
    w = cp.Variable(data.p)
    lam = cp.Parameter(data.p, nonneg=True)
    penalty = 0.5 * cp.sum_squares(cp.multiply(cp.sqrt(lam), w))
    problem = cp.Problem(cp.Minimize(fit_term(data, w) + penalty))
    assert problem.is_dcp() and not problem.is_dpp()
    with pytest.raises(ProblemError, match=r"not DPP"):
        CvxpyLayer(problem, parameters=[lam], variables=[w])


def test_implicit_minimize_agrees_with_layer(data: Data) -> None:
    """The same smooth ridge problem, solved by gradient descent + Implicit and by the layer."""
    lam0 = torch.linspace(0.1, 1.0, data.p, dtype=DT)
    n = data.X.shape[0]

    def inner(w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((data.X @ w - data.y) ** 2).mean() + 0.5 * (lam * w * w).sum()

    lam_bl = lam0.clone().requires_grad_()
    L = float(torch.linalg.eigvalsh(data.X.T @ data.X / n).max()) + float(lam0.max())
    w_bl, info = bl.minimize(
        inner, torch.zeros(data.p, dtype=DT), lam_bl, steps=5000, lr=1.0 / L, tol=1e-12,
        backward=bl.Implicit(solver="cg", tol=1e-12), return_diagnostics=True,
    )
    data.val_loss(w_bl).backward()
    assert info.converged and info.linear_solve is not None and info.linear_solve.converged

    lam_cvx = lam0.clone().requires_grad_()
    (w_cvx,) = ridge_layer(data)(lam_cvx)
    data.val_loss(w_cvx).backward()

    assert lam_bl.grad is not None and lam_cvx.grad is not None
    assert rel_error(w_bl.detach(), w_cvx.detach()) <= TOL["implicit_vs_layer"]
    assert rel_error(lam_bl.grad, lam_cvx.grad) <= TOL["implicit_vs_layer"]


# --------------------------------------------------------------------------------------------
# Lasso / elastic net:  f(w, alpha, beta) = 1/(2n)||Xw - y||^2 + sum_i alpha_i |w_i|
#                                           + beta/2 ||w||^2.
#
# On a fixed support S with signs s, w*_S = (A_SS + beta I)^{-1}(b_S - alpha_S * s_S) and
# w*_i = 0 off S: the validation loss is smooth (quadratic in alpha) as long as S does not change,
# and dL/dalpha_i = 0 exactly for i outside S. The reference is central differences of
# independent CVXPY solves at tight tolerance, away from a support change.
# --------------------------------------------------------------------------------------------


class ElasticNet:
    """The CVXPY problem, its layer, and a tight independent reference solve."""

    def __init__(self, data: Data, scalar: bool) -> None:
        self.data = data
        self.w = cp.Variable(data.p)
        self.alpha = cp.Parameter(() if scalar else data.p, nonneg=True)
        self.beta = cp.Parameter(nonneg=True)
        l1 = cp.multiply(self.alpha, cp.abs(self.w))
        objective = fit_term(data, self.w) + cp.sum(l1) + 0.5 * self.beta * cp.sum_squares(self.w)
        self.problem = cp.Problem(cp.Minimize(objective))
        assert self.problem.is_dpp()
        self.layer = CvxpyLayer(self.problem, parameters=[self.alpha, self.beta],
                                variables=[self.w], solver_args=LAYER_ARGS)

    def reference(self, alpha: np.ndarray, beta: float) -> np.ndarray:
        self.alpha.value, self.beta.value = alpha, beta
        self.problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12,
                           tol_feas=1e-12, max_iter=500)
        assert self.problem.status == cp.OPTIMAL
        return np.asarray(self.w.value)

    def ref_loss(self, alpha: np.ndarray, beta: float) -> float:
        w = torch.as_tensor(self.reference(alpha, beta), dtype=DT)
        return float(self.data.val_loss(w))

    def assert_away_from_support_change(self, alpha: np.ndarray, beta: float) -> np.ndarray:
        """Check strict complementarity at the reference solution; return the support mask."""
        w = self.reference(alpha, beta)
        d = self.data
        X, y = d.X.numpy(), d.y.numpy()
        corr = np.abs(X.T @ (y - X @ w) / X.shape[0] - beta * w)  # = alpha_i on the support
        support = np.abs(w) > 1e-6
        alpha_vec = np.broadcast_to(alpha, w.shape)
        assert support.any() and not support.all(), "choose penalties with a nontrivial support"
        assert np.abs(w[support]).min() >= SUPPORT_MARGIN["coef"]
        assert (corr[~support] / alpha_vec[~support]).max() <= SUPPORT_MARGIN["dual"]
        return support


def central_difference(fun, x: np.ndarray, h: float) -> np.ndarray:
    """Central differences of a scalar function of an array, one coordinate at a time."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        grad[i] = (fun(x + e) - fun(x - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("beta0", [0.0, 0.2], ids=["lasso", "elastic-net"])
@pytest.mark.parametrize("scalar", [False, True], ids=["per-feature", "scalar"])
def test_lasso_hypergradient_matches_finite_differences(
    data: Data, scalar: bool, beta0: float
) -> None:
    net = ElasticNet(data, scalar)
    alpha0 = np.array(0.18) if scalar else np.linspace(0.05, 0.25, data.p)
    support = net.assert_away_from_support_change(alpha0, beta0)

    alpha = torch.tensor(alpha0, dtype=DT, requires_grad=True)
    beta = torch.tensor(beta0, dtype=DT, requires_grad=True)
    (w,) = net.layer(alpha, beta)
    data.val_loss(w).backward()
    assert net.layer.info is not None and all(s.ok for s in net.layer.info.status)
    assert alpha.grad is not None and beta.grad is not None
    np.testing.assert_array_equal(w.detach().abs().numpy() > 1e-6, support)

    fd_alpha = central_difference(lambda a: net.ref_loss(a, beta0), alpha0, FD_STEP)
    assert rel_error(alpha.grad, torch.as_tensor(fd_alpha)) <= TOL["lasso_fd"]
    if not scalar:
        assert alpha.grad[~torch.as_tensor(support)].abs().max() <= TOL["off_support"]
    if beta0 > 0:  # beta = 0 sits on the boundary of beta >= 0: no central difference there
        fd_beta = central_difference(lambda b: net.ref_loss(alpha0, float(b)),
                                     np.array(beta0), FD_STEP)
        assert rel_error(beta.grad, torch.as_tensor(fd_beta)) <= TOL["lasso_fd"]


@pytest.mark.slow
def test_lasso_example_runs(tmp_path) -> None:
    """examples/lasso_hyperparameter.py runs end to end with tiny settings."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out, fig = tmp_path / "out.json", tmp_path / "fig.png"
    cmd = [sys.executable, str(root / "examples" / "lasso_hyperparameter.py"), "--json", str(out),
           "--figure", str(fig), "--outer-steps", "3", "--grid", "5"]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["grid"]["val_loss"] and fig.stat().st_size > 0
