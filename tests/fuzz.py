r"""Differential fuzzing of diffopt's layers against independent per-item CVXPY solves.

A *family* draws seeded random problems of one kind (LP, QP, SOCP, SDP, exponential, power,
mixed cones, ``QPLayer`` tensor forms). One *case* is one problem structure (a layer) with a batch
of items; every item has its own parameter values, its own scales and its own kind (feasible,
infeasible or unbounded), all mixed in one call made with ``on_failure="nan"``. Each item is
compared with a fresh ``cvxpy.Problem`` in which its parameter values are constants, solved by
Clarabel at tight tolerances (ECOS, then SCS, where Clarabel does not finish), and classified:

- ``right``: status OPTIMAL and the answer agrees with the reference (see :data:`TOL`);
- ``correct_failure``: a non-OPTIMAL status (NaN answer) for an infeasible or unbounded item;
- ``false_failure``: refused (non-OPTIMAL status, or the call raised diffopt's ``SolverError`` /
  ``InputError``) although the reference solved it;
- ``refused_extreme``: the same at a scale of 1e±7 or beyond, where a clear refusal is accepted
  (issue 18: "a clear failure there is acceptable, a wrong number is not");
- ``silent_wrong``: status OPTIMAL but the answer is off, or OPTIMAL for an unsolvable item, or a
  failed item that does not come back as NaN;
- ``crash``: any other exception, or NaN/Inf with an OPTIMAL status;
- ``undecided``: no reference (every reference solver failed), or a gradient check at a kink;
- ``unsupported``: the layer refused the problem class with diffopt's ``ProblemError`` (power cones
  before they exist).

Scales are exact by construction: every family is homogeneous, so an item built at unit scale and
given to the layer with its right-hand sides multiplied by ``s_b`` and its objective by ``s_c`` has
the solution ``x = s_b x_unit``. The reference solves the unit-scale problem (the layer's exact,
dtype-rounded inputs divided back), and the layer's answer is divided by ``s_b`` before it is
compared: one relative tolerance serves every scale, and the reference's own accuracy does not
depend on the scale. Gradient checks compare the layer's directional derivative of a random
``⟨w, x⟩`` with central differences of the same tight reference solves; the gap between the two
one-sided differences and the change of the central difference when the step is halved (the
reference's own noise and truncation) are added to the tolerance, and a check whose one-sided
differences disagree by more than :data:`KINK` is a kink (``undecided``).

Everything is seeded: a case's structure comes from ``numpy.random.default_rng(seed)`` and item
``i``'s values from ``default_rng([seed, i])``; :func:`run_case` with the same family, seed and
dtype reproduces a record exactly (``python benchmarks/fuzz_report.py --family F --seed S --dtype
D`` prints every record of one case). Add a family by writing a ``_draw_*`` function and listing it
in :data:`FAMILIES`; its backends follow from its cones.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import cvxpy as cp
import numpy as np
import torch

from diffopt import CvxpyLayer, InputError, ProblemError, QPLayer, SolverError
from diffopt.solvers import get_backend

#: Scales drawn for right-hand sides (``s_b``) and objectives (``s_c``); unit scale half the time.
SCALES = (1e-8, 1e-6, 1e-4, 1e-2, 1e2, 1e4, 1e6, 1e8)
#: A refusal at a scale this far from 1 (either way) is ``refused_extreme``, not a false failure.
EXTREME = 1e7
#: Explicit backends tried on every family whose cones they support (besides ``"auto"``).
BACKENDS = ("native", "clarabel", "scs", "ecos")
OUTCOMES = ("right", "correct_failure", "false_failure", "refused_extreme", "silent_wrong",
            "crash", "undecided", "unsupported")
#: The outcomes the targets forbid (0 of each).
BAD = ("false_failure", "silent_wrong", "crash")


@dataclass(frozen=True)
class Tol:
    """Tolerances at unit scale (data entries O(1)); see :data:`TOL`.

    An answer is right when ``‖x − x_ref‖∞ ≤ value·max(1, ‖x_ref‖∞)``, or when its constraint
    violation in the reference problem is at most ``feas`` and its objective at most
    ``p* + value·max(1, |p*|)`` (another optimal point). A directional derivative is right when
    ``|g − g_fd| ≤ grad_rel·|g_fd| + grad_abs + gap + spread`` (see :class:`FiniteDifference`).
    """

    value: float
    feas: float
    grad_rel: float
    grad_abs: float


#: Per input dtype. float32 inputs carry a relative rounding of 6e-8 into the data (the reference
#: solves the rounded data exactly, so this only covers the answer's own rounding and conditioning).
TOL = {
    torch.float64: Tol(value=1e-5, feas=1e-6, grad_rel=1e-4, grad_abs=1e-5),
    torch.float32: Tol(value=1e-3, feas=1e-4, grad_rel=1e-3, grad_abs=1e-4),
}
#: SCS is a first-order method: its answers are trusted to a 100x looser tolerance.
LOOSEN = {"scs": 100.0}
#: One-sided differences further apart than KINK·(1 + |central|) mean a kink: no gradient check.
KINK = 5e-2
#: Finite-difference step at unit scale (exp-cone reference solves are accurate to ~1e-8 only).
FD_STEP = 1e-3


# --------------------------------------------------------------------------- problem families


@dataclass
class Param:
    """One parameter: shape, how the scales enter it (``s_c**a * s_b**b``), cvxpy attributes."""

    shape: tuple
    a: float = 0.0
    b: float = 0.0
    attrs: dict = field(default_factory=dict)


@dataclass
class Structure:
    """A drawn problem structure (one layer) and the way its items are drawn.

    ``build(p)`` writes the problem with ``p(name)`` for each parameter (a ``cp.Parameter`` for the
    layer, a constant for the reference) and returns ``(problem, variables)``; ``item(rng, kind)``
    returns unit-scale values ``{name: array}``. ``kinds`` are the item kinds this family draws,
    ``scaled`` which of ``"b"``/``"c"`` it scales. ``qp`` marks a ``QPLayer`` tensor form (its
    parameters are P, q, G, h, A, b). ``tie`` keeps dependent values dependent in a perturbation.
    """

    params: dict[str, Param]
    build: Callable
    item: Callable
    kinds: tuple = ("feasible",)
    scaled: tuple = ("b", "c")
    qp: bool = False
    tie: Callable | None = None  # re-derives dependent values from the free ones (linear)
    note: str = ""


def _unit(rng, n):
    v = rng.standard_normal(n)
    return v / np.linalg.norm(v)


def _dual_feasible_cost(rng, G, A):
    """A cost ``c = −Gᵀλ − Aᵀν`` with ``λ ≥ 0`` (some zero): the LP is then bounded below."""
    lam = rng.uniform(0.2, 1.0, G.shape[0]) * (rng.random(G.shape[0]) < 0.6)
    lam[: G.shape[1]] += 0.1  # the first n rows keep c in the interior of the cone of the rows
    nu = rng.standard_normal(A.shape[0])
    return -G.T @ lam - A.T @ nu


def _polyhedral_item(rng, n, m, p, kind, F=None):
    """Values of ``G x ≤ h, A x = b`` with a cost: feasible/bounded, infeasible or unbounded."""
    G, A = rng.standard_normal((m, n)), rng.standard_normal((p, n))
    x0 = rng.standard_normal(n)
    # at most n − p rows active at x0: a degenerate vertex would turn infeasible when rounded
    slack = rng.uniform(0.05, 1.0, m)
    slack[rng.permutation(m)[: int(rng.integers(0, n - A.shape[0] + 1))]] = 0.0
    c = _dual_feasible_cost(rng, G, A)
    if kind == "infeasible":
        G[1] = -G[0]
    if kind == "unbounded":
        # along d = e_j: A d = 0, F d = 0, G d ≤ 0 and cᵀd = −1, exactly in any dtype
        j = int(rng.integers(n))
        A[:, j] = 0.0
        G[:, j] = -np.abs(G[:, j])
        c = rng.standard_normal(n)
        c[j] = -1.0
        if F is not None:
            F[:, j] = 0.0
    h = G @ x0 + slack
    if kind == "infeasible":
        h[1] = -h[0] - 1.0  # g₀x ≤ h₀ and g₀x ≥ h₀ + 1
    return G, h, A, A @ x0, c


def _draw_lp(rng):
    n = int(rng.integers(2, 7))
    m, p, k = n + int(rng.integers(1, 5)), int(rng.integers(0, min(3, n - 1) + 1)), 0
    T = None
    if p and rng.random() < 0.5:  # dependent equality rows (T A) x = T b
        k = int(rng.integers(1, 3))
        T = rng.standard_normal((k, p))

    def build(P):
        x = cp.Variable(n)
        cons = [P("G") @ x <= P("h")]
        if p:
            cons.append(P("A") @ x == P("b"))
        if T is not None:
            cons.append((T @ P("A")) @ x == T @ P("b"))
        return cp.Problem(cp.Minimize(P("c") @ x), cons), [x]

    def item(r, kind):
        G, h, A, b, c = _polyhedral_item(r, n, m, p, kind)
        vals = {"G": G, "h": h, "c": c}
        if p:
            vals.update(A=A, b=b)
        return vals

    params = {"G": Param((m, n)), "h": Param((m,), b=1), "c": Param((n,), a=1)}
    if p:
        params.update(A=Param((p, n)), b=Param((p,), b=1))
    return Structure(params, build, item, ("feasible",) * 4 + ("infeasible", "unbounded"),
                     note=f"n={n} m={m} p={p} dependent={k}")


def _draw_qp(rng):
    n = int(rng.integers(2, 7))
    m, p, r = n + int(rng.integers(0, 4)), int(rng.integers(0, min(3, n - 1) + 1)), \
        int(rng.integers(1, n + 1))
    T = rng.standard_normal((int(rng.integers(1, 3)), p)) if p and rng.random() < 0.5 else None

    def build(P):
        x = cp.Variable(n)
        cons = [P("G") @ x <= P("h")]
        if p:
            cons.append(P("A") @ x == P("b"))
        if T is not None:
            cons.append((T @ P("A")) @ x == T @ P("b"))
        return cp.Problem(cp.Minimize(0.5 * cp.sum_squares(P("F") @ x) + P("q") @ x), cons), [x]

    def item(r_, kind):
        # rank of P = FᵀF: r rows, fewer when some are zero; all zero (P = 0) one item in six
        F = r_.standard_normal((r, n)) * (r_.random((r, 1)) < 0.7)
        if r_.random() < 1 / 6:
            F[:] = 0.0
        G, h, A, b, c = _polyhedral_item(r_, n, m, p, kind, F)
        q = c - F.T @ F @ r_.standard_normal(n) if kind != "unbounded" else c
        vals = {"F": F, "q": q, "G": G, "h": h}
        if p:
            vals.update(A=A, b=b)
        return vals

    params = {"F": Param((r, n), a=0.5), "q": Param((n,), a=1, b=1), "G": Param((m, n)),
              "h": Param((m,), b=1)}
    if p:
        params.update(A=Param((p, n)), b=Param((p,), b=1))
    return Structure(params, build, item, ("feasible",) * 4 + ("infeasible", "unbounded"),
                     note=f"n={n} m={m} p={p} rank<={r} dependent={0 if T is None else len(T)}")


def _draw_soc_projection(rng):
    n = int(rng.integers(1, 6))

    def build(P):
        x = cp.Variable(n + 1)
        return cp.Problem(cp.Minimize(cp.sum_squares(x - P("z"))), [cp.SOC(x[0], x[1:])]), [x]

    def item(r, kind):
        u = _unit(r, n) * r.uniform(0.5, 2.0)
        nu = np.linalg.norm(u)
        t = {0: nu * r.uniform(-3, 3),  # anywhere
             1: -nu,  # on the polar cone's boundary: projection at the apex
             2: -nu * (1 + 1e-6 * r.standard_normal()),  # near it
             3: nu,  # on the cone's boundary
             4: -nu * r.uniform(1, 3)}[int(r.integers(0, 5))]  # inside the polar: the apex
        return {"z": np.concatenate([[t], u])}

    return Structure({"z": Param((n + 1,), b=1)}, build, item, scaled=("b",), note=f"n={n}")


def _draw_socp(rng):
    n, k = int(rng.integers(2, 6)), int(rng.integers(1, 4))

    def build(P):
        x = cp.Variable(n)
        obj = P("c") @ x + cp.norm(P("G") @ x - P("h"), 2)
        return cp.Problem(cp.Minimize(obj), [cp.norm(x, 2) <= P("R"), x[0] >= P("tau")]), [x]

    def item(r, kind):
        R = r.uniform(0.2, 2.0)
        tau = 2 * R if kind == "infeasible" else -2 * R
        return {"c": r.standard_normal(n) * r.uniform(0.5, 3), "G": r.standard_normal((k, n)),
                "h": r.standard_normal(k), "R": np.array(R), "tau": np.array(tau)}

    params = {"c": Param((n,), a=1), "G": Param((k, n), a=1), "h": Param((k,), a=1, b=1),
              "R": Param((), b=1), "tau": Param((), b=1)}
    return Structure(params, build, item, ("feasible",) * 5 + ("infeasible",), note=f"n={n} k={k}")


def _draw_portfolio(rng):
    n, k = int(rng.integers(3, 12)), int(rng.integers(2, 6))

    def build(P):
        w = cp.Variable(n)
        obj = cp.Maximize(P("mu") @ w - cp.norm(P("S") @ w, 2))
        return cp.Problem(obj, [cp.sum(w) == P("budget"), w >= 0]), [w]

    def item(r, kind):
        budget = -1.0 if kind == "infeasible" else 1.0
        return {"mu": r.standard_normal(n) * 0.3, "S": r.standard_normal((k, n)) * 0.3,
                "budget": np.array(budget)}

    params = {"mu": Param((n,), a=1), "S": Param((k, n), a=1), "budget": Param((), b=1)}
    return Structure(params, build, item, ("feasible",) * 5 + ("infeasible",), note=f"n={n} k={k}")


def _sym(M):
    return (M + M.T) / 2


def _draw_sdp_projection(rng):
    k = int(rng.integers(2, 5))

    def build(P):
        X = cp.Variable((k, k), symmetric=True)
        cons = [X >> 0, cp.trace(X) <= P("tau")]
        return cp.Problem(cp.Minimize(cp.sum_squares(X - P("Z"))), cons), [X]

    def item(r, kind):
        tau = -1.0 if kind == "infeasible" else r.uniform(0.5, 3.0)
        return {"Z": _sym(r.standard_normal((k, k))), "tau": np.array(tau)}

    params = {"Z": Param((k, k), b=1, attrs={"symmetric": True}), "tau": Param((), b=1)}
    return Structure(params, build, item, ("feasible",) * 5 + ("infeasible",), scaled=("b",),
                     note=f"k={k}")


def _draw_sdp(rng):
    k, m = int(rng.integers(2, 5)), int(rng.integers(1, 4))

    def build(P):
        X = cp.Variable((k, k), symmetric=True)
        cons = [X >> 0] + [cp.trace(P(f"A{i}") @ X) == P("b")[i] for i in range(m)]
        return cp.Problem(cp.Minimize(cp.trace(P("C") @ X)), cons), [X]

    def item(r, kind):
        As = [_sym(r.standard_normal((k, k))) for _ in range(m)]
        B0 = r.standard_normal((k, k))
        X0 = B0 @ B0.T + 0.1 * np.eye(k)  # strictly feasible primal point
        C0 = r.standard_normal((k, k))
        C = C0 @ C0.T + 0.1 * np.eye(k) + sum(r.standard_normal() * A for A in As)  # dual too
        vals = {f"A{i}": A for i, A in enumerate(As)}
        vals.update(C=C, b=np.array([np.trace(A @ X0) for A in As]))
        return vals

    params = {f"A{i}": Param((k, k)) for i in range(m)}
    params.update(C=Param((k, k), a=1), b=Param((m,), b=1))
    return Structure(params, build, item, note=f"k={k} m={m}")


def _draw_exp(rng):
    n, m = int(rng.integers(2, 7)), int(rng.integers(0, 3))

    def build(P):
        x = cp.Variable(n)
        cons = [cp.sum(x) == P("beta")]
        if m:
            cons.append(P("G") @ x <= P("h"))
        return cp.Problem(cp.Minimize(cp.sum(cp.rel_entr(x, P("q"))) + P("c") @ x), cons), [x]

    def item(r, kind):
        q = np.exp(r.standard_normal(n))
        vals = {"q": q, "c": r.standard_normal(n), "beta": np.array(
            -1.0 if kind == "infeasible" else r.uniform(0.5, 2.0))}
        if m:
            G = r.standard_normal((m, n))
            x0 = q / q.sum() * abs(vals["beta"])
            vals.update(G=G, h=G @ x0 + r.uniform(0, 0.5, m))
        return vals

    params = {"q": Param((n,), b=1), "c": Param((n,)), "beta": Param((), b=1)}
    if m:
        params.update(G=Param((m, n)), h=Param((m,), b=1))
    return Structure(params, build, item, ("feasible",) * 5 + ("infeasible",), scaled=("b",),
                     note=f"n={n} m={m} (rel_entr: softmax-like)")


def _draw_pow(rng):
    alpha = float(rng.uniform(0.15, 0.85))

    def build(P):
        u = cp.Variable(3)
        cons = [cp.constraints.PowCone3D(u[0], u[1], u[2], alpha)]
        return cp.Problem(cp.Minimize(cp.sum_squares(u - P("a"))), cons), [u]

    def item(r, kind):
        return {"a": r.standard_normal(3) * r.uniform(0.5, 2.0)}

    return Structure({"a": Param((3,), b=1)}, build, item, scaled=("b",),
                     note=f"alpha={alpha:.3f} (power-cone projection)")


def _draw_mixed(rng):
    n, k = int(rng.integers(2, 5)), int(rng.integers(2, 4))

    def build(P):
        x, y = cp.Variable(n), cp.Variable(k)
        X = cp.Variable((2, 2), symmetric=True)
        obj = (P("c") @ x + cp.norm(P("G") @ x - P("h"), 2) + cp.sum(cp.rel_entr(y, P("q")))
               + cp.trace(P("C") @ X))
        cons = [cp.norm(x, 2) <= P("R"), x >= -P("R"), cp.sum(y) == P("beta"), X >> 0,
                X[0, 1] == x[0], cp.trace(X) <= P("R")]
        return cp.Problem(cp.Minimize(obj), cons), [x, y, X]

    def item(r, kind):
        C0 = r.standard_normal((2, 2))
        return {"c": r.standard_normal(n), "G": r.standard_normal((2, n)),
                "h": r.standard_normal(2),
                "q": np.exp(r.standard_normal(k)), "C": C0 @ C0.T + 0.1 * np.eye(2),
                "R": np.array(r.uniform(0.5, 2.0)),
                "beta": np.array(-1.0 if kind == "infeasible" else r.uniform(0.5, 2.0))}

    params = {"c": Param((n,)), "G": Param((2, n)), "h": Param((2,), b=1), "q": Param((k,), b=1),
              "C": Param((2, 2)), "R": Param((), b=1), "beta": Param((), b=1)}
    return Structure(params, build, item, ("feasible",) * 5 + ("infeasible",), scaled=("b",),
                     note=f"n={n} k={k} (zero, nonneg, soc, psd, exp)")


def _draw_qplayer(rng):
    n = int(rng.integers(2, 7))
    m, p = n + int(rng.integers(0, 4)), int(rng.integers(0, min(3, n - 1) + 1))
    lp = rng.random() < 0.25
    # dependent rows as exact copies/doubles of rows (exact in float32, so the data stay consistent)
    dup = [(int(rng.integers(p)), float(rng.choice([-2.0, -1.0, 1.0, 2.0])))
           for _ in range(int(rng.integers(0, 3)) if p else 0)]
    p_all = p + len(dup)

    def build(P):
        x = cp.Variable(n)
        obj = P("q") @ x if lp else 0.5 * cp.quad_form(x, cp.psd_wrap(P("P"))) + P("q") @ x
        cons = [P("G") @ x <= P("h")] + ([P("A") @ x == P("b")] if p_all else [])
        return cp.Problem(cp.Minimize(obj), cons), [x]

    def item(r, kind):
        F = None if lp else r.standard_normal((int(r.integers(0, n + 1)), n))
        G, h, A, b, c = _polyhedral_item(r, n, m, p, kind, F)
        vals = {"q": c, "G": G, "h": h}
        if not lp:
            vals["P"] = F.T @ F
            if kind != "unbounded":
                vals["q"] = c - vals["P"] @ r.standard_normal(n)
        if p_all:
            vals.update(A=A, b=b)
            tie(vals)
        return vals

    def tie(vals):
        vals["A"] = np.vstack([vals["A"][:p]] + [f * vals["A"][i] for i, f in dup])
        vals["b"] = np.concatenate([vals["b"][:p]] + [[f * vals["b"][i]] for i, f in dup])
        return vals

    params = {"q": Param((n,), a=1, b=1), "G": Param((m, n)), "h": Param((m,), b=1)}
    if not lp:
        params["P"] = Param((n, n), a=1)
    if p_all:
        params.update(A=Param((p_all, n)), b=Param((p_all,), b=1))
    return Structure(params, build, item, ("feasible",) * 4 + ("infeasible", "unbounded"), qp=True,
                     tie=tie if dup else None,
                     note=f"n={n} m={m} p={p} duplicated={len(dup)} {'LP' if lp else 'QP'}")


#: name -> structure drawer. Add a family here; its backends follow from its cones.
FAMILIES: dict[str, Callable] = {
    "lp": _draw_lp,
    "qp": _draw_qp,
    "soc_projection": _draw_soc_projection,
    "socp": _draw_socp,
    "portfolio": _draw_portfolio,
    "sdp_projection": _draw_sdp_projection,
    "sdp": _draw_sdp,
    "exp": _draw_exp,
    "pow": _draw_pow,
    "mixed": _draw_mixed,
    "qplayer": _draw_qplayer,
}


# --------------------------------------------------------------------------- reference solves


@dataclass
class Reference:
    """The unit-scale answer of one item: status ``"optimal" | "infeasible" | "unbounded" |
    None`` (undecided), variable values, optimal value, and the solver that gave it."""

    status: str | None
    x: list[np.ndarray] | None = None
    value: float | None = None
    solver: str = ""


_REF_SOLVERS = (
    ("CLARABEL", {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10,
                  "max_iter": 400}),
    ("ECOS", {"abstol": 1e-10, "reltol": 1e-10, "feastol": 1e-10, "max_iters": 400}),
    ("SCS", {"eps_abs": 1e-10, "eps_rel": 1e-10, "max_iters": 200_000}),
)
_STATUS = {cp.OPTIMAL: "optimal", cp.INFEASIBLE: "infeasible", cp.UNBOUNDED: "unbounded"}


def _constant(values):
    return lambda name: cp.Constant(values[name])


def reference(struct: Structure, values: dict) -> Reference:
    """Solve a fresh problem with ``values`` as constants: Clarabel, else ECOS, else SCS."""
    for name, opts in _REF_SOLVERS:
        prob, variables = struct.build(_constant(values))
        if name not in cp.installed_solvers():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prob.solve(solver=name, **opts)
        except (cp.error.SolverError, cp.error.DCPError, ValueError):
            continue  # this solver cannot take the problem (ECOS: PSD cones) or failed
        status = _STATUS.get(prob.status)
        if status == "optimal":
            return Reference(status, [np.array(v.value, dtype=float) for v in variables],
                             float(prob.value), name)
        if status is not None:
            return Reference(status, solver=name)
    return Reference(None)


def _check_answer(struct, values, ref, xs_unit, tol: float, feas_tol: float) -> str | None:
    """None when the unit-scale answer ``xs_unit`` is right, else what is wrong."""
    worst = max(np.max(np.abs(x - xr)) / max(1.0, np.max(np.abs(xr)))
                for x, xr in zip(xs_unit, ref.x))
    if worst <= tol:
        return None
    prob, variables = struct.build(_constant(values))
    for v, x in zip(variables, xs_unit):
        v.value = _sym(x) if v.attributes.get("symmetric") else x
    viol = max((float(np.max(c.violation())) for c in prob.constraints), default=0.0)
    gap = float(prob.objective.value) - ref.value
    if prob.objective.NAME == "maximize":
        gap = -gap
    if viol <= feas_tol and gap <= tol * max(1.0, abs(ref.value)):
        return None  # another optimal point (the solution is not unique)
    return f"rel x err {worst:.2e}, violation {viol:.2e}, objective gap {gap:.2e}"


# --------------------------------------------------------------------------- running a case


@dataclass
class Record:
    """The outcome of one check of one item."""

    family: str
    seed: int
    item: int
    backend: str
    dtype: str
    check: str  # "value" or "grad"
    kind: str
    s_b: float
    s_c: float
    outcome: str
    detail: str = ""

    def line(self) -> str:
        return (f"{self.outcome:15s} {self.family}/{self.check} seed={self.seed} item={self.item} "
                f"backend={self.backend} {self.dtype} kind={self.kind} s_b={self.s_b:.0e} "
                f"s_c={self.s_c:.0e}: {self.detail}")


@dataclass
class Item:
    kind: str
    s_b: float
    s_c: float
    unit: dict  # unit-scale values as drawn
    given: dict  # the layer's inputs (scaled, rounded to the dtype), float64 arrays
    ref_values: dict  # given / scale factor: the unit-scale problem the layer was actually posed


def _factor(p: Param, s_b, s_c):
    return s_c ** p.a * s_b ** p.b


def draw_items(struct: Structure, seed: int, batch: int, dtype) -> list[Item]:
    """The case's items, each from its own generator ``default_rng([seed, i])``."""
    items = []
    for i in range(batch):
        r = np.random.default_rng([seed, i])
        kind = struct.kinds[int(r.integers(len(struct.kinds)))]
        s_b = float(r.choice(SCALES)) if "b" in struct.scaled and r.random() < 0.5 else 1.0
        s_c = float(r.choice(SCALES)) if "c" in struct.scaled and r.random() < 0.5 else 1.0
        unit = struct.item(r, kind)
        given, ref_values = {}, {}
        for name, p in struct.params.items():
            f = _factor(p, s_b, s_c)
            scaled = torch.as_tensor(unit[name] * f).to(dtype).double().numpy()
            given[name] = scaled
            ref_values[name] = scaled / f
        items.append(Item(kind, s_b, s_c, unit, given, ref_values))
    return items


