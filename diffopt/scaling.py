r"""Equilibration: every backend solves a scaled copy of the program, so that tolerances are
relative and scaling a problem scales its answer.

With diagonal ``D > 0`` (columns), ``E > 0`` (rows, one value per cone block, so that each cone
is mapped onto itself) and per-item scalars ``σ`` (objective) and ``ρ`` (solution), the backend
solves

.. math::

    \tilde P = \tfrac{σ}{ρ} DPD,\quad \tilde c = σDc,\quad \tilde A = EAD,\quad \tilde b = ρEb,

whose solution maps back as ``x = Dx̃/ρ``, ``y = Eỹ/σ``, ``s = E⁻¹s̃/ρ``; its residuals are
``σD(Px + Aᵀy + c)`` and ``ρE(Ax + s − b)``. ``D`` and ``E`` come from Ruiz equilibration of
``[P Aᵀ; A 0]`` (each normalized by its largest entry first; a cone block's factor from the
geometric mean of its row norms, epigraph columns started at their rows' scale); ``σ/ρ``
makes the largest entry of ``P̃`` one, and ``σ`` then balances the largest entries of ``c̃``
and ``b̃`` around one (for an LP, ``σ`` and ``ρ`` make each one). Every factor is a power of
two, so scaling is exact, and ``σ``, ``ρ`` within a factor 16 of one are one. The program has
two exact symmetries, ``(αP, αc, A, b)`` (``x`` unchanged, ``y`` times ``α``) and
``(P, c/t, A, b/t)`` (``x``, ``y`` divided by ``t``); the scaled program is the same for all of
them (up to that rounding), so the backend sees one problem and its tolerances act relatively.
Each item's factors depend on its own data only: an item's answer does not depend on the batch
it is solved in.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from diffopt.cones import ConeDims
from diffopt.solvers.base import Backend, ConeProgram, Solution, SparsePattern, one_torch_thread

#: Ruiz iterations: each halves the spread of the row and column norms' logarithms.
RUIZ_ITERS = 10
#: Bounds of every factor (of ``D``, ``E``, ``σ``, ``ρ``): beyond them the data are taken as
#: they are, so that the scaled data stay far from float64's range.
_BOUND = 1e30
_MAX_EXP = 99  # log2 of _BOUND, rounded down
#: ``σ`` and ``ρ`` within a factor 2^4 of 1 are 1: the backends' defaults are tuned on such data.
_KEEP = 4


@functools.lru_cache(maxsize=64)
def cone_blocks(dims: ConeDims) -> torch.Tensor:
    """The cone block of each row: zero and nonnegative rows one each, a SOC, PSD, exp or power
    cone one for all its rows (a cone is invariant under a uniform positive scaling only)."""
    sizes = ([1] * (dims.zero + dims.nonneg) + list(dims.soc)
             + [k * (k + 1) // 2 for k in dims.psd] + [3] * (dims.exp + len(dims.pow)))
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))


def _amax_into(size: int, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[:, j] = max |src[:, k]|`` over ``idx[k] == j`` (0 where no entry)."""
    out = src.new_zeros(src.shape[0], size)
    return out.scatter_reduce(1, idx.expand(src.shape[0], -1), src.abs(), "amax")


