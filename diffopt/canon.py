"""CVXPY problem -> parametric cone program, built once per layer.

CVXPY's DPP machinery canonicalizes a parametrized problem into a cone program whose data
``(P, c, A, b)`` are *linear* functions of the parameter vector ``θ``. This module extracts those
maps (composed with the layout of the user's parameter tensors) as sparse matrices, and the
linear recovery maps from the cone program's ``(x, y)`` back to the user's variables and duals.
Both are applied in torch by :class:`diffopt.layers.CvxpyLayer`, so their derivatives come from
autograd; the only hand-derived derivative lives in :mod:`diffopt.solve`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch
from cvxpy.atoms.quad_form import QuadForm
from cvxpy.reductions.dcp2cone.canonicalizers import CANON_METHODS as CONE_CANON_METHODS
from cvxpy.utilities.scopes import quad_form_dpp_scope

from diffopt.cones import ConeDims
from diffopt.errors import ProblemError
from diffopt.solvers.base import SparsePattern


@dataclass(frozen=True)
class AffineMap:
    """``out = M @ [θ_user; 1]`` stored as COO triplets (``M`` has ``size`` rows)."""

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    size: int

    @classmethod
    def from_sparse(cls, M: sp.sparray) -> AffineMap:
        M = sp.coo_array(M)
        M.sum_duplicates()
        keep = M.data != 0
        return cls(M.row[keep].astype(np.int64), M.col[keep].astype(np.int64),
                   M.data[keep].astype(np.float64), int(M.shape[0]))


@dataclass(frozen=True)
class Recovery:
    """How one requested output is read off the solution: ``out = coef * src[idx]``.

    ``src`` is ``"x"`` (primal variables) or ``"y"`` (duals); ``idx``/``coef`` index the output's
    entries in column-major (Fortran) order, as CVXPY stores values; ``shape`` is the output's.
    """

    src: str
    idx: np.ndarray
    coef: np.ndarray
    shape: tuple[int, ...]


def flatten_f(t: torch.Tensor, nbatch: int = 1) -> torch.Tensor:
    """Flatten the trailing dims of ``t`` column-major (CVXPY's order), keeping ``nbatch`` dims."""
    core = t.ndim - nbatch
    perm = list(range(nbatch)) + list(range(t.ndim - 1, nbatch - 1, -1))
    return t.permute(perm).reshape(*t.shape[:nbatch], -1) if core else t.reshape(*t.shape, 1)


def unflatten_f(v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`flatten_f` for one batch dim: ``(B, prod(shape))`` -> ``(B, *shape)``."""
    if not shape:
        return v.reshape(v.shape[0])
    out = v.reshape(v.shape[0], *reversed(shape))
    return out.permute(0, *range(len(shape), 0, -1))


def _culprit(expr, dpp: bool):
    """Deepest sub-expression (or constraint) of ``expr`` that breaks DCP (or, with ``dpp``, DPP),
    for the error message."""
    for arg in getattr(expr, "args", []):
        if not arg.is_dcp(dpp=dpp):
            return _culprit(arg, dpp)
    return expr


def _is_dpp(part, objective: bool) -> bool:
    """DPP test of the objective or of one constraint. The objective is tested in CVXPY's
    quad-form scope: ``quad_form(x, Q)`` with a parameter ``Q`` is DPP there, as CVXPY
    canonicalizes it into the parametric ``P`` of a quadratic objective."""
    if not objective:
        return part.is_dcp(dpp=True)
    with quad_form_dpp_scope():
        return part.is_dcp(dpp=True)


def _parametric_quad_forms(expr, affine_above: bool = True):
    """Yield ``(node, affine_above)`` for each ``quad_form(x, Q)`` in ``expr`` with a parameter in
    ``Q``; ``affine_above`` tells whether every atom above it is affine.

    CVXPY keeps ``Q`` parametric only in the objective with affine atoms above (its Dcp2Cone
    rule); elsewhere it canonicalizes the quad form with ``Q``'s current value as a constant,
    which would silently ignore the parameter. Found structurally, so that a quad-form DPP
    scope the caller may have entered does not hide them.
    """
    if isinstance(expr, QuadForm) and expr.args[1].parameters():
        yield expr, affine_above
    affine_above = affine_above and type(expr) not in CONE_CANON_METHODS
    for arg in getattr(expr, "args", []):
        yield from _parametric_quad_forms(arg, affine_above)


_QUAD_FORM_ALTERNATIVE = (
    "declare a parameter L with Q = L^T L and use cp.sum_squares(L @ x) in place of "
    "quad_form(x, Q) (DPP: L enters linearly), or bound cp.norm(L @ x, 2) (a second-order cone)"
)


def _check_problem(problem, parameters, variables) -> None:
    if not isinstance(problem, cp.Problem):
        raise ProblemError(
            f"expected a cvxpy.Problem, received {type(problem).__name__}; build the problem with "
            "cvxpy.Problem(objective, constraints) and pass it as the first argument"
        )
    for con in problem.constraints:
        if next(_parametric_quad_forms(con), None) is not None:
            raise ProblemError(
                f"the constraint `{con}` contains quad_form(x, Q) with a parameter Q: a "
                "parametric Q is only supported in the objective (as the quadratic term of the "
                f"cone program); to constrain a parametric quadratic, {_QUAD_FORM_ALTERNATIVE}"
            )
    for qf, _ in _parametric_quad_forms(problem.objective):
        if not (qf.args[1].is_psd() or qf.args[1].is_nsd()):
            raise ProblemError(
                f"`{qf}`: quad_form(x, Q) with a parameter Q is convex only for a Q declared "
                "positive semidefinite (cp.Parameter(..., PSD=True), for Minimize) and concave "
                "only for one declared negative semidefinite (NSD=True, for Maximize); declare "
                f"it so, or {_QUAD_FORM_ALTERNATIVE}"
            )
    if not problem.is_dcp():
        parts = [problem.objective] + list(problem.constraints)
        bad = next(p for p in parts if not p.is_dcp())
        hint = ("it is log-log convex (DGP): pass gp=True" if problem.is_dgp() else
                "reformulate it (https://www.cvxpy.org/tutorial/dcp)")
        raise ProblemError(
            "the problem is not DCP (disciplined convex): "
            f"`{_culprit(bad, dpp=False)}` breaks the DCP "
            f"rules, so it is not a convex problem CVXPY can canonicalize; {hint}"
        )
    parts = [problem.objective] + list(problem.constraints)
    bad = next((p for k, p in enumerate(parts) if not _is_dpp(p, objective=k == 0)), None)
    if bad is not None:
        with quad_form_dpp_scope() if bad is problem.objective else contextlib.nullcontext():
            culprit = _culprit(bad, dpp=True)
        hint = ""
        if isinstance(culprit, QuadForm):
            hint = ("; in quad_form(x, Q) with a parameter Q, x must be free of parameters and Q "
                    "affine in them")
        raise ProblemError(
            f"the problem is DCP but not DPP: `{culprit}` uses parameters in a "
            "way DPP "
            "forbids (parameters may only enter affinely, or multiply parameter-free "
            "expressions), so it cannot be canonicalized once for all parameter values; "
            "rewrite it, e.g. replace a product of parameters by one new parameter "
            f"(https://www.cvxpy.org/tutorial/dpp){hint}"
        )
    nested = next((qf for qf, affine in _parametric_quad_forms(problem.objective)
                   if not affine), None)
    if nested is not None:
        raise ProblemError(
            f"`{nested}` (quad_form with a parameter matrix) sits under a non-affine atom of "
            "the objective: a parametric Q is supported only in a sum of objective terms "
            "(scaled by constants); move it to a term of its own, or "
            f"{_QUAD_FORM_ALTERNATIVE}"
        )
    if not problem.parameters():
        raise ProblemError(
            "the problem has no cvxpy.Parameter: a layer maps parameter values to solutions, so "
            "declare the data you want to feed (and differentiate) as cvxpy.Parameter objects"
        )
    if not isinstance(parameters, (list, tuple)) or not all(
        isinstance(p, cp.Parameter) for p in parameters
    ):
        raise ProblemError(
            f"expected `parameters` to be a list of cvxpy.Parameter, received {parameters!r}"
        )
    ids = [p.id for p in parameters]
    if len(set(ids)) != len(ids):
        raise ProblemError("`parameters` lists the same cvxpy.Parameter twice; list each once")
    want = {p.id: p for p in problem.parameters()}
    missing = [want[i].name() for i in want if i not in ids]
    extra = [p.name() for p in parameters if p.id not in want]
    if missing or extra:
        raise ProblemError(
            "`parameters` must exactly match problem.parameters(): "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"not in the problem {extra}" if extra else "")
            + f". The problem's parameters are {[p.name() for p in want.values()]}"
        )
    if not isinstance(variables, (list, tuple)) or not variables:
        raise ProblemError(
            f"expected `variables` to be a non-empty list of cvxpy.Variable, received {variables!r}"
        )
    var_ids = {v.id for v in problem.variables()}
    dual_ids = {d.id for c in problem.constraints for d in c.dual_variables}
    for v in variables:
        if not isinstance(v, cp.Variable) or (v.id not in var_ids and v.id not in dual_ids):
            raise ProblemError(
                f"`variables` must be a subset of problem.variables() and constraint duals: entry "
                f"{v!r} is neither a variable of the problem nor a constraint's dual variable "
                "(constraint.dual_variables[0]); list only those"
            )




class ConeTemplate:
    """The parametric cone program of a CVXPY problem, with its parameter and recovery maps.

    Args:
        problem: a DPP-compliant ``cvxpy.Problem``.
        parameters: the problem's parameters, in the order the layer receives tensors.
        variables: primal variables and/or constraint dual variables to return.

    Attributes:
        dims: the cone of the canonical program.
        n: number of canonical variables.
        m: number of constraint rows.
        param_shapes: shape of each user parameter.
        c_map: :class:`AffineMap` onto ``c``.
        b_map: :class:`AffineMap` onto ``b``.
        A_map: map onto the values of ``A`` on its fixed sparsity pattern ``A_pattern``.
        A_pattern: the :class:`~diffopt.solvers.base.SparsePattern` of ``A``.
        P_map: same for the full symmetric ``P`` (None for linear objectives).
        P_pattern: the pattern of ``P`` (None for linear objectives).
        recoveries: one :class:`Recovery` per requested output.
    """

    def __init__(self, problem: cp.Problem, parameters, variables) -> None:
        _check_problem(problem, parameters, variables)
        data, chain, inverse = problem.get_problem_data(solver=cp.SCS)
        pp = data[cp.settings.PARAM_PROB]
        self.dims = ConeDims.from_cvxpy(data["dims"])
        self.n = int(pp.x.size)
        self.m = int(data["A"].shape[0])
        self.param_shapes = [tuple(p.shape) for p in parameters]

        T = self._user_to_theta(parameters, pp, chain)
        n, m = self.n, self.m
        self.c_map = AffineMap.from_sparse(sp.csr_array(pp.q)[:n] @ T)
        # CVXPY stores vec([A_cvx | b_cvx]) column-major for constraints A_cvx x + b_cvx ∈ K;
        # in the solver form Ax + s = b that is A = −A_cvx, b = b_cvx.
        Ab = sp.csr_array(pp.A)
        self.b_map = AffineMap.from_sparse(Ab[m * n: m * (n + 1)] @ T)
        self.A_map, self.A_pattern = self._pattern_map(-(Ab[: m * n] @ T), (m, n))
        self.P_map = self.P_pattern = None
        if getattr(pp, "P", None) is not None and sp.csr_array(pp.P).nnz:
            self.P_map, self.P_pattern = self._pattern_map(sp.csr_array(pp.P) @ T, (n, n))
        self.recoveries = self._recovery(problem, variables, chain, inverse)

    # -- parameters ---------------------------------------------------------------------------
    def _user_to_theta(self, parameters, pp, chain) -> sp.csr_array:
        """Sparse ``(p+1, N+1)`` map from the user's flattened tensors (plus 1) to CVXPY's θ."""
        reduced = {}
        for red in chain.reductions:
            reduced.update({p.id: r for p, r in getattr(red, "_parameters", {}).items()})
        sizes = [int(np.prod(s, dtype=int)) for s in self.param_shapes]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        N = int(offsets[-1])
        rows, cols, vals = [], [], []
        for p, off in zip(parameters, offsets[:-1]):
            if p.id in pp.param_id_to_col:
                col = pp.param_id_to_col[p.id]
                rows.append(col + np.arange(p.size))
                cols.append(off + np.arange(p.size))
                vals.append(np.ones(p.size))
            elif p.id in reduced and (p.is_symmetric() and p.ndim == 2):
                # Symmetric parameters enter CVXPY as their upper triangle; we feed the
                # symmetrized value ½(S_ij + S_ji) so the gradient w.r.t. S is symmetric too.
                k = p.shape[0]
                iu, ju = np.triu_indices(k)
                col = pp.param_id_to_col[reduced[p.id].id] + np.arange(iu.size)
                for a, b in ((iu, ju), (ju, iu)):
                    rows.append(col)
                    cols.append(off + a + b * k)
                    vals.append(np.full(iu.size, 0.5))
            elif p.id in reduced:
                raise ProblemError(
                    f"parameter {p.name()!r} has a dimension-reducing attribute "
                    f"({p.attributes}) that diffopt does not map yet; declare it without it"
                )
            else:  # the parameter was eliminated (e.g. multiplies a zero-size expression)
                continue
        p_tot = int(pp.total_param_size)
        rows.append(np.array([p_tot]))
        cols.append(np.array([N]))
        vals.append(np.ones(1))
        return sp.csr_array(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(p_tot + 1, N + 1),
        )

    @staticmethod
    def _pattern_map(M, shape) -> tuple[AffineMap, SparsePattern]:
        """Keep the structurally nonzero rows of a column-major ``vec`` map as a pattern."""
        M = sp.csr_array(M)
        nz = np.flatnonzero(np.diff(M.indptr))
        r, c = nz % shape[0], nz // shape[0]
        order = np.lexsort((c, r))  # row-major pattern order
        nz, r, c = nz[order], r[order], c[order]
        return AffineMap.from_sparse(M[nz]), SparsePattern(r, c, shape)

    # -- recovery -----------------------------------------------------------------------------
    def _recovery(self, problem, variables, chain, inverse) -> list[Recovery]:
        """Probe CVXPY's own inverse chain, which is linear in (x, y), to read each output's map.

        Each output entry is a scaled copy of one solution entry (a selection, possibly with
        √2 scaling for PSD duals or copies for symmetric variables). Probing with ``(1, 2, ...)``
        and with ones reveals index and scale; a third random probe verifies the map.
        """
        owner = {c.dual_variables[k].id: (c, k)
                 for c in problem.constraints for k in range(len(c.dual_variables))}

        def probe(x, y):
            sol = {"x": x, "y": y, "s": np.zeros_like(y),
                   "info": {"status_val": 1, "solve_time": 0.0, "setup_time": 0.0,
                            "iter": 0, "pobj": 0.0}}
            out = chain.invert(sol, inverse)
            vals = []
            for v in variables:
                if v.id in owner:
                    con, k = owner[v.id]
                    saved = [d.value for d in con.dual_variables]
                    con.save_dual_value(out.dual_vars[con.id])
                    vals.append(np.asarray(con.dual_variables[k].value, dtype=float))
                    for d, val in zip(con.dual_variables, saved):
                        d.value = val
                else:
                    vals.append(np.asarray(out.primal_vars[v.id], dtype=float))
            return [np.ravel(val, order="F") for val in vals]

        n, m = self.n, self.m
        p1 = probe(np.arange(1.0, n + 1), np.arange(1.0, m + 1))
        p0 = probe(np.ones(n), np.ones(m))
        rng = np.random.default_rng(0)
        x3, y3 = rng.uniform(1, 2, n), rng.uniform(1, 2, m)
        p3 = probe(x3, y3)
        recs = []
        for v, a, c, check in zip(variables, p1, p0, p3):
            src = "y" if v.id in owner else "x"
            idx = np.where(c != 0, np.rint(a / np.where(c != 0, c, 1)) - 1, 0).astype(np.int64)
            rec = Recovery(src, idx, c, tuple(v.shape))
            got = c * (x3 if src == "x" else y3)[idx]
            if not np.allclose(got, check, rtol=1e-12, atol=1e-12):
                raise ProblemError(
                    f"cannot express the recovery of {v!r} as a linear selection of the cone "
                    "program's solution; return the underlying variables instead"
                )
            recs.append(rec)
        return recs
