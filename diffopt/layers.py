"""Differentiable optimization layers (``torch.nn.Module``)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import cvxpy as cp
import numpy as np
import torch
from torch import nn

from diffopt.canon import AffineMap, ConeTemplate, flatten_f, unflatten_f
from diffopt.cones import ConeDims
from diffopt.diff.smoothing import GradientMode, as_mode
from diffopt.errors import InputError
from diffopt.gp import GpReduction
from diffopt.solve import COMPUTE_DTYPE, SolveInfo, make_call, select_backend
from diffopt.solvers.base import SparsePattern, add_cols, plain, take_cols


def _check_one_device(named: dict[str, torch.Tensor]) -> None:
    """Raise an InputError unless every tensor in ``named`` lies on one device."""
    devices = {name: val.device for name, val in named.items()}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise InputError(
            f"expected all tensors on one device, received {where}; move them with "
            ".to(device) first (the layer returns its results on the inputs' device)"
        )


def _check_semidefinite(p: cp.Parameter, val: torch.Tensor) -> None:
    """Raise an InputError unless the symmetric part ``S`` of each value of the PSD (NSD)
    parameter ``p`` is positive (negative) semidefinite up to roundoff,
    ``λ_min(±S) ≥ −√eps·‖S‖_F``: the layer would otherwise solve a nonconvex problem."""
    kind, sign = ("PSD", 1.0) if p.attributes["PSD"] else ("NSD", -1.0)
    k = p.shape[0]
    S = val.reshape(-1, k, k).double()
    S = 0.5 * sign * (S + S.mT)  # to be PSD
    tol = torch.finfo(val.dtype).eps ** 0.5 * torch.linalg.matrix_norm(S)
    # Cholesky of S + tol·I clears the items with λ_min(S) > −tol several times faster than
    # eigenvalues would; the eigenvalues decide the few it fails (also a hair inside tol).
    eye = torch.eye(k, dtype=S.dtype, device=S.device)
    suspect = torch.linalg.cholesky_ex(S + tol[:, None, None] * eye).info.nonzero().flatten()
    if not suspect.numel():
        return
    lam = torch.linalg.eigvalsh(S[suspect])[:, 0]
    bad = [(int(i), float(sign * v), float(t)) for i, v, t, b in zip(
        suspect.tolist(), lam.tolist(), tol[suspect].tolist(), (lam < -tol[suspect]).tolist())
        if b]
    if bad:
        items = [i for i, _, _ in bad]
        where = f" (items {items[:5]}{' ...' if len(items) > 5 else ''})" if val.ndim > 2 else ""
        example = "L @ L.mT" if sign > 0 else "-(L @ L.mT)"
        raise InputError(
            f"parameter {p.name()!r} is declared {kind} but received a matrix with eigenvalue "
            f"{bad[0][1]:.3g} {'<' if sign > 0 else '>'} 0 (of its symmetric part){where}, "
            f"beyond the roundoff tolerance {bad[0][2]:.1g}; pass {kind} values, e.g. {example} "
            "for any square L"
        )


class _InfoRecord:
    """The ``info`` attribute of the layers, one record per calling thread.

    A layer called from several threads at once would otherwise show each thread the info of
    whichever call finished last. ``info`` is the calling thread's most recent call's, or, in
    a thread that has made none, the most recent call's of any thread (a layer run in a worker
    and inspected from the main thread). Records of finished threads are dropped.
    """

    # torch.compile: thread bookkeeping is not traced (a graph break, like the solve itself).
    @property
    @torch.compiler.disable
    def info(self) -> SolveInfo | None:
        mine = self.__dict__.get("_infos", {}).get(threading.get_ident())
        return mine if mine is not None else self.__dict__.get("_info_latest")

    @info.setter
    @torch.compiler.disable
    def info(self, value: SolveInfo | None) -> None:
        live = {t.ident for t in threading.enumerate()}
        infos = {k: v for k, v in self.__dict__.get("_infos", {}).items() if k in live}
        infos[threading.get_ident()] = value
        self.__dict__["_infos"], self.__dict__["_info_latest"] = infos, value


class CvxpyLayer(_InfoRecord, nn.Module):
    """A parametrized CVXPY problem as a differentiable layer.

    The constructor and call have the same shape as ``cvxpylayers.torch.CvxpyLayer``: switching is
    a one-line import change. The problem is canonicalized once (CVXPY's DPP) into a cone program
    whose data are linear in the parameters; each call solves a batch of instances and returns
    the requested variables, differentiable through the KKT conditions (exact gradients).

    Args:
        problem: a DPP-compliant ``cvxpy.Problem`` (DGP with DPP when ``gp=True``).
        parameters: the problem's ``cvxpy.Parameter`` objects, in the order of the call's tensors.
            A ``symmetric`` (``PSD``, ``NSD``) parameter is used through the symmetric part
            ``(S + S.T) / 2`` of its tensor, which may be any square matrix; its gradient is
            symmetric. (With ``gp=True``, the symmetric part of ``log S`` is used.)
        variables: ``cvxpy.Variable`` objects to return, and/or constraint duals
            (``constraint.dual_variables[0]``).
        solver: ``"auto"`` (default: the native batched solver for LPs and QPs, Clarabel for
            other cones), ``"native"``, ``"clarabel"``, ``"scs"`` or ``"ecos"``.
        solver_args: default options for every call (see :meth:`forward`).
        gradient: the gradient mode (:mod:`diffopt.diff.smoothing`): ``"exact"`` (default, the
            KKT derivative) or a surrogate for LPs such as ``QuadraticSmoothing(gamma)``,
            ``LogBarrier(mu)``, ``Perturbed(sigma, samples)``, ``LPGD(tau)``.
        gp: the problem is log-log convex (DGP) and is solved through CVXPY's DGP-to-DCP
            reduction: parameters enter as their logarithms (so must be positive), variables
            come back through ``exp``, constraint duals are those of the log-space constraints.

    Attributes:
        info: :class:`~diffopt.solve.SolveInfo` of the most recent call: status, iterations and
            residuals per item (and, after backward, which items were degenerate). Kept per
            thread: a layer called from several threads at once shows each thread its own
            call's (a thread that made none sees the most recent call of any thread).

    Examples:
        >>> import cvxpy as cp, torch
        >>> from diffopt import CvxpyLayer
        >>> x = cp.Variable(2)
        >>> a = cp.Parameter(2)
        >>> prob = cp.Problem(cp.Minimize(cp.sum_squares(x - a)), [x >= 0])
        >>> layer = CvxpyLayer(prob, parameters=[a], variables=[x])
        >>> a_t = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
        >>> (sol,) = layer(a_t)
        >>> sol.detach().round(decimals=6)
        tensor([1., 0.], dtype=torch.float64)
        >>> sol.sum().backward()
        >>> a_t.grad.round(decimals=6) + 0.0
        tensor([1., 0.], dtype=torch.float64)
    """

    def __init__(
        self,
        problem: cp.Problem,
        parameters: Sequence[cp.Parameter],
        variables: Sequence[cp.Variable],
        *,
        solver: str = "auto",
        solver_args: dict | None = None,
        gradient: GradientMode | str | None = None,
        gp: bool = False,
    ) -> None:
        super().__init__()
        self._gp = GpReduction(problem, parameters, variables) if gp else None
        if self._gp is None:
            self.template = ConeTemplate(problem, list(parameters), list(variables))
        else:
            self.template = ConeTemplate(self._gp.problem, self._gp.parameters,
                                         self._gp.variables)
        self.parameters_ = list(parameters)
        self.solver = solver
        self.solver_args = dict(solver_args or {})
        self.gradient = as_mode(gradient)
        select_backend(solver, self.template.dims, self.template.P_map is not None)
        self.info: SolveInfo | None = None
        t = self.template
        self._ones = sum(int(np.prod(shape)) for shape in t.param_shapes)  # θ's column of ones
        maps = {"c": t.c_map, "b": t.b_map, "A": t.A_map}
        if t.P_map is not None:
            maps["P"] = t.P_map
        self._register_maps(maps)
        for k, rec in enumerate(t.recoveries):
            self.register_buffer(f"rec{k}_idx", torch.as_tensor(rec.idx))
            self.register_buffer(f"rec{k}_coef", torch.as_tensor(rec.coef))

    def _register_maps(self, maps: dict[str, AffineMap]) -> None:
        """Buffers for the maps θ → (c, b, A, P), each of one of three kinds (``_kind``):

        - ``const``: no parameter in it (A and b of a decision-focused LP, a fixed P): its
          values, computed once, reach the solver as one row expanded over the batch (the
          solvers see one matrix) and outside autograd: no per-call work, no backward scatter.
        - ``gather``: every output entry from exactly one entry of θ (a parametric matrix
          copied into A): all such maps are one gather of θ's columns (times their coefficients
          unless all are 1), split into the maps, so that the backward writes θ's gradient once
          (one scatter instead of one per map and the sums of their (B, len θ) results).
        - ``general``: a gather, the coefficients, and a scatter-add into the output entries.
        """
        self._kind: dict[str, str] = {}
        self._sizes = {name: amap.size for name, amap in maps.items()}
        gathered = []
        for name, amap in maps.items():
            rows, cols, vals = amap.rows, amap.cols, amap.vals
            if (cols == self._ones).all():
                self._kind[name] = "const"
                const = np.zeros(amap.size)
                np.add.at(const, rows, vals)
                self.register_buffer(f"{name}_const", torch.as_tensor(const))
            elif rows.size == amap.size and (np.bincount(rows, minlength=amap.size) == 1).all():
                self._kind[name] = "gather"
                order = np.argsort(rows)  # output order
                gathered.append((name, cols[order], vals[order]))
            else:
                self._kind[name] = "general"
                self.register_buffer(f"{name}_rows", torch.as_tensor(rows))
                self.register_buffer(f"{name}_cols", torch.as_tensor(cols))
                self.register_buffer(f"{name}_vals", torch.as_tensor(vals))
        self._gathered = [name for name, _, _ in gathered]
        if gathered:
            vals = np.concatenate([v for _, _, v in gathered])
            self._gather_unit = bool((vals == 1.0).all())
            self.register_buffer("gather_cols", torch.as_tensor(
                np.concatenate([c for _, c, _ in gathered])))
            self.register_buffer("gather_vals", torch.as_tensor(vals))

    def _apply_maps(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The values of c, b, A (and P) for the batch ``theta``."""
        dev, dt, B = theta.device, theta.dtype, theta.shape[0]
        out = {}
        if self._gathered:
            g = take_cols(theta, self.gather_cols.to(dev))
            if not self._gather_unit:
                g = g * self.gather_vals.to(dev, dt)
            sizes = [self._sizes[name] for name in self._gathered]
            out.update(zip(self._gathered, torch.split(g, sizes, dim=1)))
        for name, kind in self._kind.items():
            if kind == "const":
                out[name] = getattr(self, f"{name}_const").to(dev, dt).expand(B, -1)
            elif kind == "general":
                cols = getattr(self, f"{name}_cols").to(dev)
                vals = getattr(self, f"{name}_vals").to(dev, dt)
                rows = getattr(self, f"{name}_rows").to(dev)
                out[name] = add_cols(self._sizes[name], rows, take_cols(theta, cols) * vals)
        return out

    # -- input validation -----------------------------------------------------------------------
    def _batch(self, params: Sequence) -> tuple[list[torch.Tensor], int, bool]:
        if len(params) != len(self.parameters_):
            names = [p.name() for p in self.parameters_]
            raise InputError(
                "A tensor must be provided for each CVXPY parameter: expected "
                f"{len(self.parameters_)} tensors (one per parameter {names}), "
                f"received {len(params)}"
            )
        tensors = []
        for p, val in zip(self.parameters_, params):
            if not isinstance(val, torch.Tensor):
                raise InputError(
                    f"parameter {p.name()!r}: expected a torch.Tensor, received "
                    f"{type(val).__name__}; convert it with torch.as_tensor(...)"
                )
            if not val.is_floating_point():
                raise InputError(
                    f"parameter {p.name()!r}: expected a floating-point tensor, received dtype "
                    f"{val.dtype}; convert it with .double() or .float()"
                )
            tensors.append(val)
        _check_one_device({p.name(): val for p, val in zip(self.parameters_, tensors)})
        dtype = tensors[0].dtype
        for val in tensors[1:]:
            dtype = torch.promote_types(dtype, val.dtype)
        sizes = set()
        for p, val in zip(self.parameters_, tensors):
            shape = tuple(p.shape)
            if tuple(val.shape) == shape:
                continue
            if val.ndim == len(shape) + 1 and tuple(val.shape[1:]) == shape:
                sizes.add(int(val.shape[0]))
                continue
            what = "dimensionality" if val.ndim > len(shape) + 1 else "shape"
            raise InputError(  # the words of cvxpylayers' messages, which user code may match
                f"Invalid parameter {what} for {p.name()!r}: expected shape {shape} or "
                f"(batch, *{shape}), received {tuple(val.shape)}"
            )
        if len(sizes) > 1:
            raise InputError(
                f"Inconsistent batch sizes {sorted(sizes)} across parameters; batched tensors "
                "must share the leading dimension (unbatched ones are broadcast)"
            )
        batched = bool(sizes)
        B = sizes.pop() if sizes else 1
        if B == 0:
            raise InputError("batch size 0: pass at least one problem instance")
        out = []
        for k, (p, val) in enumerate(zip(self.parameters_, tensors)):
            val = val.to(dtype)
            if self._gp is not None:
                self._gp.check_value(k, plain(val))
            self._check_attributes(p, plain(val))
            if val.ndim == p.ndim:
                val = val.unsqueeze(0).expand(B, *p.shape)
            out.append(val)
        return out, B, batched

    @staticmethod
    def _check_attributes(p: cp.Parameter, val: torch.Tensor) -> None:
        # NaN or Inf values fail their own items (status NOT_FINITE), not the call
        if not bool(torch.isfinite(val).all()):
            return
        if p.is_pos() and not bool((val > 0).all()):
            raise InputError(
                f"parameter {p.name()!r} is declared pos=True but received values <= 0 "
                f"(min {float(val.min()):.3g}); pass positive values or drop the attribute"
            )
        if p.is_nonneg() and not bool((val >= 0).all()):
            raise InputError(
                f"parameter {p.name()!r} is declared nonneg=True but received negative values "
                f"(min {float(val.min()):.3g}); pass nonnegative values or drop the attribute"
            )
        if p.is_nonpos() and not bool((val <= 0).all()):
            raise InputError(
                f"parameter {p.name()!r} is declared nonpos=True but received positive values "
                f"(max {float(val.max()):.3g})"
            )
        # A symmetric (PSD, NSD) parameter is used through its symmetric part ½(S + Sᵀ) (see
        # ConeTemplate._user_to_theta): any value is accepted, and only that part is checked.
        if p.ndim == 2 and (p.attributes["PSD"] or p.attributes["NSD"]):
            _check_semidefinite(p, val)

    # -- the call -----------------------------------------------------------------------------
    def forward(self, *params: torch.Tensor, solver_args: dict | None = None,
                gradient: GradientMode | str | None = None):
        """Solve the problem for a batch of parameter values.

        Args:
            *params: one tensor per parameter, each of the parameter's shape (shared by every
                item) or with one leading batch dimension. Shared parameters get the gradient
                summed over the batch.
            solver_args: options for this call, merged over the layer's ``solver_args``:
                ``solver`` (backend name), ``on_failure`` (``"raise"``, default, or ``"nan"``:
                failed items return NaN and zero gradient), ``allow_inaccurate`` (accept
                solutions the backend marked inaccurate, default False), ``kkt`` (``"auto"``,
                ``"dense"`` or ``"sparse"`` factorization of the derivative), ``tol``,
                ``max_iters``, ``verbose``, ``n_jobs`` (threads for per-item backends, or for
                the native solver's chunks), and any backend-specific setting.
            gradient: gradient mode for this call (default: the layer's).

        Returns:
            A tuple with one tensor per requested variable, of shape ``(batch, *var.shape)``, or
            ``var.shape`` when no parameter is batched. dtype and device follow the inputs.

        Raises:
            InputError: malformed inputs.
            SolverError: some item failed and ``on_failure="raise"``.
        """
        t = self.template
        call = make_call(solver_args or {}, self.solver, t.P_pattern, t.A_pattern, t.dims,
                         defaults=self.solver_args)
        tensors, B, batched = self._batch(params)
        out_dtype = tensors[0].dtype
        # The parameter maps run in float64 too: in float32 a redundant equality row
        # ((TF)x = Tg next to Fx = g) is rounded into a conflicting one.
        tensors = [v.to(COMPUTE_DTYPE) for v in tensors]
        if self._gp is not None:
            tensors = self._gp.to_dcp(tensors)
        ones = tensors[0].new_ones(B, 1)
        theta = torch.cat([flatten_f(v) for v in tensors] + [ones], dim=1)
        values = self._apply_maps(theta)
        c, b, A_values, P_values = values["c"], values["b"], values["A"], values.get("P")
        mode = self.gradient if gradient is None else as_mode(gradient)
        try:
            x, y, _ = mode.solve(P_values, c, A_values, b, call)
        finally:
            self.info = call.info
        outs = []
        for k, rec in enumerate(t.recoveries):
            src = x if rec.src == "x" else y
            idx = getattr(self, f"rec{k}_idx").to(src.device)
            coef = getattr(self, f"rec{k}_coef").to(src.device, src.dtype)
            val = unflatten_f(take_cols(src, idx) * coef, rec.shape).to(out_dtype)
            outs.append(val if batched else val[0])
        return tuple(outs) if self._gp is None else self._gp.from_dcp(outs)


