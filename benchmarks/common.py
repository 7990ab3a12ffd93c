"""Shared helpers for the benchmarks: problem families, timing, gradient references.

A *family* is a parametrized CVXPY problem plus a batch of feasible parameter values. Each family
knows how to turn a flat direction into parameter tensors (respecting symmetry) and how to solve
one item independently with CVXPY, so the reference gradient can be checked by finite differences.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import cvxpy as cp
import numpy as np
import torch

DTYPE = torch.float64

#: CVXPY/Clarabel settings for the independent tight solves of the finite-difference check.
TIGHT_CLARABEL = dict(
    tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10,
    max_iter=500,
)


@dataclass
class Family:
    """One benchmark family (a problem and one batch of parameter values)."""

    name: str
    description: str
    problem: cp.Problem
    parameters: list[cp.Parameter]
    variables: list[cp.Variable]
    values: list[np.ndarray]  # one array per parameter, shape (B, *param.shape)
    symmetric: list[bool] = field(default_factory=list)  # which parameters are symmetric matrices
    fd_eps: float = 1e-3  # relative finite-difference step of the reference check
    #: tensor form for QPLayer: maps the parameter tensors (same order as ``parameters``) to the
    #: keyword arguments ``P, q, G, h, A, b`` of ``diffopt.QPLayer`` (differentiably), or None
    #: when the family is not a QP/LP.
    qp_form: Callable | None = None

    def __post_init__(self):
        if not self.symmetric:
            self.symmetric = [False] * len(self.parameters)

    @property
    def batch(self) -> int:
        return int(self.values[0].shape[0])

    def tensors(self, requires_grad: bool = True) -> list[torch.Tensor]:
        return [torch.tensor(v, dtype=DTYPE, requires_grad=requires_grad) for v in self.values]

    def project_grad(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Symmetrize gradients of symmetric parameters (only their symmetric part is defined:
        a perturbation of a symmetric parameter is symmetric)."""
        out = []
        for g, sym in zip(grads, self.symmetric):
            out.append(0.5 * (g + g.transpose(-1, -2)) if sym else g)
        return out

    def random_direction(self, rng: np.random.Generator) -> list[np.ndarray]:
        """A unit-scale random perturbation for ONE item (parameter shapes, symmetric kept)."""
        out = []
        for p, sym in zip(self.parameters, self.symmetric):
            d = rng.standard_normal(p.shape)
            if sym:
                d = 0.5 * (d + d.T)
            out.append(d)
        return out

    def solve_item(self, vals: list[np.ndarray]) -> np.ndarray:
        """Independent tight CVXPY/Clarabel solve of one item; returns the outputs, flattened."""
        for p, v in zip(self.parameters, vals):
            p.value = v
        with warnings.catch_warnings():  # "may be inaccurate": 1e-12 is not always reached
            warnings.simplefilter("ignore")
            self.problem.solve(solver="CLARABEL", **TIGHT_CLARABEL)
        if self.problem.status not in ("optimal", "optimal_inaccurate"):
            raise RuntimeError(f"{self.name}: reference solve status {self.problem.status}")
        return np.concatenate([np.asarray(v.value, dtype=float).ravel() for v in self.variables])


# -- families -------------------------------------------------------------------------------------

def _margin(prob: cp.Problem, params, vals, ineq) -> float:
    """Strict-complementarity margin of one item: min over inequality rows of max(slack, λ)."""
    for p, v in zip(params, vals):
        p.value = v
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    if prob.status != "optimal":
        return 0.0
    slack = -np.asarray(ineq.expr.value).ravel()  # constraint is expr <= 0
    lam = np.asarray(ineq.dual_value).ravel()
    return float(np.maximum(slack, lam).min())


