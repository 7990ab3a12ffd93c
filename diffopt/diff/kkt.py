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
Items whose ``J`` is (numerically) singular — weakly active constraints, LP vertices with ties —
are solved in the least-squares sense (minimum norm, through an SVD) and flagged in
``degenerate``.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from diffopt.cones import dproj_dual
from diffopt.errors import DegenerateWarning
from diffopt.solvers.base import ConeProgram

def _numpy(t: torch.Tensor) -> np.ndarray:
    """Float64 NumPy copy of a tensor, also from inside torch.func transforms (jvp/vmap)."""
    with torch._C._DisableFuncTorch():
        return t.detach().cpu().double().numpy()


#: Largest ``n + m`` factored densely (one batched LU); above it a sparse LU per item.
DENSE_LIMIT = 600
#: Between ``SPARSE_MIN`` and ``DENSE_LIMIT``, systems with fewer than this fraction of nonzeros
#: are factored sparsely too (e.g. canonicalized SDPs, mostly zero).
SPARSE_DENSITY = 0.1
SPARSE_MIN = 150


def kkt_density(program: ConeProgram, D) -> float:
    """Fraction of structurally nonzero entries of ``J`` (from the sparsity patterns alone)."""
    n, m = program.n, program.m
    pa = program.A_pattern
    A = sp.csr_matrix((np.ones(pa.nnz), (pa.rows, pa.cols)), shape=(m, n))
    rows, cols = [np.arange(D.diag.shape[1])], [np.arange(D.diag.shape[1])]
    for off, blk in D.blocks:
        k = blk.shape[-1]
        r, c = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        rows.append(off + r.ravel())
        cols.append(off + c.ravel())
    r, c = np.concatenate(rows), np.concatenate(cols)
    Dp = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(m, m))
    nnz_P = 0 if program.P_pattern is None else program.P_pattern.nnz
    nnz = nnz_P + (A.T @ Dp).nnz + pa.nnz + (Dp + sp.eye(m)).nnz
    return nnz / float(n + m) ** 2


