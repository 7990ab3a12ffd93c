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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from diffopt.cones import ConeDims
from diffopt.diff.kkt import KKTDifferentiator
from diffopt.errors import InputError, ProblemError, SolverError
from diffopt.scaling import solve_scaled
from diffopt.solvers import get_backend
from diffopt.solvers.base import Backend, ConeProgram, SparsePattern, Status, one_torch_thread
from diffopt.verify import verify

#: The dtype of every solve and derivative (see :func:`cone_solve`).
COMPUTE_DTYPE = torch.float64

#: solver_args keys consumed by diffopt itself (everything else goes to the backend).
CALL_OPTIONS = ("solver", "on_failure", "allow_inaccurate", "kkt")


def take_cols(u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``u[:, idx]`` for a ``(B, k)`` batch, as a gather (2-3x faster than indexing on CPU; its
    backward is a scatter-add, not an accumulating index_put)."""
    return torch.gather(u, 1, idx.expand(u.shape[0], -1))


def add_cols(size: int, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[:, idx] += src`` into zeros of shape ``(B, size)``: a scatter-add, whose backward is
    a gather (out of place: vmap-safe)."""
    out = src.new_zeros(src.shape[0], size)
    return out.scatter_add(1, idx.expand(src.shape[0], -1), src)


def pattern_matvec(values, pattern: SparsePattern, vec, transpose: bool = False):
    """``M @ vec`` (or ``Mᵀ @ vec``) for a batch of sparse ``M`` with a shared pattern."""
    rows = torch.as_tensor(pattern.rows, device=vec.device)
    cols = torch.as_tensor(pattern.cols, device=vec.device)
    src, dst, size = (rows, cols, pattern.shape[1]) if transpose else (cols, rows, pattern.shape[0])
    return add_cols(size, dst, values * take_cols(vec, src))


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
    """

    status: list[Status]
    iterations: list[int] = field(default_factory=list)
    solve_time: list[float] = field(default_factory=list)
    primal_residual: list[float] = field(default_factory=list)
    dual_residual: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    backend_status: list[Status] = field(default_factory=list)
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
        return self._diff

    def one_thread(self) -> bool:
        """Whether the derivative runs on one torch thread (the backend's
        ``one_thread_derivative`` for this solve)."""
        return self.backend.one_thread_derivative(self.program, self.options)

    def record_degenerate(self) -> None:
        """Copy the differentiator's per-item degeneracy flags (set by its solves) into ``info``."""
        if self.info is not None:
            flags = getattr(self._diff, "degenerate", None)  # backends may not flag items
            # One transfer: bool() of each element of a GPU tensor would synchronize per item
            # (B = 4096 on an H100: 4,096 syncs, most of a 44 ms backward, profiled).
            self.info.degenerate = ([False] * len(self.info.status) if flags is None
                                    else [bool(d) for d in torch.as_tensor(flags).tolist()])


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
        sol, scaling = solve_scaled(call.backend, program, call.options)
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
            dual_residual=verdict.dual, gap=verdict.gap, backend_status=list(sol.status),
        )
        call.info = info
        failed = {i: st for i, (st, good) in enumerate(zip(verdict.status, ok_status)) if not good}
        if failed and call.on_failure == "raise":
            raise SolverError(
                f"{len(failed)} of {B} problem(s) in the batch were not solved "
                f"({_describe(failed)}). "
                "Pass solver_args={'on_failure': 'nan'} to return NaN for failed items (with zero "
                "gradient) instead of raising; statuses and residuals are in layer.info.",
                failed,
            )
        call.program, call.x, call.y, call.s, call.ok = work, x, y, s, ok
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
        ctx.save_for_backward(*output)
        ctx.save_for_forward(*output)

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
    @once_differentiable
    def backward(ctx, gx, gy, gs):
        with one_torch_thread(ctx.call.one_thread()):
            return _ConeSolve._vjp(ctx, gx, gy, gs)

    @staticmethod
    def _vjp(ctx, gx, gy, gs):
        call: _Call = ctx.call
        x, y, s, ok = _solution(ctx.saved_tensors)

        def prep(g, like):
            if g is None:
                return torch.zeros_like(like)
            g = g.to(x.dtype)
            return torch.where(ok[:, None], g, torch.zeros_like(g))

        l1, l2 = _KKTSolve.apply(x, call, "adjoint", prep(gx, x), prep(gy, y), prep(gs, s))
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
        with one_torch_thread(ctx.call.one_thread()):
            return _ConeSolve._jvp(ctx, dPv, dc, dAv, db)

    @staticmethod
    def _jvp(ctx, dPv, dc, dAv, db):
        call: _Call = ctx.call
        x, y, _s, ok = _solution(ctx.saved_tensors)
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
        dx, dy, ds = _KKTSolve.apply(x, call, "tangent", dr1, dr2)
        return tuple(torch.where(ok[:, None], d, torch.zeros_like(d)) for d in (dx, dy, ds))


def _solution(outputs):
    """``(x, y, s)`` with failed items (NaN rows) zeroed, and the ``ok`` mask."""
    x, y, s = outputs
    ok = ~torch.isnan(x).any(1)
    return (*(torch.where(ok[:, None], t, torch.zeros_like(t)) for t in (x, y, s)), ok)


class _KKTSolve(torch.autograd.Function):
    """The adjoint or tangent solve of ``call``'s differentiator, as a function torch.func can vmap.

    ``anchor`` (the solution ``x``) is batched exactly at the vmap levels that
    :meth:`_ConeSolve.vmap` merged into the solved batch. At such a level the right-hand sides are
    merged the same way; at any other level (the directions of jacrev/jacfwd, or a vmap over
    the backward) each direction is one more solve with the same factorization.
    """

    @staticmethod
    def forward(anchor, call, kind, *rhs):
        diff = call.differentiator()
        out = diff.adjoint(*rhs) if kind == "adjoint" else diff.tangent(*rhs)
        call.record_degenerate()
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass  # only called from backward/jvp rules, which are not differentiated again

    @staticmethod
    def vmap(info, in_dims, anchor, call, kind, *rhs):
        V = info.batch_size
        rhs = [r.expand(V, *r.shape) if d is None else r.movedim(d, 0)
               for r, d in zip(rhs, in_dims[3:])]
        if in_dims[0] is not None:
            anchor = anchor.movedim(in_dims[0], 0).flatten(0, 1)
            outs = _KKTSolve.apply(anchor, call, kind, *(r.flatten(0, 1) for r in rhs))
            outs = tuple(o.unflatten(0, (V, -1)) for o in outs)
        else:
            per = [_KKTSolve.apply(anchor, call, kind, *(r[k] for r in rhs)) for k in range(V)]
            outs = tuple(torch.stack(o) for o in zip(*per))
        return outs, (0,) * len(outs)


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