def dense_qp(n: int, m: int, p: int, B: int, seed: int = 0, margin: float = 1e-3) -> Family:
    """min ½xᵀQx + qᵀx  s.t.  Gx ≤ h, Ax = b;  q, G, h, A, b parametric, Q a fixed PD constant.
    With ``p = 0`` there are no equality constraints (and no A, b parameters).

    Feasible by construction (h = Gx₀ + slack, b = Ax₀). An item whose solution is nearly
    degenerate (some inequality with both slack and multiplier below ``margin``: its gradient is
    ill-defined, jumping with the solver tolerance) is redrawn, so gradient errors measure the
    differentiation and not which side of a kink a tolerance happened to land on."""
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    Q = M @ M.T / n + 0.1 * np.eye(n)
    x = cp.Variable(n)
    q, G, h = cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    ineq = G @ x <= h
    constraints = [ineq]
    params = [q, G, h]
    if p:
        A, b = cp.Parameter((p, n)), cp.Parameter(p)
        constraints.append(A @ x == b)
        params += [A, b]
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, Q) + q @ x), constraints)

    def draw():
        Gv, Av = rng.standard_normal((m, n)), rng.standard_normal((p, n))
        x0 = rng.standard_normal(n)
        hv = Gv @ x0 + rng.uniform(0.1, 1.0, m)
        qv = 3.0 * rng.standard_normal(n)  # large enough that several constraints are active
        return [qv, Gv, hv, Av, Av @ x0][:len(params)]

    items = []
    while len(items) < B:
        vals = draw()
        if _margin(prob, params, vals, ineq) >= margin:
            items.append(vals)
    values = [np.stack([it[k] for it in items]) for k in range(len(params))]
    Qt = torch.tensor(Q, dtype=DTYPE)

    def qp_form(q, G, h, A=None, b=None):
        return dict(P=Qt.to(q), q=q, G=G, h=h, A=A, b=b)

    return Family(f"qp_n{n}_m{m}_p{p}_B{B}", f"dense QP n={n} m={m} p={p}", prob,
                  params, [x], values, qp_form=qp_form)


def grid_incidence(k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Node-edge incidence of the k×k grid (edges right/down; +1 out of a node, −1 into it) and
    the supply of one unit from the top-left to the bottom-right node, every node's row."""
    node = lambda i, j: i * k + j  # noqa: E731
    edges = []
    for i in range(k):
        for j in range(k):
            if j + 1 < k:
                edges.append((node(i, j), node(i, j + 1)))
            if i + 1 < k:
                edges.append((node(i, j), node(i + 1, j)))
    inc = np.zeros((k * k, len(edges)))
    for e, (u, v) in enumerate(edges):
        inc[u, e] = 1.0   # out of u
        inc[v, e] = -1.0  # into v
    rhs = np.zeros(k * k)
    rhs[0], rhs[-1] = 1.0, -1.0
    return inc, rhs


def grid_shortest_path(k: int = 5, B: int = 64, seed: int = 1) -> Family:
    """Shortest path on a k×k grid (edges right/down), top-left to bottom-right, relaxed to an LP
    with 0 ≤ x ≤ 1 plus 0.1‖x‖²; edge costs parametric. The sink's conservation row is implied by
    the others and is left out (keeps the equality constraints full rank)."""
    rng = np.random.default_rng(seed)
    inc, rhs = grid_incidence(k)
    E = inc.shape[1]
    inc, rhs = inc[:-1], rhs[:-1]
    x = cp.Variable(E)
    c = cp.Parameter(E)
    prob = cp.Problem(cp.Minimize(c @ x + 0.1 * cp.sum_squares(x)),
                      [inc @ x == rhs, x >= 0, x <= 1])
    cv = rng.uniform(0.1, 1.0, (B, E))
    P = 0.2 * torch.eye(E, dtype=DTYPE)
    G = torch.cat([-torch.eye(E, dtype=DTYPE), torch.eye(E, dtype=DTYPE)])
    h = torch.cat([torch.zeros(E, dtype=DTYPE), torch.ones(E, dtype=DTYPE)])
    At, bt = torch.tensor(inc, dtype=DTYPE), torch.tensor(rhs, dtype=DTYPE)

    def qp_form(c):
        return dict(P=P.to(c), q=c, G=G.to(c), h=h.to(c), A=At.to(c), b=bt.to(c))

    return Family(f"shortest_path_{k}x{k}_B{B}", f"{k}x{k} grid shortest path ({E} edges)", prob,
                  [c], [x], [cv], qp_form=qp_form)


def portfolio(n: int = 30, B: int = 64, seed: int = 2) -> Family:
    """min −μᵀw  s.t.  ‖Σ^{1/2} w‖₂ ≤ σ, 1ᵀw = 1, w ≥ 0;  expected returns μ parametric."""
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, 3))
    Sigma = 0.01 * (F @ F.T) / 3 + np.diag(rng.uniform(0.01, 0.04, n))
    S = np.linalg.cholesky(Sigma).T  # Σ = SᵀS
    sigma = 0.6 * np.sqrt(np.diag(Sigma)).min()  # below every single-asset risk: diversifies
    w = cp.Variable(n)
    mu = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(-mu @ w), [cp.norm(S @ w, 2) <= sigma, cp.sum(w) == 1, w >= 0])
    muv = 0.05 + 0.05 * rng.standard_normal((B, n))
    return Family(f"portfolio_{n}_B{B}", f"SOCP portfolio, {n} assets", prob, [mu], [w], [muv])


