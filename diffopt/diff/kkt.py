"""Implicit differentiation of a cone program through its KKT conditions.

With ``v = y − s`` and ``Π = Π_{K*}``, Moreau's decomposition gives ``y = Π(v)`` and
``s = Π(v) − v``, so the optimality conditions are the square system

.. math::

    R(x, v) = \\begin{bmatrix} Px + A^\\top Π(v) + c \\\\ Ax + Π(v) − v − b \\end{bmatrix} = 0,
    \\qquad
    J = \\frac{∂R}{∂(x, v)} = \\begin{bmatrix} P & A^\\top D \\\\ A & D − I \\end{bmatrix},

with ``D = DΠ(v)`` symmetric, eigenvalues in [0, 1]. ``J`` is factored once and used for both the
adjoint (reverse mode, ``Jᵀλ = −g``) and the tangent (forward mode, ``J dz = −dR``) solves.
Small systems are factored as one batched dense LU; large ones item by item with a sparse LU.
Auxiliary variables defined by one equality row each (CVXPY's ``t = X − C``) are first
eliminated, with their rows, by a rank-one Schur complement (``_Elimination``).
Items whose ``J`` is (numerically) singular — weakly active constraints, LP vertices with ties —
are solved in the least-squares sense (minimum norm, through an SVD) and flagged in
``degenerate``.

Both decisions are made on scaled quantities, so that rewriting a constraint ``x ≤ 1`` as
``10⁻⁴x ≤ 10⁻⁴`` or scaling the objective gives the same derivative. ``J`` is built for the
equivalent program whose rows are scaled by ``ρ`` (:func:`row_scale`: unit row norms, duals and
slacks balanced), where ``y' = y/ρ`` and ``s' = ρs``, so ``D`` (the active sets) is decided at
``v' = y' − s'``; and the singularity test reads the pivots of ``J`` equilibrated by rows and
columns (:func:`_equilibrate`).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from diffopt.cones import dproj_dual
from diffopt.errors import DegenerateWarning
from diffopt.scaling import cone_blocks
from diffopt.solvers.base import ConeProgram, lu_factor, pattern_matvec


def _numpy(t: torch.Tensor) -> np.ndarray:
    """Float64 NumPy copy of a tensor, also from inside torch.func transforms (jvp/vmap)."""
    with torch._C._DisableFuncTorch():
        return t.detach().cpu().double().numpy()


#: Sweeps of the row/column equilibration of ``J`` (each halves the spread of the scales' logs).
EQUILIBRATE_SWEEPS = 6


def inf_norm(t: torch.Tensor) -> torch.Tensor:
    """``‖t_i‖∞`` per row of a ``(B, k)`` batch (0 for ``k = 0``)."""
    return t.abs().amax(1) if t.shape[1] else t.new_zeros(t.shape[0])


def row_scale(program: ConeProgram, x: torch.Tensor, y: torch.Tensor,
              s: torch.Tensor) -> torch.Tensor:
    """Positive row scales ``ρ`` ``(B, m)`` that make the KKT decisions scale-invariant.

    Scaling row ``i`` of ``Ax + s = b`` by ``ρᵢ`` gives an equivalent program with
    ``s' = ρs`` and ``y' = y/ρ``. ``ρᵢ = κ/‖aᵢ‖``: rows of unit norm (the largest norm of a
    cone's rows for all of them), times one factor ``κ`` per item that brings the duals (in
    the units of ``c``) and the slacks (in those of ``x``) to one magnitude,
    ``κ² = max(‖c‖∞, ‖Px‖∞, max|P|·‖x‖∞) / max(‖x‖∞, ‖b/‖a‖‖∞)`` (scales of the data, not of
    ``y``, whose inactive entries are noise). Rows of zeros and items without a scale keep 1.
    """
    A = program.A_values
    B, m = program.b.shape
    dev = A.device
    rows = torch.as_tensor(program.A_pattern.rows, device=dev)
    norm = A.new_zeros(B, m).index_add_(1, rows, A * A).sqrt()
    blocks = cone_blocks(program.dims).to(dev).expand(B, -1)
    norm = norm.new_zeros(B, int(blocks[0, -1]) + 1 if m else 0).scatter_reduce(
        1, blocks, norm, "amax").gather(1, blocks)
    inv = torch.where(norm > 0, 1 / norm, torch.ones_like(norm))
    size = inf_norm(x)
    dual = inf_norm(program.c)
    if program.P_values is not None and program.P_pattern is not None:
        Px = inf_norm(pattern_matvec(program.P_values, program.P_pattern, x))
        dual = torch.maximum(dual, torch.maximum(Px, inf_norm(program.P_values) * size))
    primal = torch.maximum(size, inf_norm(program.b * inv))
    ok = (dual > 0) & (primal > 0) & torch.isfinite(dual) & torch.isfinite(primal)
    kappa = torch.where(ok, (dual / torch.where(ok, primal, 1.0)).sqrt(), 1.0)
    return inv * kappa[:, None]


def _equilibrate(rows: np.ndarray, cols: np.ndarray, vals: torch.Tensor,
                 N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ruiz scaling of ``J``: ``(d_r, d_c, values of diag(d_r) J diag(d_c))``, each row's and
    column's largest entry brought near 1, so that the pivots of the LU compare numbers of one
    magnitude (a well-posed ``J`` with ``P ≈ 5·10⁴`` next to unit ``A`` is not singular)."""
    B = vals.shape[0]
    r = torch.as_tensor(rows, device=vals.device).expand(B, -1)
    c = torch.as_tensor(cols, device=vals.device).expand(B, -1)
    d_r, d_c = vals.new_ones(B, N), vals.new_ones(B, N)
    mag = vals.abs()
    for _ in range(EQUILIBRATE_SWEEPS):
        a = mag * d_r.gather(1, r) * d_c.gather(1, c)
        for d, idx in ((d_r, r), (d_c, c)):
            top = vals.new_zeros(B, N).scatter_reduce(1, idx, a, "amax")
            d.mul_(torch.where(top > 0, top.rsqrt(), 1.0))
    return d_r, d_c, vals * d_r.gather(1, r) * d_c.gather(1, c)