class KKTDifferentiator:
    """Factor ``J`` at ``(x, y, s)`` and solve adjoint/tangent systems with it.

    Args:
        program: the (batched) cone program, in the dtype the derivative is computed in.
        x, y, s: the solution, same dtype; rows of failed items must be finite (e.g. zeros).
        ok: ``(B,)`` bool mask of items to differentiate; others get ``J = I`` and zero output.
        method: ``"dense"``, ``"sparse"`` or ``"auto"`` (sparse above :data:`DENSE_LIMIT`, or
            above :data:`SPARSE_MIN` when the density of ``J`` is below :data:`SPARSE_DENSITY`).

    Attributes:
        degenerate: ``(B,)`` bool, True where ``J`` was singular and least squares was used.
    """

    def __init__(self, program: ConeProgram, x, y, s, ok: torch.Tensor, method: str = "auto"):
        self.n, self.m = program.n, program.m
        self.ok = ok
        self.D = dproj_dual(y - s, program.dims)
        N = self.n + self.m
        if method == "auto":
            sparse = N > DENSE_LIMIT or (
                N > SPARSE_MIN and kkt_density(program, self.D) < SPARSE_DENSITY
            )
            method = "sparse" if sparse else "dense"
        if method not in ("dense", "sparse"):
            raise ValueError(f"unknown KKT method {method!r}; expected 'dense', 'sparse' or 'auto'")
        self.method = method
        if method == "dense":
            self._factor_dense(program)
        else:
            self._factor_sparse(program)
        if bool(self.degenerate.any()):
            items = torch.nonzero(self.degenerate).flatten().tolist()
            warnings.warn(
                f"the KKT system of batch item(s) {items} is singular (degenerate solution: "
                "weakly active constraints or ties); their gradients are least-squares solutions",
                DegenerateWarning,
                stacklevel=4,
            )

    # -- factorization ------------------------------------------------------------------------
    def _dense_J(self, program: ConeProgram) -> torch.Tensor:
        n, m = self.n, self.m
        P, A, D = program.dense_P(), program.dense_A(), self.D.dense()
        eye = torch.eye(m, dtype=A.dtype, device=A.device)
        top = torch.cat([P, A.transpose(1, 2) @ D], dim=2)
        bottom = torch.cat([A, D - eye], dim=2)
        J = torch.cat([top, bottom], dim=1)
        J[~self.ok] = torch.eye(n + m, dtype=J.dtype, device=J.device)
        return J

    def _factor_dense(self, program: ConeProgram) -> None:
        J = self._dense_J(program)
        self.LU, self.piv, info = torch.linalg.lu_factor_ex(J)
        diag = torch.diagonal(self.LU, dim1=1, dim2=2).abs()
        # A tiny pivot relative to the largest marks a (numerically) singular J.
        rtol = 1e3 * torch.finfo(J.dtype).eps ** 0.75
        bad = (info != 0) | (diag.amin(1) <= rtol * diag.amax(1)) | ~torch.isfinite(diag).all(1)
        self.degenerate = bad & self.ok
        self.rtol = rtol
        self.J_degenerate = J[self.degenerate] if bool(self.degenerate.any()) else None

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

    def _factor_sparse(self, program: ConeProgram) -> None:
        B, n, m = program.batch_size, self.n, self.m
        pa = program.A_pattern
        Av = _numpy(program.A_values)
        Pv = None if program.P_values is None else _numpy(program.P_values)
        Dd = _numpy(self.D.dense())  # block diagonal, small blocks
        self.factors: list = []
        degenerate = np.zeros(B, dtype=bool)
        for i in range(B):
            if not bool(self.ok[i]):
                self.factors.append(None)
                continue
            A = sp.csc_matrix((Av[i], (pa.rows, pa.cols)), shape=(m, n))
            P = sp.csc_matrix((n, n))
            if program.P_pattern is not None and Pv is not None:
                pp = program.P_pattern
                P = sp.csc_matrix((Pv[i], (pp.rows, pp.cols)), shape=(n, n))
            D = sp.csc_matrix(Dd[i])
            J = sp.bmat([[P, A.T @ D], [A, D - sp.eye(m)]], format="csc")
            try:
                self.factors.append(spla.splu(J))
            except RuntimeError:  # exactly singular
                degenerate[i] = True
                self.factors.append(J)
        self.degenerate = torch.as_tensor(degenerate, device=self.ok.device)

    def _solve_sparse(self, rhs: torch.Tensor, adjoint: bool) -> torch.Tensor:
        r = _numpy(rhs)
        out = np.zeros_like(r)
        for i, f in enumerate(self.factors):
            if f is None:
                continue
            if isinstance(f, spla.SuperLU):
                out[i] = f.solve(r[i], trans="T" if adjoint else "N")
            else:  # singular: minimum-norm least squares
                M = f.T if adjoint else f
                out[i] = spla.lsqr(M, r[i], atol=1e-14, btol=1e-14, iter_lim=10 * M.shape[0])[0]
        return torch.as_tensor(out, dtype=rhs.dtype, device=rhs.device)

    def _solve(self, rhs: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if self.method == "dense":
            return self._solve_dense(rhs, adjoint)
        return self._solve_sparse(rhs, adjoint)

    # -- the Differentiator protocol ----------------------------------------------------------
    def adjoint(self, gx, gy, gs):
        # Outputs y = Π(v) and s = Π(v) − v pull back to g_v = D g_y + (D − I) g_s.
        gv = self.D.matvec(gy + gs) - gs
        lam = self._solve(-torch.cat([gx, gv], dim=1), adjoint=True)
        return lam[:, : self.n], lam[:, self.n:]

    def tangent(self, dr1, dr2):
        dz = self._solve(-torch.cat([dr1, dr2], dim=1), adjoint=False)
        dx, dv = dz[:, : self.n], dz[:, self.n:]
        dy = self.D.matvec(dv)
        return dx, dy, dy - dv