def nearest_correlation(k: int = 10, B: int = 16, seed: int = 3) -> Family:
    """min ‖X − C‖_F²  s.t.  X ⪰ 0, diag(X) = 1;  C symmetric parametric."""
    rng = np.random.default_rng(seed)
    X = cp.Variable((k, k), symmetric=True)
    C = cp.Parameter((k, k), symmetric=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(X - C)), [X >> 0, cp.diag(X) == 1])
    Cv = np.empty((B, k, k))
    for i in range(B):
        R = rng.uniform(-1.0, 1.0, (k, k))
        R = 0.5 * (R + R.T)
        np.fill_diagonal(R, 1.0)
        Cv[i] = R  # an indefinite "correlation-like" matrix
    return Family(f"nearest_corr_{k}x{k}_B{B}", f"{k}x{k} nearest correlation SDP", prob,
                  [C], [X], [Cv], symmetric=[True], fd_eps=1e-2)


FAMILIES: dict[str, Callable[[], Family]] = {
    "qp10": lambda: dense_qp(10, 10, 2, 64),
    "qp50": lambda: dense_qp(50, 40, 5, 64),
    "qp100": lambda: dense_qp(100, 80, 10, 32),
    "path": lambda: grid_shortest_path(5, 64),
    "portfolio": lambda: portfolio(30, 64),
    "sdp": lambda: nearest_correlation(10, 16),
}


# -- timing and gradients -------------------------------------------------------------------------