def _extreme(item: Item) -> bool:
    return max(abs(math.log10(item.s_b)), abs(math.log10(item.s_c))) >= math.log10(EXTREME)


def _backends(struct: Structure, layer) -> list[str]:
    if struct.qp:  # QPLayer's default is the native solver; ECOS takes no quadratic term
        return ["native", "clarabel", "scs"] + ([] if "P" in struct.params else ["ecos"])
    dims, quadratic = layer.template.dims, layer.template.P_map is not None
    return ["auto"] + [b for b in BACKENDS if get_backend(b).supports(dims, quadratic) is None]


def _call(struct, layer, tensors, backend):
    args = {"on_failure": "nan"}
    if backend != "auto":
        args["solver"] = backend
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateWarning etc. are diagnostics, not outcomes
        if struct.qp:
            out = layer(*[tensors.get(k) for k in ("P", "q", "G", "h", "A", "b")],
                        solver_args=args)
            return [out]
        return list(layer(*tensors.values(), solver_args=args))


def _refusal(ref: Reference, item: Item) -> str:
    if ref.status is None:
        return "undecided"
    if ref.status != "optimal":
        return "correct_failure"
    return "refused_extreme" if _extreme(item) else "false_failure"


def run_case(family: str, seed: int, batch: int = 6, dtype=torch.float64, grad: int = 2,
             backends: tuple | None = None) -> list[Record]:
    """Draw case ``seed`` of ``family`` and check its items on every backend that supports it.

    Args:
        family: a key of :data:`FAMILIES`.
        seed: the case's seed (structure and items).
        batch: items in the one batched call.
        dtype: the inputs' dtype.
        grad: how many items (the first feasible ones the reference solves) get a gradient check.
        backends: restrict to these backends (default: ``"auto"`` and all that support it).

    Returns:
        One :class:`Record` per item, backend and check.
    """
    struct = FAMILIES[family](np.random.default_rng(seed))
    items = draw_items(struct, seed, batch, dtype)
    dname = str(dtype).replace("torch.", "")
    refs = [reference(struct, it.ref_values) for it in items]

    def rec(i, backend, check, outcome, detail=""):
        if i is None:  # the whole case (the layer could not be built)
            return Record(family, seed, -1, backend, dname, check, "-", 1.0, 1.0, outcome, detail)
        it = items[i]
        return Record(family, seed, i, backend, dname, check, it.kind, it.s_b, it.s_c, outcome,
                      detail)

    if struct.qp:
        layer = QPLayer()
    else:
        params = {name: cp.Parameter(p.shape, name=name, **p.attrs)
                  for name, p in struct.params.items()}
        try:
            prob, variables = struct.build(lambda name: params[name])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer = CvxpyLayer(prob, list(params.values()), variables)
        except ProblemError as err:
            return [rec(None, "auto", "value", "unsupported", f"ProblemError: {err}")]
        except Exception as err:  # noqa: BLE001 - anything else is what the fuzzer looks for
            return [rec(None, "auto", "value", "crash",
                        f"constructor raised {type(err).__name__}: {err}")]
    grad_items = [i for i, (it, rf) in enumerate(zip(items, refs))
                  if rf.status == "optimal" and it.kind == "feasible"][:grad]
    fds = {i: _finite_difference(struct, items[i], refs[i], np.random.default_rng([seed, i, 1]))
           for i in grad_items}
    tol = TOL[dtype]
    records = []
    for backend in backends or _backends(struct, layer):
        loosen = LOOSEN.get(backend, 1.0)
        tensors = {name: torch.tensor(np.stack([it.given[name] for it in items]), dtype=dtype,
                                      requires_grad=bool(grad_items))
                   for name in struct.params}
        try:
            outs = _call(struct, layer, tensors, backend)
            statuses = list(layer.info.status)
        except (SolverError, InputError) as err:
            records += [rec(i, backend, "value", _refusal(refs[i], items[i]),
                            f"call raised {type(err).__name__}: {str(err)[:120]}")
                        for i in range(batch)]
            continue
        except Exception as err:  # noqa: BLE001
            records += [rec(i, backend, "value", "crash",
                            f"call raised {type(err).__name__}: {str(err)[:160]}")
                        for i in range(batch)]
            continue
        right = set()
        for i, (it, rf) in enumerate(zip(items, refs)):
            xs = [o[i].detach().double().numpy() for o in outs]
            finite = all(np.isfinite(x).all() for x in xs)
            status = statuses[i].name
            if not statuses[i].ok:
                if finite or any(np.isfinite(x).any() for x in xs):
                    outcome, detail = "silent_wrong", f"status {status} but numbers, not NaN"
                else:
                    outcome, detail = _refusal(rf, it), f"status {status}, reference {rf.status}"
            elif not finite:
                outcome, detail = "crash", "status OPTIMAL with NaN/Inf in the answer"
            elif rf.status is None:
                outcome, detail = "undecided", "no reference solver finished"
            elif rf.status != "optimal":
                outcome, detail = "silent_wrong", f"status OPTIMAL, reference {rf.status}"
            else:
                wrong = _check_answer(struct, it.ref_values, rf, [x / it.s_b for x in xs],
                                      tol.value * loosen, tol.feas * loosen)
                outcome, detail = ("right", "") if wrong is None else ("silent_wrong", wrong)
                if wrong is None:
                    right.add(i)
            records.append(rec(i, backend, "value", outcome, detail))
        checked = [i for i in grad_items if i in right]
        if checked:
            records += _grad_records(struct, items, fds, checked, tensors, outs, tol, loosen,
                                     lambda i, o, d: rec(i, backend, "grad", o, d))
    return records


