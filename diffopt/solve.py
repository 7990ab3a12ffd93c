"""``cone_solve``: the one ``torch.autograd.Function`` with a hand-derived derivative.

Forward: a solver backend returns ``(x, y, s)`` and a status per item. Backward (VJP) and forward
mode (JVP): a :class:`~diffopt.solvers.base.Differentiator` solves with the Jacobian of the
optimality conditions, and the data gradients follow from ``dR = [dP x + dAᵀy + dc ; dA x − db]``:

.. math::

    ∇c = λ_1,\\quad ∇b = −λ_2,\\quad ∇A = yλ_1^\\top + λ_2 x^\\top,\\quad
    ∇P = \\tfrac12(λ_1 x^\\top + x λ_1^\\top),

restricted to the entries on the sparsity patterns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from diffopt.cones import ConeDims
from diffopt.diff.kkt import KKTDifferentiator
from diffopt.errors import InputError, ProblemError, SolverError
from diffopt.solvers import get_backend
from diffopt.solvers.base import Backend, ConeProgram, SparsePattern, Status

#: solver_args keys consumed by diffopt itself (everything else goes to the backend).
CALL_OPTIONS = ("solver", "on_failure", "allow_inaccurate", "kkt")


def pattern_matvec(values, pattern: SparsePattern, vec, transpose: bool = False):
    """``M @ vec`` (or ``Mᵀ @ vec``) for a batch of sparse ``M`` with a shared pattern."""
    rows = torch.as_tensor(pattern.rows, device=vec.device)
    cols = torch.as_tensor(pattern.cols, device=vec.device)
    src, dst, size = (rows, cols, pattern.shape[1]) if transpose else (cols, rows, pattern.shape[0])
    out = vec.new_zeros(vec.shape[0], size)
    return out.index_add_(1, dst, values * vec[:, src])


@dataclass
class SolveInfo:
    """Per-item diagnostics of the last solve (and, after backward, of its derivative).

    Attributes:
        status: canonical :class:`~diffopt.Status` per item.
        iterations: iterations per item, as reported by the backend.
        solve_time: seconds per item, as reported by the backend.
        primal_residual: ``‖Ax + s − b‖∞`` per item.
        dual_residual: ``‖Px + Aᵀy + c‖∞`` per item.
        gap: ``|sᵀy|`` per item.
        degenerate: per item, True when its KKT system was singular and the gradient came from
            a least-squares solve (None until a derivative was computed).
    """

    status: list[Status]
    iterations: list[int] = field(default_factory=list)
    solve_time: list[float] = field(default_factory=list)
    primal_residual: list[float] = field(default_factory=list)
    dual_residual: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    degenerate: list[bool] | None = None

    @property
    def ok(self) -> list[bool]:
        """Per item, whether a usable solution was returned."""
        return [s.ok for s in self.status]


@dataclass
class _Call:
    """Everything the Function needs besides the differentiable tensors."""

    P_pattern: SparsePattern | None
    A_pattern: SparsePattern
    dims: ConeDims
    backend: Backend
    options: dict
    on_failure: str = "raise"
    allow_inaccurate: bool = False
    kkt: str = "auto"
    info: SolveInfo | None = None
    # filled by forward, in the solution's dtype (float64 for the CPU conic backends)
    program: ConeProgram | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    s: torch.Tensor | None = None
    ok: torch.Tensor | None = None
    _diff: object = None

    def differentiator(self):
        if self._diff is None:
            self._diff = KKTDifferentiator(self.program, self.x, self.y, self.s, self.ok, self.kkt)
        if self.info is not None:
            self.info.degenerate = [bool(d) for d in getattr(self._diff, "degenerate", [])]
        return self._diff


def _describe(failed: dict) -> str:
    kinds: dict[Status, list[int]] = {}
    for i, st in failed.items():
        kinds.setdefault(st, []).append(i)
    return "; ".join(f"items {idx} {st.name}: {st.value}" for st, idx in kinds.items())


class _ConeSolve(torch.autograd.Function):
    @staticmethod
    def forward(P_values, c, A_values, b, call: _Call):
        B = c.shape[0]
        program = ConeProgram(call.P_pattern, P_values if call.P_pattern is not None else None,
                              c, call.A_pattern, A_values, b, call.dims)
        sol = call.backend.solve(program, call.options)
        ok_status = [st.ok or (call.allow_inaccurate and st is Status.INACCURATE)
                     for st in sol.status]
        dt, dev = sol.x.dtype, sol.x.device
        ok = torch.tensor(ok_status, device=dev)
        x, y, s = (torch.where(ok[:, None], t, torch.zeros_like(t)) for t in (sol.x, sol.y, sol.s))
        work = ConeProgram(
            call.P_pattern, None if program.P_values is None else P_values.detach().to(dt),
            c.detach().to(dt), call.A_pattern, A_values.detach().to(dt), b.detach().to(dt),
            call.dims,
        )
        r_p = pattern_matvec(work.A_values, call.A_pattern, x) + s - work.b
        r_d = pattern_matvec(work.A_values, call.A_pattern, y, transpose=True) + work.c
        if work.P_values is not None:
            r_d = r_d + pattern_matvec(work.P_values, call.P_pattern, x)
        info = SolveInfo(
            status=list(sol.status), iterations=list(sol.iterations),
            solve_time=list(sol.solve_time),
            primal_residual=r_p.abs().amax(1).tolist() if r_p.shape[1] else [0.0] * B,
            dual_residual=r_d.abs().amax(1).tolist() if r_d.shape[1] else [0.0] * B,
            gap=(s * y).sum(1).abs().tolist(),
        )
        call.info = info
        failed = {i: st for i, (st, good) in enumerate(zip(sol.status, ok_status)) if not good}
        if failed and call.on_failure == "raise":
            raise SolverError(
                f"{len(failed)} of {B} problem(s) in the batch were not solved ({_describe(failed)}). "
                "Pass solver_args={'on_failure': 'nan'} to return NaN for failed items (with zero "
                "gradient) instead of raising; statuses and residuals are in layer.info.",
                failed,
            )
        call.program, call.x, call.y, call.s, call.ok = work, x, y, s, ok
        call._diff = sol.differentiator
        nan = torch.tensor(float("nan"), dtype=dt, device=dev)
        outs = [torch.where(ok[:, None], t, nan) for t in (x, y, s)]
        return tuple(t.to(c.dtype) for t in outs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[4]
        ctx.dtypes = [t.dtype for t in inputs[:4]]

    @staticmethod
    @once_differentiable
    def backward(ctx, gx, gy, gs):
        call: _Call = ctx.call
        x, y, ok = call.x, call.y, call.ok
        dt = x.dtype

        def prep(g, like):
            if g is None:
                return torch.zeros_like(like)
            g = g.to(dt)
            return torch.where(ok[:, None], g, torch.zeros_like(g))

        diff = call.differentiator()
        l1, l2 = diff.adjoint(prep(gx, x), prep(gy, y), prep(gs, call.s))
        l1 = torch.where(ok[:, None], l1, torch.zeros_like(l1))
        l2 = torch.where(ok[:, None], l2, torch.zeros_like(l2))
        pa = call.A_pattern
        ra, ca = torch.as_tensor(pa.rows, device=x.device), torch.as_tensor(pa.cols, device=x.device)
        gA = y[:, ra] * l1[:, ca] + l2[:, ra] * x[:, ca]
        gP = None
        if call.P_pattern is not None:
            pp = call.P_pattern
            rp = torch.as_tensor(pp.rows, device=x.device)
            cp_ = torch.as_tensor(pp.cols, device=x.device)
            gP = (0.5 * (l1[:, rp] * x[:, cp_] + x[:, rp] * l1[:, cp_])).to(ctx.dtypes[0])
        return gP, l1.to(ctx.dtypes[1]), gA.to(ctx.dtypes[2]), (-l2).to(ctx.dtypes[3]), None

    @staticmethod
    def jvp(ctx, dPv, dc, dAv, db, _):
        call: _Call = ctx.call
        x, y = call.x, call.y
        dt = x.dtype

        def t(d, like):
            return torch.zeros_like(like) if d is None else d.to(dt)

        dr1 = t(dc, x)
        dr2 = -t(db, y)
        if dAv is not None:
            dAv = dAv.to(dt)
            dr1 = dr1 + pattern_matvec(dAv, call.A_pattern, y, transpose=True)
            dr2 = dr2 + pattern_matvec(dAv, call.A_pattern, x)
        if dPv is not None and call.P_pattern is not None:
            dr1 = dr1 + pattern_matvec(dPv.to(dt), call.P_pattern, x)
        dx, dy, ds = call.differentiator().tangent(dr1, dr2)
        mask = call.ok[:, None]
        out_dt = ctx.dtypes[1]
        return tuple(torch.where(mask, d, torch.zeros_like(d)).to(out_dt) for d in (dx, dy, ds))


def select_backend(name: str, dims: ConeDims, quadratic: bool) -> Backend:
    """The backend called ``name`` (or chosen by ``"auto"``), checked against the program."""
    backend = get_backend(name, dims, quadratic)
    why = backend.supports(dims, quadratic)
    if why is not None:
        raise ProblemError(f"{why}; choose another solver (e.g. solver='clarabel')")
    return backend


def make_call(solver_args: dict, solver: str, P_pattern: SparsePattern | None,
              A_pattern: SparsePattern, dims: ConeDims) -> _Call:
    """Split ``solver_args`` into diffopt's own options and the backend's, and pick the backend."""
    args = dict(solver_args)
    own = {k: args.pop(k) for k in CALL_OPTIONS if k in args}
    on_failure = own.get("on_failure", "raise")
    if on_failure not in ("raise", "nan"):
        raise InputError(f"on_failure must be 'raise' or 'nan', received {on_failure!r}")
    backend = select_backend(own.get("solver", solver), dims, P_pattern is not None)
    return _Call(P_pattern, A_pattern, dims, backend, args, on_failure,
                 bool(own.get("allow_inaccurate", False)), own.get("kkt", "auto"))


def cone_solve(P_values, c, A_values, b, call: _Call):
    """Solve a batch of cone programs; differentiable in ``(P_values, c, A_values, b)``."""
    if P_values is None:
        P_values = c.new_zeros(c.shape[0], 0)
    return _ConeSolve.apply(P_values, c, A_values, b, call)
