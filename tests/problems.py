"""Canonical problems with closed-form solutions, shared by the conformance tests.

Each case builds a CVXPY problem, samples parameter values, and computes the reference solution
in plain torch (so autograd gives the reference gradient independently of diffopt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cvxpy as cp
import numpy as np
import torch

#: Tolerances, in one place. Relative errors of solutions and VJPs against references.
TOL = {
    "clarabel": 1e-6,
    "ecos": 1e-6,
    "native": 1e-6,
    "scs": 1e-3,  # first-order solver: solutions only as accurate as its stopping rule
}
#: Solver options used by the conformance suite (tight, so gradients are exact to TOL).
SOLVER_ARGS = {
    "clarabel": {"tol": 1e-12},
    "ecos": {"tol": 1e-10},
    "native": {},
    "scs": {"tol": 1e-8, "max_iters": 20000},
}


@dataclass
class Case:
    name: str
    build: Callable  # () -> (problem, params, variables)
    sample: Callable  # (rng, B) -> list of float64 tensors
    reference: Callable  # (*tensors) -> tuple of outputs
    quadratic: bool
    cones: frozenset


def _sparsemax(z: torch.Tensor) -> torch.Tensor:
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    css = zs.cumsum(-1) - 1
    rho = ((zs - css / k) > 0).sum(-1, keepdim=True)
    tau = css.gather(-1, rho - 1) / rho
    return torch.clamp(z - tau, min=0)


def _proj_soc(v: torch.Tensor) -> torch.Tensor:
    t, u = v[..., :1], v[..., 1:]
    nu = u.norm(dim=-1, keepdim=True)
    mid = torch.cat([(t + nu) / 2, (t + nu) / (2 * nu) * u], -1)
    inside = (nu <= t).expand_as(v)
    polar = (nu <= -t).expand_as(v)
    return torch.where(inside, v, torch.where(polar, torch.zeros_like(v), mid))


def _proj_psd(Z: torch.Tensor) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(Z)
    return Q @ torch.diag_embed(lam.clamp(min=0)) @ Q.transpose(-1, -2)


def _rng_vec(rng, B, *shape):
    return torch.as_tensor(rng.standard_normal((B, *shape)))


def softmax_case(n=4):
    def build():
        x, z = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Maximize(z @ x + cp.sum(cp.entr(x))), [cp.sum(x) == 1])
        return prob, [z], [x]

    return Case("softmax_entropy", build, lambda rng, B: [_rng_vec(rng, B, n)],
                lambda z: (torch.softmax(z, -1),), False, frozenset({"zero", "exp"}))


def sparsemax_case(n=5):
    def build():
        x, z = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [cp.sum(x) == 1, x >= 0])
        return prob, [z], [x]

    return Case("sparsemax", build, lambda rng, B: [_rng_vec(rng, B, n)],
                lambda z: (_sparsemax(z),), True, frozenset({"zero", "nonneg"}))


def box_case(n=5):
    def build():
        x, z = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [x >= 0, x <= 1])
        return prob, [z], [x]

    def sample(rng, B):
        # keep away from the kinks at 0 and 1 (the projection is not differentiable there)
        z = rng.choice([-0.6, 0.5, 1.6], size=(B, n)) + rng.uniform(-0.3, 0.3, (B, n))
        return [torch.as_tensor(z)]

    return Case("box_projection", build, sample, lambda z: (z.clamp(0, 1),), True,
                frozenset({"nonneg"}))


def soc_case(n=4):
    def build():
        x, z = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [cp.norm(x[1:]) <= x[0]])
        return prob, [z], [x]

    return Case("soc_projection", build, lambda rng, B: [_rng_vec(rng, B, n)],
                lambda z: (_proj_soc(z),), True, frozenset({"soc"}))


def soc_norm_case(n=4):
    """The SOC projection written without a quadratic objective (LP/SOCP solvers)."""

    def build():
        x, z = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(cp.norm(x - z)), [cp.norm(x[1:]) <= x[0]])
        return prob, [z], [x]

    def sample(rng, B):  # outside the cone, so the projection is unique and nonzero distance
        z = rng.standard_normal((B, n))
        z[:, 0] = -0.2 * np.abs(z[:, 0])
        return [torch.as_tensor(z)]

    return Case("soc_projection_norm", build, sample, lambda z: (_proj_soc(z),), False,
                frozenset({"soc"}))


def psd_case(k=3):
    def build():
        X = cp.Variable((k, k), PSD=True)
        Z = cp.Parameter((k, k), symmetric=True)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(X - Z)))
        return prob, [Z], [X]

    def sample(rng, B):
        Q, _ = np.linalg.qr(rng.standard_normal((B, k, k)))
        lam = rng.choice([-1.0, 1.0], size=(B, k)) * rng.uniform(0.3, 2.0, (B, k))
        return [torch.as_tensor(Q @ (lam[..., None] * np.swapaxes(Q, 1, 2)))]

    return Case("psd_projection", build, sample, lambda Z: (_proj_psd(Z),), True,
                frozenset({"psd"}))


def unconstrained_qp_case(n=4):
    rng = np.random.default_rng(1)
    M = rng.standard_normal((n, n))
    Q = M @ M.T + n * np.eye(n)

    def build():
        x, q = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q @ x))
        return prob, [q], [x]

    Qt = torch.as_tensor(Q)
    return Case("unconstrained_qp", build, lambda rng, B: [_rng_vec(rng, B, n)],
                lambda q: (-torch.linalg.solve(Qt, q.unsqueeze(-1)).squeeze(-1),), True,
                frozenset({"zero"}))


def equality_qp_case(n=5, p=2):
    def build():
        x = cp.Variable(n)
        q, A, b = cp.Parameter(n), cp.Parameter((p, n)), cp.Parameter(p)
        eq = A @ x == b
        prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(x) + q @ x), [eq])
        return prob, [q, A, b], [x, eq.dual_variables[0]]

    def ref(q, A, b):
        B = q.shape[0]
        K = torch.zeros(B, n + p, n + p, dtype=q.dtype)
        K[:, :n, :n] = torch.eye(n, dtype=q.dtype)
        K[:, :n, n:] = A.transpose(1, 2)
        K[:, n:, :n] = A
        sol = torch.linalg.solve(K, torch.cat([-q, b], -1))
        return sol[:, :n], sol[:, n:]

    return Case("equality_qp", build,
                lambda rng, B: [_rng_vec(rng, B, n), _rng_vec(rng, B, p, n), _rng_vec(rng, B, p)],
                ref, True, frozenset({"zero"}))


def least_squares_case(m=6, n=3):
    def build():
        x = cp.Variable(n)
        A, b = cp.Parameter((m, n)), cp.Parameter(m)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(A @ x - b)))
        return prob, [A, b], [x]

    def ref(A, b):
        At = A.transpose(1, 2)
        return (torch.linalg.solve(At @ A, (At @ b.unsqueeze(-1))).squeeze(-1),)

    return Case("least_squares", build,
                lambda rng, B: [_rng_vec(rng, B, m, n), _rng_vec(rng, B, m)], ref, True,
                frozenset({"zero"}))


def power_case(n=3, p=1.5):
    """min Σ x^p - aᵀx (power cones): x = (a / p)^(1 / (p - 1)) for a > 0."""

    def build():
        x, a = cp.Variable(n), cp.Parameter(n)
        prob = cp.Problem(cp.Minimize(cp.sum(cp.power(x, p, approx=False)) - a @ x))
        return prob, [a], [x]

    return Case("power_cone_power", build,
                lambda rng, B: [torch.as_tensor(rng.uniform(0.3, 2.5, (B, n)))],
                lambda a: ((a / p) ** (1 / (p - 1)),), False, frozenset({"nonneg", "pow"}))


def geo_mean_case(w=(0.2, 0.3, 0.5)):
    """max Π x_i^{w_i} s.t. cᵀx <= 1 (power cones, Σ w = 1): x = w / c; the dual is the optimal
    value Π (w / c)^w, as the value is linear in the budget."""
    wt = torch.tensor(w, dtype=torch.float64)

    def build():
        x, c = cp.Variable(len(w)), cp.Parameter(len(w))
        budget = c @ x <= 1
        prob = cp.Problem(cp.Maximize(cp.geo_mean(x, list(w), approx=False)), [budget])
        return prob, [c], [x, budget.dual_variables[0]]

    def ref(c):
        x = wt / c
        return x, torch.exp((wt * torch.log(x)).sum(-1))  # the optimal value, by homogeneity

    return Case("power_cone_geo_mean", build,
                lambda rng, B: [torch.as_tensor(rng.uniform(0.5, 2.0, (B, len(w))))],
                ref, False, frozenset({"nonneg", "pow"}))


CASES = [softmax_case(), sparsemax_case(), box_case(), soc_case(), soc_norm_case(), psd_case(),
         unconstrained_qp_case(), equality_qp_case(), least_squares_case(), power_case(),
         geo_mean_case()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-12))