#: Largest ``n + m`` factored densely (one batched LU); above it a sparse LU per item.
DENSE_LIMIT = 600
#: Between ``SPARSE_MIN`` and ``DENSE_LIMIT``, systems with fewer than this fraction of nonzeros
#: are factored sparsely too (e.g. canonicalized SDPs, mostly zero).
SPARSE_DENSITY = 0.1
SPARSE_MIN = 150


def kkt_entries(program: ConeProgram, D) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The structurally nonzero entries of ``J``: ``(rows, cols, values)``, values ``(B, nnz)``.

    The pattern depends only on the sparsity patterns and the cones, so it is the same for every
    item (no duplicates). ``AᵀD`` is formed cone by cone: on the zero and nonnegative rows it is
    ``Aᵀ`` scaled by the diagonal; for the cones of one block size, one batched product of the
    blocks with the (dense) columns of ``A`` that touch each cone. The zero cone's ``D − I = 0``
    is left out.
    """
    layout = _layout(program, D)
    return layout.rows, layout.cols, _entry_values(program, D, layout)


def _entry_values(program: ConeProgram, D, layout: _EntryLayout) -> torch.Tensor:
    """The values ``(B, nnz)`` of :func:`kkt_entries` on ``layout``'s entries."""
    Av = program.A_values
    B = Av.shape[0]
    vals = [] if program.P_values is None else [program.P_values]
    vals += [Av, Av[:, layout.on] * D.diag[:, layout.on_rows],
             D.diag[:, layout.nonneg] - 1]
    for (_, stack), g in zip(D.groups, layout.groups):
        k = stack.shape[-1]
        vals.append((stack - torch.eye(k, dtype=stack.dtype, device=stack.device)).reshape(B, -1))
        if g is None:
            continue
        sel, cone, local, slot, p_cone, p_slot, slots = g
        A_blk = Av.new_zeros(B, stack.shape[1], k, slots)
        A_blk[:, cone, local, slot] = Av[:, sel]
        DA = (stack @ A_blk).transpose(2, 3)  # (B, count, slot, k)
        vals.append(DA[:, p_cone, p_slot].reshape(B, -1))
    return torch.cat(vals, dim=1)