def _direction(struct, item, r):
    """A unit direction in the unit-scale parameters (symmetric where the parameter is)."""
    d = {}
    for name, p in struct.params.items():
        v = r.standard_normal(p.shape)
        if p.attrs.get("symmetric"):
            v = _sym(v)
        if struct.qp and name == "P":
            v = np.zeros(p.shape)  # P must stay PSD for the reference; q, G, h, A, b move
        d[name] = v
    if struct.tie is not None:
        d = struct.tie(d)
    norm = math.sqrt(sum(float(np.sum(v * v)) for v in d.values()))
    return {k: v / norm for k, v in d.items()}


@dataclass
class FiniteDifference:
    """The reference directional derivative of ``⟨w, x_unit⟩`` along ``delta``.

    ``central`` uses the step :data:`FD_STEP`; ``gap`` is ``|forward − backward|`` at that step
    (curvature, or a kink), ``spread`` is ``|central(h) − central(h/2)|`` (truncation and the
    reference's own noise, which is ~1e-8 in x for exponential cones).
    """

    delta: dict
    w: list
    central: float
    gap: float
    spread: float


def _finite_difference(struct, item, base, r) -> FiniteDifference | None:
    """Central differences of tight reference solves around ``item`` (None if one fails)."""
    delta = _direction(struct, item, r)
    w = [r.standard_normal(np.shape(x)) for x in base.x]
    f = {0.0: sum(float(np.sum(wi * xi)) for wi, xi in zip(w, base.x))}
    for t in (FD_STEP, -FD_STEP, FD_STEP / 2, -FD_STEP / 2):
        rf = reference(struct, {k: v + t * delta[k] for k, v in item.ref_values.items()})
        if rf.status != "optimal":
            return None
        f[t] = sum(float(np.sum(wi * xi)) for wi, xi in zip(w, rf.x))
    h = FD_STEP
    forward, backward = (f[h] - f[0.0]) / h, (f[0.0] - f[-h]) / h
    half = (f[h / 2] - f[-h / 2]) / h
    return FiniteDifference(delta, w, (forward + backward) / 2, abs(forward - backward),
                            abs((forward + backward) / 2 - half))