def _dense_pattern(rows: int, cols: int) -> SparsePattern:
    r, c = np.divmod(np.arange(rows * cols), cols)
    return SparsePattern(r, c, (rows, cols))


def _empty_blocks(args: dict, n: int) -> set[int]:
    """Replace the empty constraint blocks in ``args`` by None (qpth's convention:
    ``torch.Tensor()``, shape ``(0, n)`` or, batched, ``(B, 0, n)`` for no rows) and return the
    batch sizes that the batched ones carry."""
    sizes = set()
    for name, row in (("G", (0, n)), ("h", (0,)), ("A", (0, n)), ("b", (0,))):
        val = args[name]
        if val is None or val.numel():
            continue
        if val.ndim == len(row) + 1 and tuple(val.shape[1:]) == row:
            sizes.add(int(val.shape[0]))
        elif tuple(val.shape) not in ((0,), row):
            raise InputError(
                f"{name}: an empty tensor stands for no constraint rows, of shape (0,), {row} or "
                f"(batch, *{row}); received {tuple(val.shape)}"
            )
        args[name] = None
    return sizes


class QPLayer(_InfoRecord, nn.Module):
    r"""A batched quadratic program in tensor form, no CVXPY needed (OptNet-style).

    .. math::

        x^\star = \arg\min_x \tfrac12 x^\top P x + q^\top x
        \quad\text{s.t.}\quad Gx \le h,\ \ Ax = b.

    Every argument may carry a leading batch dimension or be shared by the whole batch; ``G, h``
    and ``A, b`` are optional (pass ``None``). Gradients are exact (KKT); a shared argument
    receives the gradient *summed* over the batch (qpth averages it instead — divide by the batch
    size to reproduce qpth). ``P`` is used through its symmetric part and must be positive
    semidefinite; ``P = None`` is a linear program.

    Args:
        solver: ``"native"`` (default: the batched interior-point method in torch, which runs on
            the tensors' device), or ``"clarabel"`` / ``"scs"`` / ``"ecos"``.
        duals: also return the equality and inequality multipliers ``(ν, λ)``.
        solver_args: default options for every call, as for :class:`CvxpyLayer`.
        gradient: gradient mode, as for :class:`CvxpyLayer`.

    Attributes:
        info: :class:`~diffopt.solve.SolveInfo` of the most recent call (per thread, as for
            :class:`CvxpyLayer`).

    Examples:
        >>> import torch
        >>> from diffopt import QPLayer
        >>> P = torch.eye(2, dtype=torch.float64)
        >>> q = torch.tensor([-2.0, -3.0], dtype=torch.float64, requires_grad=True)
        >>> G = torch.eye(2, dtype=torch.float64)
        >>> h = torch.ones(2, dtype=torch.float64)           # x <= 1
        >>> x = QPLayer()(P, q, G, h)
        >>> x.detach().round(decimals=6)
        tensor([1., 1.], dtype=torch.float64)
        >>> x.sum().backward()
        >>> q.grad.round(decimals=6) + 0.0  # both constraints active: x does not move with q
        tensor([0., 0.], dtype=torch.float64)
    """

    def __init__(self, solver: str = "native", duals: bool = False,
                 solver_args: dict | None = None,
                 gradient: GradientMode | str | None = None) -> None:
        super().__init__()
        self.solver = solver
        self.duals = duals
        self.solver_args = dict(solver_args or {})
        self.gradient = as_mode(gradient)
        self.info: SolveInfo | None = None

    def forward(self, P, q, G=None, h=None, A=None, b=None, *, solver_args: dict | None = None,
                gradient: GradientMode | str | None = None):
        """Solve the batch. Shapes: ``P (B?, n, n)`` (or ``None``: an LP), ``q (B?, n)``,
        ``G (B?, m, n)``, ``h (B?, m)``, ``A (B?, p, n)``, ``b (B?, p)``.

        Returns:
            ``x`` of shape ``(B, n)`` (``(n,)`` if nothing is batched), or ``(x, ν, λ)`` with
            ``duals=True``.
        """
        args = {"P": P, "q": q, "G": G, "h": h, "A": A, "b": b}
        if q is None:
            raise InputError("q: the linear term is required (a tensor of shape (n,) or "
                             "(batch, n)); pass zeros for a pure quadratic objective")
        for name, val in args.items():
            if val is not None and not (isinstance(val, torch.Tensor) and val.is_floating_point()):
                raise InputError(
                    f"{name}: expected a floating-point torch.Tensor, received "
                    f"{type(val).__name__ if not isinstance(val, torch.Tensor) else val.dtype}"
                )
        _check_one_device({name: val for name, val in args.items() if val is not None})
        if q.ndim not in (1, 2):
            raise InputError(f"q: expected shape (n,) or (batch, n), received {tuple(q.shape)}")
        n = q.shape[-1]
        sizes = _empty_blocks(args, n)
        G, h, A, b = args["G"], args["h"], args["A"], args["b"]
        for pair in (("G", "h"), ("A", "b")):
            if (args[pair[0]] is None) != (args[pair[1]] is None):
                raise InputError(f"{pair[0]} and {pair[1]} go together: pass both or neither "
                                 "(an empty tensor counts as neither)")
        for name in ("G", "A"):
            if args[name] is not None and args[name].ndim not in (2, 3):
                raise InputError(f"{name}: expected shape (rows, n) or (batch, rows, n), received "
                                 f"{tuple(args[name].shape)}")
        m = 0 if G is None else G.shape[-2]
        p = 0 if A is None else A.shape[-2]
        expected = {"P": (n, n), "q": (n,), "G": (m, n), "h": (m,), "A": (p, n), "b": (p,)}
        dtype = q.dtype
        for name, val in args.items():
            if val is None:
                continue
            shape = expected[name]
            if tuple(val.shape) == shape:
                pass
            elif val.ndim == len(shape) + 1 and tuple(val.shape[1:]) == shape:
                sizes.add(int(val.shape[0]))
            else:
                raise InputError(
                    f"{name}: expected shape {shape} or (batch, *{shape}) for n={n}, m={m}, p={p}, "
                    f"received {tuple(val.shape)}"
                )
            dtype = torch.promote_types(dtype, val.dtype)
        if len(sizes) > 1:
            raise InputError(f"Inconsistent batch sizes {sorted(sizes)} across arguments")
        batched = bool(sizes)
        B = sizes.pop() if sizes else 1
        if B == 0:
            raise InputError("batch size 0: pass at least one problem instance")

        def batch(val, shape):
            val = val.to(COMPUTE_DTYPE)  # solved in float64, returned in ``dtype``
            return val.expand(B, *shape) if val.ndim == len(shape) else val

        rows_A = [batch(A, (p, n))] if p else []
        rows_b = [batch(b, (p,))] if p else []
        if m:
            rows_A.append(batch(G, (m, n)))
            rows_b.append(batch(h, (m,)))
        Amat = torch.cat(rows_A, 1) if rows_A else q.new_zeros(B, 0, n, dtype=COMPUTE_DTYPE)
        bvec = torch.cat(rows_b, 1) if rows_b else q.new_zeros(B, 0, dtype=COMPUTE_DTYPE)
        dims = ConeDims(zero=p, nonneg=m)
        call = make_call(solver_args or {}, self.solver,
                         None if P is None else _dense_pattern(n, n), _dense_pattern(p + m, n),
                         dims, defaults=self.solver_args)
        mode = self.gradient if gradient is None else as_mode(gradient)
        try:
            Pvals = None
            if P is not None:
                Psym = batch(P, (n, n))
                # the objective sees only sym(P)
                Pvals = (0.5 * (Psym + Psym.transpose(1, 2))).reshape(B, n * n)
            x, y, _ = mode.solve(Pvals, batch(q, (n,)), Amat.reshape(B, (p + m) * n), bvec, call)
        finally:
            self.info = call.info
        x, y = x.to(dtype), y.to(dtype)
        outs = (x, y[:, :p], y[:, p:]) if self.duals else (x,)
        if not batched:
            outs = tuple(o[0] for o in outs)
        return outs if self.duals else outs[0]