class _EntryLayout:
    """The index structure of :func:`kkt_entries`, which depends on the sparsity patterns and
    the cones only: built once per layer (kept with ``A``'s pattern, see :func:`_layout`)."""

    def __init__(self, program: ConeProgram, D) -> None:
        n, m = program.n, program.m
        pa = program.A_pattern
        rows, cols = [], []
        if program.P_pattern is not None and program.P_values is not None:
            rows.append(program.P_pattern.rows)
            cols.append(program.P_pattern.cols)
        rows.append(n + pa.rows)
        cols.append(pa.cols)
        # zero and nonnegative rows: D = diag(d)
        nd = D.diag.shape[1]
        self.on = np.flatnonzero(pa.rows < nd)
        self.on_rows = pa.rows[self.on]
        rows.append(pa.cols[self.on])
        cols.append(n + self.on_rows)
        self.nonneg = np.arange(program.dims.zero, nd)
        rows.append(n + self.nonneg)
        cols.append(n + self.nonneg)
        # SOC / PSD / exp cones, stacked by block size
        self.groups: list = []
        for g_rows, _ in D.groups:
            count, k = g_rows.shape
            gr = g_rows.numpy()
            cone_of = np.full(m, -1)
            cone_of[gr] = np.arange(count)[:, None]
            local_of = np.zeros(m, dtype=np.int64)
            local_of[gr] = np.arange(k)
            rows.append(n + np.repeat(gr, k, axis=1).ravel())
            cols.append(n + np.tile(gr, (1, k)).ravel())
            sel = np.flatnonzero(cone_of[pa.rows] >= 0)
            if not sel.size:
                self.groups.append(None)
                continue
            # the columns of A touching each cone, numbered per cone (slot)
            cone, col = cone_of[pa.rows[sel]], pa.cols[sel]
            pairs, pair_of = np.unique(cone * n + col, return_inverse=True)
            p_cone, p_col = pairs // n, pairs % n
            slot = np.arange(pairs.size) - np.searchsorted(p_cone, p_cone)
            self.groups.append((sel, cone, local_of[pa.rows[sel]], slot[pair_of], p_cone, slot,
                                int(slot.max()) + 1))
            rows.append(np.repeat(p_col, k))
            cols.append(n + gr[p_cone].ravel())
        self.rows, self.cols = np.concatenate(rows), np.concatenate(cols)
        self.elimination_candidates = _candidates(program, self.rows, self.cols)


def _candidates(program: ConeProgram, rows: np.ndarray, cols: np.ndarray) -> _Candidates | None:
    """The pairs ``(x_j, v_i)`` of :class:`_Elimination`'s kind, or None: column ``j`` of ``A``
    has one nonzero, in zero-cone row ``i`` (one such column per row), and ``P`` touches ``x_j``
    at most on its diagonal."""
    pa = program.A_pattern
    count = np.bincount(pa.cols, minlength=program.n)
    single = (count[pa.cols] == 1) & (pa.rows < program.dims.zero)
    if not single.any():
        return None
    if program.P_pattern is not None and program.P_values is not None:
        pp = program.P_pattern
        off = np.zeros(program.n, dtype=bool)  # variables with an off-diagonal entry in P
        cross = pp.rows != pp.cols
        off[pp.rows[cross]] = off[pp.cols[cross]] = True
        single &= ~off[pa.cols]
    j_all, i_all = pa.cols[single], pa.rows[single]
    i_pairs, first = np.unique(i_all, return_index=True)  # one variable per row
    return _Candidates(program, rows, cols, i_pairs, j_all[first]) if i_pairs.size else None


def _pattern_key(pattern) -> tuple | None:
    return None if pattern is None else (pattern.shape, pattern.rows.tobytes(),
                                         pattern.cols.tobytes())


def _layout(program: ConeProgram, D) -> _EntryLayout:
    P = program.P_pattern if program.P_values is not None else None
    return program.A_pattern.memo(("kkt_entries", program.dims, _pattern_key(P)),
                                  lambda: _EntryLayout(program, D))