def _grad_records(struct, items, fds, checked, tensors, outs, tol, loosen, rec):
    records = []
    loss = 0.0
    for i in checked:
        if fds[i] is None:
            continue
        w = fds[i].w
        for o, wi in zip(outs, w):
            loss = loss + (o[i] * torch.as_tensor(wi, dtype=o.dtype)).sum()
    if not torch.is_tensor(loss):
        return [rec(i, "undecided", "reference failed at a finite-difference point")
                for i in checked]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
    except (SolverError, InputError) as err:
        return [rec(i, "false_failure", f"backward raised {type(err).__name__}: {err}")
                for i in checked]
    except Exception as err:  # noqa: BLE001
        return [rec(i, "crash", f"backward raised {type(err).__name__}: {str(err)[:160]}")
                for i in checked]
    for i in checked:
        if fds[i] is None:
            records.append(rec(i, "undecided", "reference failed at a finite-difference point"))
            continue
        fd, it = fds[i], items[i]
        central, gap = fd.central, fd.gap
        layer_dir = 0.0
        for (name, p), g in zip(struct.params.items(), grads):
            if g is not None:
                f = _factor(p, it.s_b, it.s_c)
                layer_dir += float((g[i].double() * torch.as_tensor(fd.delta[name] * f)).sum())
        layer_dir /= it.s_b  # the derivative of ⟨w, x_unit⟩ = ⟨w, x⟩ / s_b
        if gap > KINK * (1 + abs(central)):
            records.append(rec(i, "undecided", f"kink: one-sided differences differ by {gap:.1e}"))
        elif not math.isfinite(layer_dir):
            records.append(rec(i, "crash", f"non-finite gradient {layer_dir}"))
        else:
            err = abs(layer_dir - central)
            bound = loosen * (tol.grad_rel * abs(central) + tol.grad_abs) + gap + fd.spread
            records.append(rec(i, "right" if err <= bound else "silent_wrong",
                               "" if err <= bound else
                               f"directional derivative {layer_dir:.6g}, finite differences "
                               f"{central:.6g} (err {err:.1e} > {bound:.1e})"))
    return records