def flat_grads(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def run_once(layer, fam: Family, upstream: list[torch.Tensor], call_kwargs: dict):
    """One forward + backward; returns (t_forward, t_backward, outputs, grads)."""
    params = fam.tensors()
    t0 = time.perf_counter()
    outs = layer(*params, **call_kwargs)
    t1 = time.perf_counter()
    loss = sum((o * g).sum() for o, g in zip(outs, upstream))
    grads = torch.autograd.grad(loss, params)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [o.detach() for o in outs], fam.project_grad(list(grads))


def time_layers(runs: dict, fam: Family, upstream, repeats: int) -> dict:
    """Time several layers on the same batch. ``runs`` maps a name to ``(layer, call_kwargs)``.

    Each is warmed up once; then the timed repeats are interleaved (A, B, A, B, ...) so that a
    change in machine load hits every library alike and the ratios stay meaningful on a shared
    CPU. Each timed call follows an untimed call of the same layer, as in a training loop: the
    threads one library leaves busy must not be charged to the next (torch's OpenMP workers spin
    ~8 ms after a multi-threaded op; cvxpylayers' SDP forward took 38 ms after a diffopt backward
    on two torch threads, 32 ms alone). Returns, per name, the median forward/backward/total
    times and the last outputs/grads."""
    for layer, kw in runs.values():
        run_once(layer, fam, upstream, kw)
    samples = {name: dict(forward=[], backward=[], total=[]) for name in runs}
    last = {}
    for _ in range(repeats):
        for name, (layer, kw) in runs.items():
            run_once(layer, fam, upstream, kw)
            f, b, outs, grads = run_once(layer, fam, upstream, kw)
            samples[name]["forward"].append(f)
            samples[name]["backward"].append(b)
            samples[name]["total"].append(f + b)
            last[name] = (outs, grads)
    return {name: ({k: statistics.median(v) for k, v in samples[name].items()}, *last[name])
            for name in runs}


def max_violation(fam: Family, outs: list[torch.Tensor]) -> float:
    """Worst constraint violation over the batch of the returned solutions, measured by CVXPY
    itself (``constraint.violation()``: the distance of the constraint expression to its cone,
    max over entries) with the item's parameter values. Only the requested variables are set, so
    every variable of the problem must be among them (true for every family here)."""
    worst = 0.0
    outs = [o.detach().cpu().numpy() for o in outs]
    for i in range(fam.batch):
        for p, v in zip(fam.parameters, fam.values):
            p.value = v[i]
        for var, o in zip(fam.variables, outs):
            var.value = o[i] if o.ndim > len(var.shape) else o
        for con in fam.problem.constraints:
            worst = max(worst, float(np.max(con.violation())))
    return worst


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - ref) / max(float(torch.linalg.norm(ref)), 1e-300))


def verify_reference(fam: Family, upstream: list[torch.Tensor], ref_grads: list[torch.Tensor],
                     items=(0, 1), n_dirs: int = 3, eps: float | None = None,
                     seed: int = 7) -> float:
    """Check the reference VJP by directional central differences of tight, independent CVXPY
    solves: for item i and direction d, ⟨∇_θ(gᵀx), d⟩ ≈ gᵀx'(θ; d), with the fourth-order
    stencil x' ≈ [x(θ−2εd) − 8x(θ−εd) + 8x(θ+εd) − x(θ+2εd)] / 12ε (a fairly large step keeps the
    solver's own error, ~1e-9, from dominating; ``eps`` defaults to the family's ``fd_eps``).

    Directions: random, each parameter's part scaled to that parameter's RMS value (so ``eps`` is
    a relative step). The error of one direction is |FD − ⟨∇, d⟩| / (‖∇‖ · rms(d)), i.e. relative to
    the typical size of a directional derivative (a plain |FD − AD| / |AD| explodes whenever a
    random direction happens to be nearly orthogonal to ∇). Returns the worst over items and
    directions."""
    eps = fam.fd_eps if eps is None else eps
    rng = np.random.default_rng(seed)
    worst = 0.0
    for i in items:
        g = np.concatenate([u[i].detach().numpy().ravel() for u in upstream])
        base = [v[i] for v in fam.values]
        grad = [rg[i].detach().numpy() for rg in ref_grads]
        gnorm = np.sqrt(sum(float((gr ** 2).sum()) for gr in grad))
        for _ in range(n_dirs):
            d = [dv * max(float(np.sqrt(np.mean(v ** 2))), 1e-12)
                 for dv, v in zip(fam.random_direction(rng), base)]
            x_at = {k: fam.solve_item([v + k * eps * dv for v, dv in zip(base, d)])
                    for k in (-2, -1, 1, 2)}
            fd = float(g @ (x_at[-2] - 8 * x_at[-1] + 8 * x_at[1] - x_at[2])) / (12 * eps)
            ad = float(sum((gr * dv).sum() for gr, dv in zip(grad, d)))
            flat = np.concatenate([dv.ravel() for dv in d])
            scale = gnorm * float(np.sqrt(np.mean(flat ** 2)))
            worst = max(worst, abs(fd - ad) / max(scale, 1e-300))
    return worst
