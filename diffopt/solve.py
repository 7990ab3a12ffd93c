"""``cone_solve``: the one ``torch.autograd.Function`` with a hand-derived derivative.

Forward: a solver backend returns ``(x, y, s)`` and a status per item. Backward (VJP) and forward
mode (JVP): a :class:`~diffopt.solvers.base.Differentiator` solves with the Jacobian of the
optimality conditions, and the data gradients follow from ``dR = [dP x + dAᵀy + dc ; dA x − db]``:

.. math::

    ∇c = λ_1,\\quad ∇b = −λ_2,\\quad ∇A = yλ_1^\\top + λ_2 x^\\top,\\quad
    ∇P = \\tfrac12(λ_1 x^\\top + x λ_1^\\top),

restricted to the entries on the sparsity patterns.

torch.func: ``vmap`` maps its dimension onto the batch dimension of the solve (one solve of the
merged batch, no loop over slices); ``jacrev`` and ``jacfwd`` vmap the backward and forward-mode
rules over the directions, which reuse the factorization of the derivative (:class:`_KKTSolve`).
``torch.compile`` treats the solve as a graph break.

Higher orders: the backward and jvp rules are themselves differentiable torch code around
:class:`_KKTSolve`, whose own derivative is again a solve with the same factorization, so
double backward, ``hessian``, ``jacrev(jacrev(...))`` and ``jacfwd(jacrev(...))`` are exact
where ``D`` is locally constant (zero and nonnegative cones at a strictly complementary
solution); elsewhere differentiating a derivative raises (see :meth:`_Call.second_order_limit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from diffopt.cones import ConeDims
from diffopt.diff.kkt import KKTDifferentiator
from diffopt.diff.refine import refine_solution
from diffopt.errors import InputError, ProblemError, SolverError
from diffopt.scaling import ScaledDifferentiator, Scaling, solve_scaled
from diffopt.solvers.base import (Backend, ConeProgram, SparsePattern, Status, one_torch_thread,
                                  pattern_matvec, take_cols)
from diffopt.solvers.options import select_backend, translate
from diffopt.verify import verify

#: The dtype of every solve and derivative (see :func:`cone_solve`).
COMPUTE_DTYPE = torch.float64

#: solver_args keys consumed by diffopt itself (everything else goes to the backend).
CALL_OPTIONS = ("solver", "on_failure", "allow_inaccurate", "kkt", "refine")


def _outer_on_pattern(pattern: SparsePattern, *pairs):
    """The entries of the batched sums of outer products ``Σₖ uₖ vₖᵀ`` on ``pattern``,
    ``(B, nnz)``, for ``pairs`` ``(uₖ, vₖ)`` of ``(B, r)`` and ``(B, c)`` batches.

    A full pattern takes one batched GEMM ``[u₁ u₂ …][v₁ v₂ …]ᵀ``, which writes the ``(B, r·c)``
    result once; the products and sums one by one wrote three or four fresh tensors of that
    size (OptNet's QP at B = 128: backward 34.4-36.9 -> 33.7-34.9 ms).
    """
    u0 = pairs[0][0]
    if pattern.is_full:
        U = torch.stack([u for u, _ in pairs], 2)
        V = torch.stack([v for _, v in pairs], 1)
        return torch.bmm(U, V).reshape(u0.shape[0], -1)
    rows = torch.as_tensor(pattern.rows, device=u0.device)
    cols = torch.as_tensor(pattern.cols, device=u0.device)
    out = None
    for u, v in pairs:
        a, b = take_cols(u, rows), take_cols(v, cols)
        out = a * b if out is None else torch.addcmul(out, a, b)
    return out


@dataclass
class SolveInfo:
    """Per-item diagnostics of the last solve (and, after backward, of its derivative).

    Examples:
        >>> import torch
        >>> from diffopt import QPLayer
        >>> layer = QPLayer()
        >>> x = layer(torch.eye(2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64))
        >>> info = layer.info
        >>> info.status[0].name, len(info.status), max(info.primal_residual) < 1e-8
        ('OPTIMAL', 3, True)

    Attributes:
        status: canonical :class:`~diffopt.Status` per item, set by the verified residuals
            (:mod:`diffopt.verify`), whatever the backend reported.
        iterations: iterations per item, as reported by the backend.
        solve_time: seconds per item, as reported by the backend.
        primal_residual: relative primal residual per item (``Ax + s = b``, ``s ∈ K``).
        dual_residual: relative dual residual per item (``Px + Aᵀy + c = 0``, ``y ∈ K*``).
        gap: relative complementarity gap ``|sᵀy|`` per item.
        backend_status: the status the backend reported, per item.
        degenerate: per item, True when its KKT system was singular and the gradient came from
            a least-squares solve (None until a derivative was computed).
        errors: ``{item: "ExceptionType: message"}`` for the items whose backend raised (status
            ``NUMERICAL_ERROR``; the other items keep their answers).
        refine_steps: per item, the Newton steps of solution refinement kept (0: the backend's
            answer as it came; empty when refinement did not run).
    """

    status: list[Status]
    iterations: list[int] = field(default_factory=list)
    solve_time: list[float] = field(default_factory=list)
    primal_residual: list[float] = field(default_factory=list)
    dual_residual: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    backend_status: list[Status] = field(default_factory=list)
    degenerate: list[bool] | None = None
    errors: dict[int, str] = field(default_factory=dict)
    refine_steps: list[int] = field(default_factory=list)

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
    refine: bool | str = "auto"
    info: SolveInfo | None = None
    # filled by forward, in the solution's dtype (float64 for the CPU conic backends)
    program: ConeProgram | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    s: torch.Tensor | None = None
    ok: torch.Tensor | None = None
    scaling: Scaling | None = None
    _diff: object = None

    def differentiator(self):
        if self._diff is None:
            # J of the equilibrated program, where the data are of order one: in the original
            # one, entries 1e8 apart (fuzz socp seed 300 item 1) cost the gradient 10%.
            sc = self.scaling.to(self.x.dtype)
            inner = KKTDifferentiator(sc.program(self.program), *sc.point(self.x, self.y, self.s),
                                      self.ok, self.kkt)
            self._diff = ScaledDifferentiator(inner, sc)
        return self._diff

    def one_thread(self) -> bool:
        """Whether the derivative runs on one torch thread (the backend's
        ``one_thread_derivative`` for this solve)."""
        return self.backend.one_thread_derivative(self.program, self.options)

    def second_order_limit(self) -> str | None:
        """Why the derivative of this solve's derivative is not available, or None.

        ``_KKTSolve`` differentiates ``J = [[P, AᵀD], [A, D − I]]`` in ``P`` and ``A`` with
        ``D`` held fixed: exact for the zero and nonnegative cones, whose ``D`` is locally
        constant, but not for cones whose ``D`` moves with the solution, nor for the barrier
        system of ``mu > 0``.
        """
        curved = [k for k in ("soc", "psd", "exp") if getattr(self.dims, k)]
        if curved:
            return (f"this problem has {'/'.join(curved)} cone(s), whose projection Jacobian "
                    "moves with the solution (its derivative is not implemented)")
        if float(self.options.get("mu", 0.0)) > 0:
            return "the log-barrier derivative (mu > 0) is not differentiated again"
        return None

    def record_degenerate(self) -> None:
        """Copy the differentiator's per-item degeneracy flags (set by its solves) into ``info``."""
        if self.info is not None:
            flags = getattr(self._diff, "degenerate", None)  # backends may not flag items
            # One transfer: bool() of each element of a GPU tensor would synchronize per item
            # (B = 4096 on an H100: 4,096 syncs, most of a 44 ms backward, profiled).
            self.info.degenerate = ([False] * len(self.info.status) if flags is None
                                    else [bool(d) for d in torch.as_tensor(flags).tolist()])


def _describe(failed: dict, errors: dict[int, str]) -> str:
    kinds: dict[Status, list[int]] = {}
    for i, st in failed.items():
        kinds.setdefault(st, []).append(i)
    text = "; ".join(f"items {idx} {st.name}: {st.value}" for st, idx in kinds.items())
    raised = "; ".join(f"item {i}: {msg}" for i, msg in errors.items() if i in failed)
    return text + (f"; the backend raised for {raised}" if raised else "")


class _ConeSolve(torch.autograd.Function):
    @staticmethod
    def forward(P_values, c, A_values, b, call: _Call):
        B = c.shape[0]
        program = ConeProgram(call.P_pattern, P_values if call.P_pattern is not None else None,
                              c, call.A_pattern, A_values, b, call.dims)
        sol, scaling = solve_scaled(call.backend, program, call.options)
        backend_status = list(sol.status)  # the backend's own labels, before refinement
        sol = refine_solution(program, sol, call.refine, call.kkt,
                              call.backend.one_thread_derivative(program, call.options))
        verdict = verify(program, sol, scaling, call.options, call.allow_inaccurate)
        ok_status = verdict.ok.tolist()
        dt, dev = sol.x.dtype, sol.x.device
        ok = verdict.ok.to(dev)
        x, y, s = (torch.where(ok[:, None], t, torch.zeros_like(t)) for t in (sol.x, sol.y, sol.s))
        def clean(t):  # items with NaN or Inf data are failed: zeros keep their J finite
            return torch.nan_to_num(t.detach().to(dt), nan=0.0, posinf=0.0, neginf=0.0)

        work = ConeProgram(
            call.P_pattern, None if program.P_values is None else clean(P_values), clean(c),
            call.A_pattern, clean(A_values), clean(b), call.dims,
        )
        info = SolveInfo(
            status=verdict.status, iterations=list(sol.iterations),
            solve_time=list(sol.solve_time), primal_residual=verdict.primal,
            dual_residual=verdict.dual, gap=verdict.gap, backend_status=backend_status,
            errors=dict(sol.errors), refine_steps=list(sol.refine_steps),
        )
        call.info = info
        failed = {i: st for i, (st, good) in enumerate(zip(verdict.status, ok_status)) if not good}
        if failed and call.on_failure == "raise":
            raise SolverError(
                f"{len(failed)} of {B} problem(s) in the batch were not solved "
                f"({_describe(failed, sol.errors)}). "
                "Pass solver_args={'on_failure': 'nan'} to return NaN for failed items (with zero "
                "gradient) instead of raising; statuses and residuals are in layer.info.",
                failed,
            )
        call.program, call.x, call.y, call.s, call.ok = work, x, y, s, ok
        call.scaling = scaling
        call._diff = sol.differentiator
        # In the solution's dtype; failed items are NaN, which is how backward and jvp find them.
        nan = torch.tensor(float("nan"), dtype=dt, device=dev)
        return tuple(torch.where(ok[:, None], t, nan) for t in (x, y, s))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[4]
        ctx.dtypes = [t.dtype for t in inputs[:4]]
        # The backward and jvp rules read the solution from the outputs, not from ``call``: under
        # vmap(grad(...)) they see one slice of the vmapped batch, while ``call`` holds the merged
        # batch that was actually solved (and factored).
        # P's and A's values too: the derivative's own derivative (higher orders) moves J with them.
        ctx.save_for_backward(inputs[0], inputs[2], *output)
        ctx.save_for_forward(inputs[0], inputs[2], *output)

    @staticmethod
    def vmap(info, in_dims, P_values, c, A_values, b, call):
        # A vmapped dimension of size V becomes part of the batch: the solve sees V·B items,
        # vmap index major; unbatched inputs are broadcast. layer.info lists all V·B items.
        V = info.batch_size

        def merge(t, dim):
            t = t.expand(V, *t.shape) if dim is None else t.movedim(dim, 0)
            return t.reshape(V * t.shape[1], *t.shape[2:])

        data = (merge(t, d) for t, d in zip((P_values, c, A_values, b), in_dims[:4]))
        outs = _ConeSolve.apply(*data, call)
        return tuple(o.unflatten(0, (V, -1)) for o in outs), (0, 0, 0)

    @staticmethod
    def backward(ctx, gx, gy, gs):
        with one_torch_thread(ctx.call.one_thread()):
            return _ConeSolve._vjp(ctx, gx, gy, gs)

    @staticmethod
    def _vjp(ctx, gx, gy, gs):
        call: _Call = ctx.call
        P_values, A_values, x, y, s, ok = _solution(ctx.saved_tensors)

        def prep(g, like):
            if g is None:
                return torch.zeros_like(like)
            g = g.to(x.dtype)
            return torch.where(ok[:, None], g, torch.zeros_like(g))

        l1, l2 = _KKTSolve.apply(x, P_values, A_values, call, "adjoint",
                                 prep(gx, x), prep(gy, y), prep(gs, s))
        l1 = torch.where(ok[:, None], l1, torch.zeros_like(l1))
        l2 = torch.where(ok[:, None], l2, torch.zeros_like(l2))
        # P's and A's values often need none (a layer's constant matrices).
        need_P, _, need_A, _, _ = ctx.needs_input_grad
        gA = _outer_on_pattern(call.A_pattern, (y, l1), (l2, x)) if need_A else None
        gP = None
        if need_P and call.P_pattern is not None:
            h1, hx = 0.5 * l1, 0.5 * x
            gP = _outer_on_pattern(call.P_pattern, (h1, x), (hx, l1)).to(ctx.dtypes[0])
        if gA is not None:
            gA = gA.to(ctx.dtypes[2])
        return gP, l1.to(ctx.dtypes[1]), gA, (-l2).to(ctx.dtypes[3]), None

    @staticmethod
    def jvp(ctx, dPv, dc, dAv, db, _):
        if _forward_over_forward():
            raise ProblemError(
                "forward mode over forward mode (jacfwd(jacfwd(...))) through a layer is not "
                "supported: torch.func drops the outer derivative of this rule's solve. Use "
                "torch.func.hessian (jacfwd(jacrev(...))), jacrev(jacrev(...)) or "
                "jacrev(jacfwd(...)), which are exact for LPs and QPs."
            )
        with one_torch_thread(ctx.call.one_thread()):
            return _ConeSolve._jvp(ctx, dPv, dc, dAv, db)

    @staticmethod
    def _jvp(ctx, dPv, dc, dAv, db):
        call: _Call = ctx.call
        P_values, A_values, x, y, _s, ok = _solution(ctx.saved_tensors)
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
        dx, dy, ds = _KKTSolve.apply(x, P_values, A_values, call, "tangent", dr1, dr2)
        return tuple(torch.where(ok[:, None], d, torch.zeros_like(d)) for d in (dx, dy, ds))


def _forward_over_forward() -> bool:
    """Whether two torch.func forward-mode transforms (jvp, jacfwd) are active at once."""
    stack = retrieve_all_functorch_interpreters()
    return sum(i.key() == TransformType.Jvp for i in stack) > 1


def _solution(saved):
    """The saved ``(P_values, A_values, x, y, s)``, in the solution's dtype, with failed items
    (NaN rows of the solution) zeroed, and the ``ok`` mask."""
    P_values, A_values, x, y, s = saved
    ok = ~torch.isnan(x).any(1)
    x, y, s = (torch.where(ok[:, None], t, torch.zeros_like(t)) for t in (x, y, s))
    return P_values.to(x.dtype), A_values.to(x.dtype), x, y, s, ok


class _KKTSolve(torch.autograd.Function):
    """The adjoint or tangent solve of ``call``'s differentiator, as a function torch.func can vmap.

    ``anchor`` (the solution ``x``) is batched exactly at the vmap levels that
    :meth:`_ConeSolve.vmap` merged into the solved batch. At such a level the right-hand sides are
    merged the same way; at any other level (the directions of jacrev/jacfwd, or a vmap over
    the backward) each direction is one more solve with the same factorization.

    Its own derivatives (used by second and higher derivatives of a layer) are solves again. The
    adjoint ``λ = −J⁻ᵀ[g_x; D g_y + (D − I) g_s]`` and the tangent
    ``(dx, D dv, (D − I) dv)`` with ``dz = −J⁻¹ r`` are adjoint linear maps of each other, and
    ``J`` moves with ``P`` and ``A`` (``D`` held fixed, see :meth:`_Call.second_order_limit`):
    ``dλ = −J⁻ᵀ(dr + dJᵀλ)`` and ``d(dz) = −J⁻¹(dr + dJ dz)``.
    """

    @staticmethod
    def forward(anchor, P_values, A_values, call, kind, *rhs):
        diff = call.differentiator()
        out = diff.adjoint(*rhs) if kind == "adjoint" else diff.tangent(*rhs)
        call.record_degenerate()
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call, ctx.kind = inputs[3], inputs[4]
        ctx.save_for_backward(*inputs[:3], *output)
        ctx.save_for_forward(*inputs[:3], *output)

    @staticmethod
    def _check(ctx, moving) -> None:
        why = ctx.call.second_order_limit()
        if why is not None and moving:
            raise ProblemError(
                f"second-order derivatives through this layer are not available: {why}. Exact "
                "higher-order derivatives (double backward, hessian, jacrev(jacrev(...)), "
                "jacfwd(jacrev(...))) are implemented for LPs and QPs (zero and nonnegative "
                "cones, gradient='exact' or the native solver with mu=0); differentiate once "
                "(no create_graph=True) or use a finite difference of the gradient."
            )

    @staticmethod
    def backward(ctx, *gouts):
        anchor, P_values, A_values, *out = ctx.saved_tensors
        call = ctx.call
        _KKTSolve._check(ctx, any(ctx.needs_input_grad[:3]))
        g = [torch.zeros_like(o) if go is None else go for go, o in zip(gouts, out)]
        if ctx.kind == "adjoint":  # out = (λ_x, λ_v); the cotangent's tangent solve μ
            mu = _KKTSolve.apply(anchor, P_values, A_values, call, "tangent", *g)
            lx, lv, mx, my = out[0], out[1], mu[0], mu[1]
            g_rhs = mu
        else:  # out = (dx, dy, ds); the cotangent's adjoint solve ν
            nu = _KKTSolve.apply(anchor, P_values, A_values, call, "adjoint", *g)
            lx, lv, mx, my = nu[0], nu[1], out[0], out[1]
            g_rhs = nu
        # ⟨ḡ, dout⟩ = lᵀ dJ m: dP on (l_x, m_x), dA on (l_v, m_x) and (D m_v, l_x).
        gP = gA = None
        if ctx.needs_input_grad[1] and call.P_pattern is not None:
            gP = _outer_on_pattern(call.P_pattern, (0.5 * lx, mx), (0.5 * mx, lx))
        if ctx.needs_input_grad[2]:
            gA = _outer_on_pattern(call.A_pattern, (lv, mx), (my, lx))
        return (None, gP, gA, None, None, *g_rhs)

    @staticmethod
    def jvp(ctx, d_anchor, dP, dA, _call, _kind, *d_rhs):
        anchor, P_values, A_values, *out = ctx.saved_tensors
        call = ctx.call
        _KKTSolve._check(ctx, any(t is not None for t in (d_anchor, dP, dA)))
        rhs = [torch.zeros_like(o) if d is None else d for d, o in
               zip(d_rhs, out if ctx.kind == "tangent" else (anchor, out[1], out[1]))]
        if ctx.kind == "adjoint":  # dλ = −J⁻ᵀ(dr + dJᵀλ), dJᵀλ = [dPᵀλ_x + dAᵀλ_v ; D dA λ_x]
            lx, lv = out
            if dA is not None:
                rhs[0] = rhs[0] + pattern_matvec(dA, call.A_pattern, lv, transpose=True)
                rhs[1] = rhs[1] + pattern_matvec(dA, call.A_pattern, lx)  # D applied by adjoint
            if dP is not None and call.P_pattern is not None:
                rhs[0] = rhs[0] + pattern_matvec(dP, call.P_pattern, lx, transpose=True)
        else:  # d(dz) = −J⁻¹(dr + dJ dz), dJ dz = [dP dx + dAᵀ D dv ; dA dx], D dv = dy
            dx, dy, _ = out
            if dA is not None:
                rhs[0] = rhs[0] + pattern_matvec(dA, call.A_pattern, dy, transpose=True)
                rhs[1] = rhs[1] + pattern_matvec(dA, call.A_pattern, dx)
            if dP is not None and call.P_pattern is not None:
                rhs[0] = rhs[0] + pattern_matvec(dP, call.P_pattern, dx)
        return _KKTSolve.apply(anchor, P_values, A_values, call, ctx.kind, *rhs)

    @staticmethod
    def vmap(info, in_dims, anchor, P_values, A_values, call, kind, *rhs):
        V = info.batch_size
        tensors = (anchor, P_values, A_values, *rhs)
        dims = (*in_dims[:3], *in_dims[5:])
        if in_dims[0] is not None:
            merged = [(t.expand(V, *t.shape) if d is None else t.movedim(d, 0)).flatten(0, 1)
                      for t, d in zip(tensors, dims)]
            outs = _KKTSolve.apply(*merged[:3], call, kind, *merged[3:])
            outs = tuple(o.unflatten(0, (V, -1)) for o in outs)
        else:
            lead = [t if d is None else t.movedim(d, 0) for t, d in zip(tensors, dims)]
            per = []
            for k in range(V):
                ts = [t if d is None else t[k] for t, d in zip(lead, dims)]
                per.append(_KKTSolve.apply(*ts[:3], call, kind, *ts[3:]))
            outs = tuple(torch.stack(o) for o in zip(*per))
        return outs, (0,) * len(outs)


def make_call(solver_args: dict, solver: str, P_pattern: SparsePattern | None,
              A_pattern: SparsePattern, dims: ConeDims, defaults: dict | None = None) -> _Call:
    """Split ``solver_args`` (over a layer's ``defaults``; cvxpylayers' keys translated) into
    diffopt's own options and the backend's, and pick the backend."""
    args = {**translate(defaults or {}), **translate(solver_args)}
    own = {k: args.pop(k) for k in CALL_OPTIONS if k in args}
    on_failure = own.get("on_failure", "raise")
    if on_failure not in ("raise", "nan"):
        raise InputError(f"on_failure must be 'raise' or 'nan', received {on_failure!r}")
    refine = own.get("refine", "auto")
    if refine not in (True, False, "auto"):
        raise InputError(f"refine must be True, False or 'auto', received {refine!r}")
    backend = select_backend(own.get("solver", solver), dims, P_pattern is not None, args)
    return _Call(P_pattern, A_pattern, dims, backend, args, on_failure,
                 bool(own.get("allow_inaccurate", False)), own.get("kkt", "auto"), refine)


# torch.compile: the solve (NumPy/C solvers, Python control flow) is a graph break and runs eagerly.
@torch.compiler.disable
def cone_solve(P_values, c, A_values, b, call: _Call):
    """Solve a batch of cone programs; differentiable in ``(P_values, c, A_values, b)``.

    One numeric policy: the solve and its derivative run in float64 whatever the data's dtype
    (float32, float16, bfloat16); the results, and the gradients, come back in ``c``'s dtype.
    """
    if P_values is None:
        P_values = c.new_zeros(c.shape[0], 0)
    data = (t.to(COMPUTE_DTYPE) for t in (P_values, c, A_values, b))
    return tuple(t.to(c.dtype) for t in _ConeSolve.apply(*data, call))