def _block_mean(size: int, idx: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The geometric mean of each block's nonzero row norms (0 where there are none): with the
    largest one, Ruiz stops where one row of a cone (``t`` of ``(t, εGx)``) has norm one and the
    others stay tiny; the mean is one only when they are balanced around one."""
    pos = norm > 0
    logs = torch.where(pos, torch.log(norm.clamp(min=1e-300)), torch.zeros_like(norm))
    total = norm.new_zeros(norm.shape[0], size).index_add_(1, idx, logs)
    count = norm.new_zeros(norm.shape[0], size).index_add_(1, idx, pos.to(norm.dtype))
    return torch.where(count > 0, torch.exp(total / count.clamp(min=1)), torch.zeros_like(total))


def _inverse_sqrt(norm: torch.Tensor) -> torch.Tensor:
    """``1/√norm``, 1 where the norm is 0 (an empty row or column)."""
    return torch.where(norm > 0, norm.clamp(min=1e-300).rsqrt(), torch.ones_like(norm))


def _largest(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``max |t|`` per row, ``(k, 1)`` (zeros, as many rows as ``like``, for no entries)."""
    if t is None or t.shape[1] == 0:
        return like.new_zeros(like.shape[0], 1)
    return t.abs().amax(1, keepdim=True)


@dataclass(frozen=True)
class Scaling:
    """The scaling of a batch (see the module's docstring): ``D (B, n)``, ``E (B, m)``,
    ``sigma`` and ``rho`` ``(B, 1)``. The identity where every factor is 1. ``uniform``: ``D``,
    ``E`` and ``σ/ρ`` the same for every item (then matrices shared by the batch stay shared)."""

    D: torch.Tensor
    E: torch.Tensor
    sigma: torch.Tensor
    rho: torch.Tensor
    uniform: bool = False

    def program(self, p: ConeProgram) -> ConeProgram:
        """The scaled program ``(P̃, c̃, Ã, b̃)``."""
        D, E, ratio = self.D, self.E, self.sigma / self.rho
        if self.uniform:  # the matrices' factors: one row, broadcast over the batch
            D, E, ratio = D[:1], E[:1], ratio[:1]

        def times(values: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            # a matrix shared by the batch stays one row, expanded as it came
            one = self.uniform and _shared(values)
            return ((values[:1] if one else values) * factor).expand_as(values)

        P = None
        if p.P_values is not None and p.P_pattern is not None:
            P = times(p.P_values, _on(p.P_pattern, D, D) * ratio)
        return dataclasses.replace(p, P_values=P, c=self.sigma * self.D * p.c,
                                   A_values=times(p.A_values, _on(p.A_pattern, E, D)),
                                   b=self.rho * self.E * p.b)

    def to(self, dtype: torch.dtype) -> Scaling:
        """The same factors (powers of two: exact) in ``dtype``."""
        return dataclasses.replace(self, D=self.D.to(dtype), E=self.E.to(dtype),
                                   sigma=self.sigma.to(dtype), rho=self.rho.to(dtype))

    def point(self, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor):
        """``(x̃, ỹ, s̃)`` of a point ``(x, y, s)`` of the original program."""
        return self.rho * x / self.D, self.sigma * y / self.E, self.rho * self.E * s

    def solution(self, sol: Solution) -> Solution:
        """The backend's solution of the scaled program, mapped back to the original one (the
        residuals it reported are dropped: they measure the scaled program)."""
        x, y = self.D * sol.x / self.rho, self.E * sol.y / self.sigma
        s = sol.s / (self.rho * self.E)
        diff = None if sol.differentiator is None else ScaledDifferentiator(
            sol.differentiator, self)
        return dataclasses.replace(sol, x=x, y=y, s=s, primal_residual=[], dual_residual=[],
                                   gap=[], differentiator=diff)


def _shared(t: torch.Tensor) -> bool:
    """Whether ``t`` is one row expanded over the batch (a layer's constant data)."""
    return t.shape[0] > 1 and t.stride(0) == 0


def _on(pattern: SparsePattern, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left[:, rows] * right[:, cols]`` on ``pattern``'s entries."""
    rows = torch.as_tensor(pattern.rows, device=left.device)
    cols = torch.as_tensor(pattern.cols, device=left.device)
    # index_select: advanced indexing is several times slower on the CPU
    return left.index_select(1, rows) * right.index_select(1, cols)


def identity(p: ConeProgram) -> Scaling:
    """The scaling that changes nothing."""
    ones = torch.ones_like
    return Scaling(ones(p.c), ones(p.b), p.c.new_ones(p.batch_size, 1),
                   p.c.new_ones(p.batch_size, 1))


def equilibrate(p: ConeProgram, iters: int = RUIZ_ITERS) -> Scaling:
    """The scaling of ``p``'s items (finite data expected), computed in ``p``'s dtype.

    Where ``A`` and ``P`` are shared by the batch (expanded), so are ``D``, ``E`` and ``σ/ρ``
    (``uniform``), and the scaled matrices stay shared: the native solver factors a shared
    matrix once per solve, not once per item.
    """
    B = p.batch_size
    has_P = p.P_values is not None and p.P_pattern is not None and p.P_values.shape[1] > 0
    uniform = B > 1 and _shared(p.A_values) and (not has_P or _shared(p.P_values))
    # Small batched kernels: one intra-op thread (as the native solver runs small problems).
    small = p.c.device.type == "cpu" and B * (p.A_values.shape[1] + p.n) < 2**20
    with one_torch_thread(small):
        A = p.A_values[:1] if uniform else p.A_values
        P = None if not has_P else (p.P_values[:1] if uniform else p.P_values)
        D, E = _ruiz(p, A, P, iters)
        size_P = _largest(None if P is None else P * _on(p.P_pattern, D, D), D)
        if uniform:
            D, E, size_P = D.expand(B, -1), E.expand(B, -1), size_P.expand(B, -1)
        sigma, rho = _objective_and_solution_scales(size_P, _largest(D * p.c, D),
                                                    _largest(E * p.b, D))
    return Scaling(D, E, sigma, rho, uniform)


def _ruiz(p: ConeProgram, A: torch.Tensor, P: torch.Tensor | None, iters: int):
    """``D (k, n)``, ``E (k, m)`` equilibrating ``[P Aᵀ; A 0]`` for ``k`` rows of values."""
    k, n, m = A.shape[0], p.n, p.m
    dev = A.device
    ar = torch.as_tensor(p.A_pattern.rows, device=dev)
    ac = torch.as_tensor(p.A_pattern.cols, device=dev)
    blocks = cone_blocks(p.dims).to(dev)
    n_blocks = int(blocks.max()) + 1 if m else 0
    # On the data divided by their largest entries: D and E do not depend on the scale of A or P.
    a = _largest(A, A)
    a = torch.where(a > 0, a, torch.ones_like(a))
    A = A / a
    if P is not None:
        pr = torch.as_tensor(p.P_pattern.rows, device=dev)
        pc = torch.as_tensor(p.P_pattern.cols, device=dev)
        big = _largest(P, P)
        P = P / torch.where(big > 0, big, torch.ones_like(big))
    # Dense patterns (QPLayer's) as (k, rows, cols) views: maxima along a dimension, no scatter.
    dense_A = p.A_pattern.is_full
    dense_P = P is not None and p.P_pattern.is_full
    A = A.abs().view(k, m, n) if dense_A else A.abs()
    if P is not None:
        P = P.abs().view(k, n, n) if dense_P else P.abs()
    D, E = A.new_ones(k, n), A.new_ones(k, m)
    free = torch.ones_like(D, dtype=torch.bool)
    if not dense_A:
        D = _epigraph_start(p, A, blocks, n_blocks, P is not None)
        # t of t ≥ ±x keeps its start: scaled with its one-row blocks, it would undo their
        # growth in E (each step moves both by the same factor); a cone's t has a block mean
        free = (D >= 1) | (torch.bincount(ac, minlength=n) == 1)
    for _ in range(iters):
        if dense_A:
            At = A * E[:, :, None] * D[:, None, :]
            col, row = At.amax(1) if m else D.new_zeros(k, n), At.amax(2)
        else:
            At = A * E.index_select(1, ar) * D.index_select(1, ac)
            col, row = _amax_into(n, ac, At), _amax_into(m, ar, At)
        if dense_P:
            col = torch.maximum(col, (P * D[:, :, None] * D[:, None, :]).amax(1))
        elif P is not None:
            col = torch.maximum(col, _amax_into(
                n, pc, P * D.index_select(1, pr) * D.index_select(1, pc)))
        if n_blocks < m:  # one factor per cone block: the largest row norm of the block
            row = _block_mean(n_blocks, blocks, row).gather(1, blocks.expand(k, -1))
        D = torch.where(free, D * _inverse_sqrt(col), D).clamp(1 / _BOUND, _BOUND)
        E = (E * _inverse_sqrt(row)).clamp(1 / _BOUND, _BOUND)
    # Powers of two: scaling and unscaling are exact.
    return _pow2(D), _pow2((E / a).clamp(1 / _BOUND, _BOUND))


def _epigraph_start(p: ConeProgram, A: torch.Tensor, blocks: torch.Tensor, n_blocks: int,
                    has_P: bool) -> torch.Tensor:
    """``D``'s start ``(k, n)``: 1, except for an epigraph column without quadratic term, one
    with one entry in a cone block of several rows (``t`` of ``‖Gx − h‖ ≤ t``) or with several
    entries (``t`` of ``t ≥ ±(gᵀx − h)``, CVXPY's form of a one-row norm), each larger than the
    largest entry of its block's other columns: it is scaled down to the largest such ratio.

    Ruiz's max-norm iterations stop at once on ``(t, εGx) ∈ K`` (every row and column has largest
    entry one) and leave ``εG`` tiny within its cone, where a backend's absolute tolerance leaves
    ``x`` undetermined; from this start they reach ``(εt, εGx)``, which ``E`` scales to order one.
    """
    k, n, m = A.shape[0], p.n, p.m
    dev = A.device
    ar = torch.as_tensor(p.A_pattern.rows, device=dev)
    ac = torch.as_tensor(p.A_pattern.cols, device=dev)
    D = A.new_ones(k, n)
    if m == 0 or ac.numel() == 0:
        return D
    count = torch.bincount(ac, minlength=n)
    block = blocks[ar]
    wide = (torch.bincount(blocks, minlength=n_blocks) > 1)[block]
    candidate = (count == 1) & (torch.zeros_like(count).index_add_(
        0, ac, wide.to(count.dtype)) == 1) | (count > 1)
    if has_P:
        candidate[torch.as_tensor(p.P_pattern.rows, device=dev)] = False
        candidate[torch.as_tensor(p.P_pattern.cols, device=dev)] = False
    entry = candidate[ac]  # the entries of such columns
    if not bool(entry.any()):
        return D
    # the largest entry of each entry's block outside its own column: the block's largest,
    # or its second largest for the one entry that alone reaches the largest
    value = A.abs()
    top = _amax_into(n_blocks, block, value)
    at_top = value >= top.index_select(1, block)
    ties = torch.zeros_like(top).index_add_(1, block, at_top.to(A.dtype))
    second = _amax_into(n_blocks, block, torch.where(at_top, torch.zeros_like(value), value))
    target = torch.where(at_top & (ties.index_select(1, block) == 1),
                         second.index_select(1, block), top.index_select(1, block))
    # a column shrinks to the largest ratio over its entries (not at all where one is alone)
    ratio = torch.where(target > 0, target / value.clamp(min=1e-300),
                        torch.full_like(value, 2.0))
    factor = D.new_zeros(k, n).scatter_reduce(1, ac.expand(k, -1),
                                              torch.where(entry, ratio, torch.ones_like(ratio)),
                                              "amax").clamp(max=1.0)
    return torch.where(candidate[None], factor, D).clamp(1 / _BOUND, _BOUND)


def _pow2(t: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.round(torch.log2(t)))


def _objective_and_solution_scales(size_P, size_c, size_b):
    """``σ``, ``ρ`` ``(B, 1)`` from the largest entries of ``DPD``, ``Dc`` and ``Eb``.

    In base-2 logarithms (u = log σ, w = log ρ, and lp, lc, lb those of the sizes): with a
    quadratic term, w = u + lp (P̃ of size one) and u is the mean of the targets −lc (c̃ of size
    one) and −lp − lb (b̃ of size one) present; without, u = −lc and w = −lb. Zero sizes set
    nothing. Each exponent is rounded to an integer (powers of two scale exactly) and set to 0
    within :data:`_KEEP` of it: data of order one reach the backend as they are.
    """
    def log2(t):
        return torch.log2(t.clamp(min=1e-300))

    def power(k):
        k = torch.round(k).clamp(-_MAX_EXP, _MAX_EXP)
        return torch.where(k.abs() <= _KEEP, torch.zeros_like(k), k)

    lp, lc, lb = log2(size_P), log2(size_c), log2(size_b)
    has_P, has_c, has_b = size_P > 0, size_c > 0, size_b > 0
    zero = torch.zeros_like(lp)
    ratio = power(torch.where(has_P, -lp, zero))  # log σ/ρ: the same for items sharing P
    targets = torch.where(has_c, -lc, zero) + torch.where(has_b, ratio - lb, zero)
    u = power(torch.where(
        has_P, targets / (has_c.to(lp.dtype) + has_b.to(lp.dtype)).clamp(min=1),
        torch.where(has_c, -lc, zero)))
    w = torch.where(has_P, u - ratio, power(torch.where(has_b, -lb, zero)))
    return torch.exp2(u), torch.exp2(w)


class ScaledDifferentiator:
    """A backend's differentiator of the scaled program, as one of the original program.

    From ``c̃ = σDc``, ``b̃ = ρEb`` and the solution maps: ``λ₁ = σDλ̃₁``, ``λ₂ = ρEλ̃₂`` for
    upstream gradients ``(Dg_x/ρ, Eg_y/σ, E⁻¹g_s/ρ)``; tangents ``dR̃ = (σD dR₁, ρE dR₂)``. The
    scales are constants: the solution map commutes with them exactly.
    """

    def __init__(self, inner, scaling: Scaling) -> None:
        self._inner, self._s = inner, scaling

    def __getattr__(self, name):  # e.g. ``degenerate``, set by the inner solves
        if name.startswith("__") or name in ("_inner", "_s"):  # copy and pickle protocols
            raise AttributeError(name)
        return getattr(self._inner, name)

    @staticmethod
    def _fit(f: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return f.unsqueeze(-1) if like.dim() == 3 else f  # (B, ·, k) stacks of k

    def adjoint(self, gx, gy, gs):
        s, f = self._s, self._fit
        D, E, sig, rho = f(s.D, gx), f(s.E, gy), f(s.sigma, gx), f(s.rho, gx)
        l1, l2 = self._inner.adjoint(D * gx / rho, E * gy / sig, gs / (rho * E))
        return sig * D * l1, rho * E * l2

    def tangent(self, dr1, dr2):
        s, f = self._s, self._fit
        D, E, sig, rho = f(s.D, dr1), f(s.E, dr2), f(s.sigma, dr1), f(s.rho, dr1)
        dx, dy, ds = self._inner.tangent(sig * D * dr1, rho * E * dr2)
        return D * dx / rho, E * dy / sig, ds / (rho * E)


def solve_scaled(backend: Backend, program: ConeProgram, options: dict
                 ) -> tuple[Solution, Scaling]:
    """``backend``'s solution of ``program``, solved in its equilibrated form and mapped back,
    with the scaling used.

    Items with NaN or Inf data are sent as the zero program (their status is set by
    :func:`diffopt.verify.verify`), so that one bad item cannot disturb a batched solve. No
    scaling for backends that opt out (``Backend.equilibrate``) nor for the barrier path
    (``mu > 0``, defined on the data as given); a warm start is scaled with the data.
    """
    bad = ~_finite_items(program)
    if bool(bad.any()):
        program = dataclasses.replace(program, **{
            k: None if v is None else torch.where(bad[:, None], torch.zeros_like(v), v)
            for k, v in (("P_values", program.P_values), ("c", program.c),
                         ("A_values", program.A_values), ("b", program.b))})
    if not backend.equilibrate or float(options.get("mu", 0.0) or 0.0) > 0:
        return backend.solve(program, options), identity(program)
    scaling = equilibrate(program)
    warm = options.get("warm_start")
    if warm is not None:
        triple = (warm.x, warm.y, warm.s) if isinstance(warm, Solution) else tuple(warm)
        if len(triple) == 3:
            like = program.c
            options = {**options, "warm_start": scaling.point(
                *(torch.as_tensor(v).to(like.device, like.dtype) for v in triple))}
    return scaling.solution(backend.solve(scaling.program(program), options)), scaling


def _finite_items(p: ConeProgram) -> torch.Tensor:
    """Per item, whether every datum is finite."""
    ok = torch.isfinite(p.c).all(1) & torch.isfinite(p.b).all(1) & torch.isfinite(
        p.A_values).all(1)
    if p.P_values is not None:
        ok &= torch.isfinite(p.P_values).all(1)
    return ok