class _Elimination:
    """Eliminate the pairs ``(x_j, v_i)`` of variables defined by one equality row each.

    CVXPY's canonical forms introduce auxiliary variables such as ``t = X − C`` for
    ``sum_squares(X − C)``: column ``j`` of ``A`` has its only nonzero ``a`` in a zero-cone row
    ``i``, and ``P`` touches ``x_j`` at most on its diagonal ``p``. In ``J`` the rows ``j`` and
    ``n + i`` and the columns ``x_j`` and ``v_i`` then meet only in the pivot block
    ``[[p, e], [a, 0]]`` (``e = (AᵀD)_{ji} = a`` as ``D = I`` on the zero cone), and the rest of
    ``J`` sees them through ``u = J[rest, v_i]`` and ``w = J[n + i, rest]`` only. Their Schur
    complement is ``J_rest + p/(e a) · u wᵀ`` (a rank-one update, ``p = 0``: none), a smaller
    system with the same solutions on the other unknowns; the pairs' unknowns follow by back
    substitution, ``z_xj = (r_{n+i} − w·z_rest)/a`` and ``z_vi = (r_j − p z_xj)/e``. The pairs do
    not interact: each eliminated column has its one nonzero in its own row. Only rows with at
    most three other nonzeros are taken, so ``J`` does not grow. The 10x10 nearest-correlation
    SDP: ``n + m`` = 320 -> 120.
    """

    def __init__(self, layout: _EntryLayout, vals: torch.Tensor, ok: torch.Tensor) -> None:
        self.found = False
        cand = layout.elimination_candidates
        if cand is None:
            return
        a, e = vals[:, cand.a_pos], vals[:, cand.e_pos]
        nonzero = ((a != 0) & (e != 0)) | ~ok.unsqueeze(1)
        usable = cand.usable & nonzero.all(0).cpu().numpy()
        plan = cand.plan(usable)
        if plan is None:  # nothing to eliminate, or nothing left
            return
        self.found = True
        self.j, self.vi, self.keep, self.N = plan.j, plan.vi, plan.keep, plan.N
        self.u, self.w = plan.u, plan.w
        self.u_vals, self.w_vals = vals[:, plan.u_sel], vals[:, plan.w_sel]
        okc = ok.unsqueeze(1)
        self.a = torch.where(okc, a[:, usable], 1.0)
        self.e = torch.where(okc, e[:, usable], 1.0)
        has_p = torch.as_tensor(plan.p_pos >= 0, device=vals.device)
        self.p = torch.where(has_p, vals[:, plan.p_pos], 0.0)
        coef = self.p / (self.e * self.a)
        # Kept entries, plus p/(e a) u_k w_l at (k, l) for the u and w entries of each pair.
        up, ui, wi = plan.u[1], plan.ui, plan.wi
        v_all = torch.cat([vals[:, plan.kept],
                           coef[:, up[ui]] * self.u_vals[:, ui] * self.w_vals[:, wi]], 1)
        self.rows, self.cols = plan.rows, plan.cols
        self.vals = v_all.new_zeros(v_all.shape[0], plan.rows.size).index_add_(
            1, torch.as_tensor(plan.inverse, device=v_all.device), v_all)

    def reduce_rhs(self, r: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """The right-hand side of the reduced system (``Jᵀ``'s when ``adjoint``)."""
        (k, q), v = (self.w, self.w_vals) if adjoint else (self.u, self.u_vals)
        a, e = (self.e, self.a) if adjoint else (self.a, self.e)
        t = r[:, self.j] / e - self.p / (e * a) * r[:, self.vi]  # (B, pairs)
        return r[:, self.keep].index_add(1, torch.as_tensor(k, device=r.device), -v * t[:, q])

    def expand(self, z: torch.Tensor, r: torch.Tensor, adjoint: bool) -> torch.Tensor:
        """The full solution from the reduced one ``z`` and the full right-hand side ``r``."""
        (k, q), v = (self.u, self.u_vals) if adjoint else (self.w, self.w_vals)
        a, e = (self.e, self.a) if adjoint else (self.a, self.e)
        wz = z.new_zeros(z.shape[0], self.j.size).index_add_(
            1, torch.as_tensor(q, device=z.device), v * z[:, k])
        zx = (r[:, self.vi] - wz) / a
        zv = (r[:, self.j] - self.p * zx) / e
        out = z.new_zeros(r.shape)
        out[:, self.keep] = z
        out[:, self.j] = zx
        out[:, self.vi] = zv
        return out


class _Candidates:
    """The pairs ``_Elimination`` may take, from the patterns alone (kept with the layout):
    positions in ``J``'s entries of ``a``, ``e`` and ``p``, and the pairs that do not grow ``J``.
    Which are taken also depends on the values (``a`` and ``e`` nonzero); the index structure
    of the reduced system for that choice is built by :meth:`plan` and kept for the next call."""

    def __init__(self, program: ConeProgram, rows: np.ndarray, cols: np.ndarray,
                 i_pairs: np.ndarray, j_pairs: np.ndarray) -> None:
        n, N = program.n, program.n + program.m
        self.n, self.N_full, self.rows_full, self.cols_full = n, N, rows, cols
        key = rows.astype(np.int64) * N + cols
        order = np.argsort(key)

        def find(r, c):  # positions of entries (r, c) of J; -1 where absent
            k = np.asarray(r, dtype=np.int64) * N + c
            pos = np.searchsorted(key, k, sorter=order).clip(max=key.size - 1)
            return np.where(key[order[pos]] == k, order[pos], -1)

        self.i_pairs, self.j_pairs = i_pairs, j_pairs
        self.a_pos, self.e_pos = find(n + i_pairs, j_pairs), find(j_pairs, n + i_pairs)
        self.p_pos = find(j_pairs, j_pairs)
        # A pair whose row of A has r other nonzeros removes 2r + 3 entries of J and adds up to
        # r² (u wᵀ): only pairs that do not grow J are taken (r ≤ 3). Dense rows, as in least
        # squares, would fill J with the normal equations: with a 300 x 60 least-squares
        # problem, eliminating even 10 of them made the sparse backward 40 % slower.
        rest = np.bincount(program.A_pattern.rows, minlength=program.m)[i_pairs] - 1
        self.usable = (self.a_pos >= 0) & (self.e_pos >= 0) & (rest * rest <= 2 * rest + 3)
        self._last: tuple = (None, None)

    def plan(self, usable: np.ndarray) -> _Plan | None:
        """The reduced system's structure when the pairs ``usable`` are eliminated."""
        chosen, plan = self._last  # one read: layers may be called from several threads
        if chosen is None or not np.array_equal(chosen, usable):
            plan = _Plan(self, usable)
            self._last = (usable.copy(), plan)
        return plan if plan.found else None


class _Plan:
    """Index structure of ``_Elimination`` for one choice of pairs (see :class:`_Candidates`)."""

    def __init__(self, cand: _Candidates, usable: np.ndarray) -> None:
        n, N, rows, cols = cand.n, cand.N_full, cand.rows_full, cand.cols_full
        i_pairs, j_pairs = cand.i_pairs[usable], cand.j_pairs[usable]
        keep = np.ones(N, dtype=bool)
        keep[j_pairs] = keep[n + i_pairs] = False
        self.found = bool(usable.any() and keep.any())
        if not self.found:
            return
        self.j, self.vi = j_pairs, n + i_pairs
        self.p_pos = cand.p_pos[usable]
        new = np.cumsum(keep) - 1  # index in the reduced system
        self.keep, self.N = np.flatnonzero(keep), int(keep.sum())
        pair = np.full(N, -1)  # index n + i (column v_i, row n + i) -> its pair
        pair[self.vi] = np.arange(j_pairs.size)
        # u: entries (k, v_i) with k kept; w: entries (n + i, k) with k kept.
        self.u_sel = np.flatnonzero((pair[cols] >= 0) & keep[rows])
        self.w_sel = np.flatnonzero((pair[rows] >= 0) & keep[cols])
        # (index in the reduced system, pair) of each entry
        self.u = (new[rows[self.u_sel]], pair[cols[self.u_sel]])
        self.w = (new[cols[self.w_sel]], pair[rows[self.w_sel]])
        self.kept = np.flatnonzero(keep[rows] & keep[cols])
        uk, up = self.u
        wk, wp = self.w
        by_pair = np.argsort(wp, kind="stable")
        starts = np.searchsorted(wp[by_pair], np.arange(j_pairs.size + 1))
        reps = starts[up + 1] - starts[up]  # each u entry meets every w entry of its pair
        self.ui = np.repeat(np.arange(up.size), reps)
        within = np.arange(self.ui.size) - np.repeat(np.cumsum(reps) - reps, reps)
        self.wi = by_pair[np.repeat(starts[up], reps) + within]
        r_all = np.concatenate([new[rows[self.kept]], uk[self.ui]])
        c_all = np.concatenate([new[cols[self.kept]], wk[self.wi]])
        flat, self.inverse = np.unique(r_all * self.N + c_all, return_inverse=True)
        self.rows, self.cols = flat // self.N, flat % self.N


class KKTDifferentiator:
    """Factor ``J`` at ``(x, y, s)`` and solve adjoint/tangent systems with it.

    Args:
        program: the (batched) cone program, in the dtype the derivative is computed in.
        x, y, s: the solution, same dtype; rows of failed items must be finite (e.g. zeros).
        ok: ``(B,)`` bool mask of items to differentiate; others get ``J = I`` and zero output.
        method: ``"dense"``, ``"sparse"`` or ``"auto"`` (sparse above :data:`DENSE_LIMIT`, or
            above :data:`SPARSE_MIN` when the density of ``J`` is below :data:`SPARSE_DENSITY`;
            sizes after the elimination).
        eliminate: first eliminate the auxiliary variables that one equality row each defines
            (see ``_Elimination``); the solutions are the same.
        rho: the row scales (default: :func:`row_scale` at this point).
        warn: warn (:class:`~diffopt.DegenerateWarning`) when items are degenerate.

    Attributes:
        degenerate: ``(B,)`` bool, True where ``J`` was singular and least squares was used.
        rho: ``(B, m)`` row scales; ``J`` is that of the program with rows scaled by ``rho``.
        v: ``(B, m)`` the point ``v' = y/ρ − ρs`` of the scaled program.
    """

    def __init__(self, program: ConeProgram, x, y, s, ok: torch.Tensor, method: str = "auto",
                 eliminate: bool = True, rho: torch.Tensor | None = None, warn: bool = True):
        self.n, self.m = program.n, program.m
        self.ok = ok
        if method not in ("dense", "sparse", "auto"):
            raise ValueError(f"unknown KKT method {method!r}; expected 'dense', 'sparse' or 'auto'")
        self.rho = row_scale(program, x, y, s) if rho is None else rho
        rows_A = torch.as_tensor(program.A_pattern.rows, device=self.rho.device)
        program = dataclasses.replace(program, b=program.b * self.rho,
                                      A_values=program.A_values * self.rho[:, rows_A])
        self.v = y / self.rho - s * self.rho
        self.D = dproj_dual(self.v, program.dims)
        layout = _layout(program, self.D)
        rows, cols, vals = layout.rows, layout.cols, _entry_values(program, self.D, layout)
        elim = _Elimination(layout, vals, ok) if eliminate else None
        self.elim = elim if elim is not None and elim.found else None
        if self.elim is not None:
            rows, cols, vals = self.elim.rows, self.elim.cols, self.elim.vals
        self.N = N = self.n + self.m if self.elim is None else self.elim.N
        self.d_r, self.d_c, vals = _equilibrate(rows, cols, vals, N)
        if method == "auto":
            sparse = N > DENSE_LIMIT or (N > SPARSE_MIN and rows.size < SPARSE_DENSITY * N * N)
            method = "sparse" if sparse else "dense"
        self.method = method
        if method == "dense":
            self._factor_dense(rows, cols, vals)
        else:
            self._factor_sparse(rows, cols, vals)
        if warn and bool(self.degenerate.any()):
            items = torch.nonzero(self.degenerate).flatten().tolist()
            warnings.warn(
                f"the KKT system of batch item(s) {items} is singular (degenerate solution: "
                "weakly active constraints or ties); their gradients are least-squares solutions",
                DegenerateWarning,
                stacklevel=4,
            )

    # -- factorization ------------------------------------------------------------------------
    def _dense(self, rows: np.ndarray, cols: np.ndarray, vals: torch.Tensor) -> torch.Tensor:
        """``J`` as ``(B, N, N)`` matrices stored column by column: LAPACK's layout, so that
        the LU factorization runs in place (one ``B·N²`` buffer instead of two)."""
        B, N = vals.shape[0], self.N
        flat = torch.as_tensor(cols * N + rows, device=vals.device)
        return vals.new_zeros(B, N * N).index_copy_(1, flat, vals).view(B, N, N).mT

    def _factor_dense(self, rows: np.ndarray, cols: np.ndarray, vals: torch.Tensor) -> None:
        B, N = vals.shape[0], self.N
        J = self._dense(rows, cols, vals)
        J[~self.ok] = torch.eye(N, dtype=J.dtype, device=J.device)
        # In place: the copy of J into a new LU and the page faults of a second fresh buffer
        # took 0.4-0.7 ms of the 10x10 SDP's 4.3 ms backward (B = 16, N = 120).
        ints = dict(dtype=torch.int32, device=J.device)
        self.LU, self.piv, info = lu_factor(
            J, out=(J, torch.empty(B, N, **ints), torch.empty(B, **ints)))
        diag = torch.diagonal(self.LU, dim1=1, dim2=2).abs()
        # A tiny pivot relative to the largest marks a (numerically) singular J.
        rtol = 1e3 * torch.finfo(J.dtype).eps ** 0.75
        bad = (info != 0) | (diag.amin(1) <= rtol * diag.amax(1)) | ~torch.isfinite(diag).all(1)
        self.degenerate = bad & self.ok
        self.rtol = rtol
        self.J_degenerate = (self._dense(rows, cols, vals[self.degenerate])
                             if bool(self.degenerate.any()) else None)

    def _lstsq(self, M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Minimum-norm least-squares solves, dropping singular directions below ``rtol``."""
        if M.device.type == "cpu":
            # SVD-based (divide and conquer): drops the singular directions reliably. The cheaper
            # rank-revealing QR ('gelsy') misjudged the rank on degenerate LPs (wrong gradients).
            return torch.linalg.lstsq(M, rhs, rcond=self.rtol, driver="gelsd").solution
        return torch.linalg.pinv(M, rtol=self.rtol) @ rhs  # only 'gels' (full rank) off CPU

    def _solve_dense(self, rhs: torch.Tensor, adjoint: bool) -> torch.Tensor:
        z = torch.linalg.lu_solve(self.LU, self.piv, rhs.unsqueeze(-1), adjoint=adjoint).squeeze(-1)
        if self.J_degenerate is not None:
            M = self.J_degenerate.transpose(1, 2) if adjoint else self.J_degenerate
            z = z.clone()
            z[self.degenerate] = self._lstsq(M, rhs[self.degenerate].unsqueeze(-1)).squeeze(-1)
        return z

    def _factor_sparse(self, rows: np.ndarray, cols: np.ndarray, vals: torch.Tensor) -> None:
        """One sparse LU per item on the shared CSC structure. The first item is factored with
        SuperLU's COLAMD column ordering, which the others reuse (pre-permuted columns, natural
        ordering): the pattern, hence the ordering, is the same for every item. ``relax=1`` (no
        relaxed supernodes) factored 1.1-1.9x faster than SuperLU's default on every family
        measured (SDPs, SOCPs, dense and sparse QPs)."""
        N = self.N
        order = np.lexsort((rows, cols))  # CSC: by column, then row
        indices = rows[order].astype(np.int32)
        indptr = np.searchsorted(cols[order], np.arange(N + 1)).astype(np.int32)
        data = np.take(_numpy(vals), order, axis=1)  # C-contiguous rows, as SuperLU wants
        B = data.shape[0]
        self.factors: list = [None] * B
        self.first = self.colperm = None  # the item factored in the original column order
        degenerate = np.zeros(B, dtype=bool)
        for i in np.flatnonzero(self.ok.cpu().numpy()):
            try:
                if self.colperm is None:
                    J = sp.csc_matrix((data[i], indices, indptr), shape=(N, N))
                    lu = spla.splu(J, relax=1)
                    self.first, self.colperm = i, np.argsort(lu.perm_c)  # new column k: colperm[k]
                    counts = np.diff(indptr)[self.colperm]
                    p_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
                    take = np.repeat(indptr[self.colperm] - p_indptr[:-1], counts)
                    take += np.arange(indices.size)
                    p_data, p_indices = np.take(data, take, axis=1), indices[take]
                else:
                    J = sp.csc_matrix((p_data[i], p_indices, p_indptr), shape=(N, N))
                    lu = spla.splu(J, permc_spec="NATURAL", relax=1)
                self.factors[i] = lu
            except RuntimeError:  # exactly singular
                degenerate[i] = True
                self.factors[i] = sp.csc_matrix((data[i], indices, indptr), shape=(N, N))
        self.degenerate = torch.as_tensor(degenerate, device=self.ok.device)

    def _solve_sparse(self, rhs: torch.Tensor, adjoint: bool) -> torch.Tensor:
        r = _numpy(rhs)
        out = np.zeros_like(r)
        p = self.colperm
        for i, f in enumerate(self.factors):
            if f is None:
                continue
            if not isinstance(f, spla.SuperLU):  # singular: minimum-norm least squares
                M = f.T if adjoint else f
                out[i] = spla.lsqr(M, r[i], atol=1e-14, btol=1e-14, iter_lim=10 * M.shape[0])[0]
            elif i == self.first:  # factored in the original column order
                out[i] = f.solve(r[i], trans="T" if adjoint else "N")
            elif adjoint:  # (J Π)ᵀ λ = Πᵀ g
                out[i] = f.solve(r[i][p], trans="T")
            else:  # J Π (Πᵀ z) = r
                out[i, p] = f.solve(r[i])
        return torch.as_tensor(out, dtype=rhs.dtype, device=rhs.device)

    def _solve(self, rhs: torch.Tensor, adjoint: bool) -> torch.Tensor:
        r = rhs if self.elim is None else self.elim.reduce_rhs(rhs, adjoint)
        # J = diag(1/d_r) J̃ diag(1/d_c): J z = r is J̃ (z/d_c) = d_r r,
        # and Jᵀλ = g is J̃ᵀ(λ/d_r) = d_c g.
        d_in, d_out = (self.d_c, self.d_r) if adjoint else (self.d_r, self.d_c)
        r = r * d_in
        z = self._solve_dense(r, adjoint) if self.method == "dense" else \
            self._solve_sparse(r, adjoint)
        z = z * d_out
        return z if self.elim is None else self.elim.expand(z, rhs, adjoint)

    # -- the Differentiator protocol ----------------------------------------------------------
    # J is that of the row-scaled program (A' = diag(ρ)A, b' = ρb, y' = y/ρ, s' = ρs): its
    # right-hand sides and solutions are mapped through ρ, which leaves the gradients exact.
    def adjoint(self, gx, gy, gs):
        # Outputs y' = Π(v') and s' = Π(v') − v' pull back to g_v = D g_y' + (D − I) g_s'.
        gy, gs = gy * self.rho, gs / self.rho
        gv = self.D.matvec(gy + gs) - gs
        lam = self._solve(-torch.cat([gx, gv], dim=1), adjoint=True)
        return lam[:, : self.n], lam[:, self.n:] * self.rho  # ∇b = ρ∇b'

    def tangent(self, dr1, dr2):
        dz = self._solve(-torch.cat([dr1, dr2 * self.rho], dim=1), adjoint=False)
        dx, dv = dz[:, : self.n], dz[:, self.n:]
        dy = self.D.matvec(dv)
        return dx, dy * self.rho, (dy - dv) / self.rho