# --------------------------------------------------------------------------- reporting


def table(records: list[Record]) -> str:
    """Counts per family (and check) and outcome, as a fixed-width table."""
    counts = Counter((f"{r.family}/{r.check}", r.outcome) for r in records)
    rows = sorted({k for k, _ in counts})
    head = f"{'family/check':24s}" + "".join(f"{o[:13]:>14s}" for o in OUTCOMES)
    lines = [head]
    for row in rows:
        lines.append(f"{row:24s}" + "".join(f"{counts[(row, o)]:14d}" for o in OUTCOMES))
    total = Counter(r.outcome for r in records)
    lines.append(f"{'total':24s}" + "".join(f"{total[o]:14d}" for o in OUTCOMES))
    return "\n".join(lines)


def summary(records: list[Record], first: int = 12) -> str:
    """The table and the first offending records (each with what reproduces it)."""
    bad = [r for r in records if r.outcome in BAD]
    lines = [table(records), "", f"{len(bad)} offending checks (targets: 0 of {', '.join(BAD)});"
             " reproduce one with `python benchmarks/fuzz_report.py --family F --seed S "
             "--dtype D`:"]
    lines += [r.line() for r in bad[:first]]
    return "\n".join(lines)


def run(families=None, cases: int = 2, batch: int = 6, grad: int = 2, seed: int = 0,
        dtypes=(torch.float64, torch.float32)) -> list[Record]:
    """``cases`` cases per family (dtypes alternate); case seeds ``seed*10_000 + 100*f + k``."""
    records = []
    for family in families or FAMILIES:
        f = list(FAMILIES).index(family)
        for k in range(cases):
            records += run_case(family, seed * 10_000 + 100 * f + k, batch,
                                dtypes[k % len(dtypes)], grad)
    return records
