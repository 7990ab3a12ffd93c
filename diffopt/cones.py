"""Cone specifications, Euclidean projections and projection Jacobians, batched in torch.

The standard form used throughout diffopt is

.. math::

    \\min_x \\tfrac12 x^\\top P x + c^\\top x
    \\quad\\text{s.t.}\\quad Ax + s = b,\\ s \\in \\mathcal K,
    \\qquad y \\in \\mathcal K^*,

with the rows of ``A`` (and of ``s``, ``y``) ordered as: zero cone, nonnegative cone, second-order
cones, PSD cones (in ``svec`` coordinates), exponential cones (three rows each, ``(x, y, z)``),
3D power cones (three rows each, ``(x, y, z)``).

Everything here is plain torch on the inputs' dtype and device; a batch is the leading dimension
of a ``(B, m)`` tensor. Cones of the same kind and size are processed together, so the cost of a
call does not grow with a Python loop over cones or items.
The exponential and 3D power cone projections live in ``diffopt.cones_exp`` and
``diffopt.cones_pow``; this module dispatches to them.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffopt.cones_exp import _dproj_exp, _proj_exp
from diffopt.cones_pow import _dproj_pow, _proj_pow

__all__ = [
    "ConeDims",
    "ProjJacobian",
    "dproj_dual",
    "proj_dual",
    "proj_primal",
    "smat",
    "svec",
]

_KINDS = ("zero", "nonneg", "soc", "psd", "exp", "pow")


# --------------------------------------------------------------------------------------------
# Cone dimensions
# --------------------------------------------------------------------------------------------


def _check_count(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an int, or raise a ValueError saying what was expected."""
    try:
        # operator.index accepts Python and NumPy integers (as CVXPY gives them), not floats.
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(
            f"ConeDims.{name}: expected an integer, received {value!r} of type "
            f"{type(value).__name__}; pass whole numbers of rows/cones."
        ) from None
    if value < minimum:
        raise ValueError(
            f"ConeDims.{name}: expected an integer >= {minimum}, received {value}; "
            + (
                "a cone count cannot be negative."
                if minimum == 0
                else "each cone must have at least one row (drop empty cones)."
            )
        )
    return value


def _check_alphas(alphas: Any) -> tuple[float, ...]:
    """Return the power cones' exponents as a tuple of floats, each in (0, 1), or raise."""
    if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__iter__"):
        raise ValueError(
            f"ConeDims.pow: expected a sequence of exponents such as (0.5, 0.25), received "
            f"{alphas!r}; wrap a single exponent in a tuple."
        )
    out = []
    for i, a in enumerate(alphas):
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 < a < 1:
            raise ValueError(
                f"ConeDims.pow[{i}]: expected an exponent α strictly between 0 and 1, received "
                f"{a!r}; the cone x^α y^(1-α) >= |z| needs 0 < α < 1 (at α = 0 or 1 it is "
                "polyhedral: write linear constraints instead)."
            )
        out.append(float(a))
    return tuple(out)


@dataclass(frozen=True)
class ConeDims:
    """Sizes of the cones of a standard-form cone program, in row order.

    Attributes:
        zero: Number of rows in the zero cone (equality constraints).
        nonneg: Number of rows in the nonnegative orthant.
        soc: Size ``q`` of each second-order cone ``{(t, u): ||u||_2 <= t}`` (``q >= 1``; a
            1-dimensional SOC is ``{t >= 0}``).
        psd: Order ``k`` of each PSD cone; each uses ``k (k + 1) / 2`` rows (see :func:`svec`).
        exp: Number of exponential cones, three rows ``(x, y, z)`` each.
        pow: The exponent ``α ∈ (0, 1)`` of each 3D power cone
            ``{(x, y, z): x^α y^(1-α) >= |z|, x, y >= 0}``, three rows ``(x, y, z)`` each.

    Examples:
        >>> dims = ConeDims(zero=1, nonneg=2, soc=(3,), psd=(2,), exp=1, pow=(0.5, 0.25))
        >>> dims.size
        18
        >>> sorted(dims.kinds())
        ['exp', 'nonneg', 'pow', 'psd', 'soc', 'zero']
    """

    zero: int = 0
    nonneg: int = 0
    soc: tuple[int, ...] = ()
    psd: tuple[int, ...] = ()
    exp: int = 0
    pow: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # Normalize lists (as CVXPY gives them) to tuples so that ConeDims stays hashable.
        for name in ("zero", "nonneg", "exp"):
            object.__setattr__(self, name, _check_count(name, getattr(self, name), 0))
        for name in ("soc", "psd"):
            sizes = getattr(self, name)
            if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
                raise ValueError(
                    f"ConeDims.{name}: expected a sequence of cone sizes such as (3, 3), "
                    f"received {sizes!r}; wrap a single size in a tuple."
                )
            sizes = tuple(_check_count(f"{name}[{i}]", q, 1) for i, q in enumerate(sizes))
            object.__setattr__(self, name, sizes)
        object.__setattr__(self, "pow", _check_alphas(self.pow))

    @property
    def size(self) -> int:
        """Total number of rows ``m``."""
        return (
            self.zero
            + self.nonneg
            + sum(self.soc)
            + sum(k * (k + 1) // 2 for k in self.psd)
            + 3 * self.exp
            + 3 * len(self.pow)
        )

    def kinds(self) -> frozenset[str]:
        """The cone kinds with at least one row, a subset of ``{"zero", "nonneg", "soc", "psd",
        "exp", "pow"}``."""
        present = {
            "zero": self.zero > 0,
            "nonneg": self.nonneg > 0,
            "soc": len(self.soc) > 0,
            "psd": len(self.psd) > 0,
            "exp": self.exp > 0,
            "pow": len(self.pow) > 0,
        }
        return frozenset(k for k in _KINDS if present[k])

    @classmethod
    def from_cvxpy(cls, dims: Any) -> ConeDims:
        """Build from CVXPY's cone dimensions (``problem.get_problem_data(...)[0]["dims"]``).

        Args:
            dims: An object with attributes ``zero``, ``nonneg``, ``soc``, ``psd``, ``exp`` and
                optionally ``p3d`` (the α of each 3D power cone) and ``pnd``.

        Raises:
            ValueError: If the problem has n-dimensional power cones (``pnd``), which only
                solvers that CVXPY does not lower them for produce.
        """
        nd = list(getattr(dims, "pnd", None) or [])
        if nd:
            raise ValueError(
                f"n-dimensional power cones are not supported; received {len(nd)} of them. "
                "Canonicalize for SCS (problem.get_problem_data(solver=cvxpy.SCS)), which "
                "lowers them to 3D power cones."
            )
        return cls(
            zero=dims.zero,
            nonneg=dims.nonneg,
            soc=tuple(dims.soc),
            psd=tuple(dims.psd),
            exp=dims.exp,
            pow=tuple(getattr(dims, "p3d", None) or ()),
        )


# --------------------------------------------------------------------------------------------
# svec / smat
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def _svec_index(k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index data for the order-``k`` svec: rows, cols (lower triangle, column-major), scales,
    and the ``(k, k)`` map from a matrix entry to its svec position. Cached: callers must not
    modify the tensors in place."""
    rows = [i for j in range(k) for i in range(j, k)]
    cols = [j for j in range(k) for i in range(j, k)]
    r, c = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
    scale = torch.full((len(rows),), math.sqrt(2.0), dtype=torch.float64)
    scale[r == c] = 1.0
    position = torch.empty(k, k, dtype=torch.long)
    position[r, c] = torch.arange(len(rows))
    position[c, r] = torch.arange(len(rows))
    return r, c, scale, position


def _psd_order(n: int) -> int:
    """The matrix order ``k`` with ``k (k + 1) / 2 == n``, or a ValueError."""
    k = int(round((math.sqrt(8 * n + 1) - 1) / 2))
    if k * (k + 1) // 2 != n:
        raise ValueError(f"expected a triangular number of svec entries, received {n}.")
    return k


def svec(X: Tensor) -> Tensor:
    """Scaled vectorization of symmetric matrices (SCS's convention).

    The lower triangle is stacked column by column, ``(0,0), (1,0), ..., (k-1,0), (1,1), ...``,
    with the off-diagonal entries multiplied by :math:`\\sqrt 2`, so that
    :math:`\\langle \\mathrm{svec}\\,X, \\mathrm{svec}\\,Y\\rangle = \\mathrm{tr}(XY)`.

    Args:
        X: ``(..., k, k)`` symmetric matrices (only the lower triangle is read).

    Returns:
        ``(..., k (k + 1) / 2)`` tensor.

    Examples:
        >>> svec(torch.tensor([[1.0, 2.0], [2.0, 3.0]]))
        tensor([1.0000, 2.8284, 3.0000])
    """
    if X.ndim < 2 or X.shape[-1] != X.shape[-2]:
        raise ValueError(
            f"svec: expected (..., k, k) square matrices, received shape {tuple(X.shape)}."
        )
    r, c, scale, _ = _svec_index(X.shape[-1])
    r, c = r.to(X.device), c.to(X.device)
    return X[..., r, c] * scale.to(device=X.device, dtype=X.dtype)


def smat(v: Tensor, k: int) -> Tensor:
    """Inverse of :func:`svec`: symmetric ``(..., k, k)`` matrices from ``(..., k (k + 1) / 2)``.

    Examples:
        >>> smat(torch.tensor([1.0, 2.0 * 2**0.5, 3.0]), 2)
        tensor([[1., 2.],
                [2., 3.]])
    """
    n = k * (k + 1) // 2
    if v.shape[-1:] != (n,):
        raise ValueError(
            f"smat: expected a last dimension of k (k + 1) / 2 = {n} for k = {k}, received "
            f"shape {tuple(v.shape)}; pass the matrix order k that the svec was built from."
        )
    _, _, scale, position = _svec_index(k)
    unscaled = v / scale.to(device=v.device, dtype=v.dtype)
    return unscaled[..., position.to(v.device)]


# --------------------------------------------------------------------------------------------
# Row layout: cones of the same kind and size are gathered into one batched block
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """Cones of one kind and block size ``n``: ``rows[j]`` are the rows of the j-th cone.

    ``alpha`` holds the power cones' exponents, one per cone (float64, CPU; empty otherwise).
    """

    kind: str
    n: int
    rows: Tensor  # (count, n) long, CPU
    offsets: tuple[int, ...]  # first row of each cone, in the order of ``rows``
    alpha: Tensor  # (count,) float64, CPU


@functools.lru_cache(maxsize=64)
def _layout(dims: ConeDims) -> tuple[_Group, ...]:
    """Group the SOC / PSD / exp / power cones of ``dims`` by (kind, block size)."""
    offset = dims.zero + dims.nonneg
    starts: dict[tuple[str, int], list[int]] = {}
    for kind, sizes in (
        ("soc", dims.soc),
        ("psd", tuple(k * (k + 1) // 2 for k in dims.psd)),
        ("exp", (3,) * dims.exp),
        ("pow", (3,) * len(dims.pow)),
    ):
        for n in sizes:
            starts.setdefault((kind, n), []).append(offset)
            offset += n
    return tuple(
        _Group(
            kind,
            n,
            torch.tensor(firsts, dtype=torch.long)[:, None] + torch.arange(n),
            tuple(firsts),
            torch.tensor(dims.pow if kind == "pow" else (), dtype=torch.float64),
        )
        for (kind, n), firsts in starts.items()
    )


def _check_batch(v: Tensor, dims: ConeDims, name: str) -> None:
    if not isinstance(dims, ConeDims):
        raise ValueError(f"{name}: expected dims to be a ConeDims, received {type(dims).__name__}.")
    if v.ndim != 2 or v.shape[1] != dims.size:
        raise ValueError(
            f"{name}: expected a (B, m) tensor with m = dims.size = {dims.size}, received shape "
            f"{tuple(v.shape)}; add a leading batch dimension with v.unsqueeze(0) for one item."
        )
    if not v.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, received dtype {v.dtype}.")


def _assemble(parts: list[Tensor], rows: list[Tensor], m: int) -> Tensor:
    """Concatenate row blocks computed group by group and put each row back in place."""
    cat = torch.cat(parts, dim=1)
    if cat.shape[1] == 0:
        return cat
    order = torch.cat([r.reshape(-1) for r in rows]).to(cat.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(m, device=cat.device)
    return cat[:, inverse]


# --------------------------------------------------------------------------------------------
# Second-order cone
# --------------------------------------------------------------------------------------------


def _soc_split(v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t, u = v[..., :1], v[..., 1:]
    return t, u, torch.linalg.vector_norm(u, dim=-1, keepdim=True)


def _proj_soc(v: Tensor) -> Tensor:
    """Project ``(..., q)`` points ``(t, u)`` onto the SOC ``{||u|| <= t}``."""
    t, u, nu = _soc_split(v)
    # Outside both the cone and its polar, the projection is the point of the boundary ray
    # through u/||u|| at height (t + ||u||) / 2.
    half = (t + nu) / 2
    boundary = torch.cat([half, half * u / torch.where(nu > 0, nu, 1.0)], dim=-1)
    return torch.where(nu <= t, v, torch.where(nu <= -t, torch.zeros_like(v), boundary))


def _dproj_soc(v: Tensor) -> Tensor:
    """Jacobian ``(..., q, q)`` of the SOC projection at ``(..., q)`` points.

    Identity in the interior, zero in the polar cone (the origin included), and on the rest
    (``|t| < ||u||``), with ``w = u / ||u||``,

    .. math::

        \\tfrac12 \\begin{bmatrix} 1 & w^\\top \\\\
        w & (1 + t/\\|u\\|) I - (t/\\|u\\|) w w^\\top \\end{bmatrix}.
    """
    q = v.shape[-1]
    t, u, nu = _soc_split(v)
    w = u / torch.where(nu > 0, nu, 1.0)
    ratio = (t / torch.where(nu > 0, nu, 1.0))[..., None]  # (..., 1, 1)
    eye = torch.eye(q, dtype=v.dtype, device=v.device)
    top = torch.cat([torch.ones_like(t), w], dim=-1)[..., None, :]  # (..., 1, q)
    lower = torch.cat(
        [w[..., :, None], (1 + ratio) * eye[1:, 1:] - ratio * w[..., :, None] * w[..., None, :]],
        dim=-1,
    )  # (..., q-1, q)
    boundary = 0.5 * torch.cat([top, lower], dim=-2)
    inside = (nu < t)[..., None]
    polar = (nu <= -t)[..., None]
    return torch.where(inside, eye, torch.where(polar, torch.zeros_like(boundary), boundary))


# --------------------------------------------------------------------------------------------
# PSD cone (svec coordinates)
# --------------------------------------------------------------------------------------------


def _proj_psd(v: Tensor) -> Tensor:
    """Project ``(..., k(k+1)/2)`` svec points onto the PSD cone: ``Q max(Λ, 0) Qᵀ``."""
    k = _psd_order(v.shape[-1])
    lam, Q = torch.linalg.eigh(smat(v, k))
    return svec((Q * lam.clamp(min=0)[..., None, :]) @ Q.transpose(-1, -2))


def _dproj_psd(v: Tensor) -> Tensor:
    """Jacobian ``(..., n, n)`` of the PSD projection in svec coordinates, ``n = k(k+1)/2``.

    Daleckii–Krein: with ``V = Q Λ Qᵀ``, ``DΠ(V)[H] = Q (Γ ∘ QᵀHQ) Qᵀ``, where
    ``Γᵢⱼ = (λᵢ⁺ − λⱼ⁺) / (λᵢ − λⱼ)``; ties are resolved by continuity from the sign pattern:
    ``Γᵢⱼ = 1`` when both are positive, ``0`` when both are ``<= 0``, and ``λ⁺ / |λᵢ − λⱼ|``
    when the signs differ (then the denominator is never zero).

    The congruence ``H ↦ QᵀHQ`` is orthogonal on symmetric matrices, so in svec coordinates it
    is an orthogonal ``n x n`` matrix ``W`` and ``Γ ∘`` is the diagonal ``diag(svec-entries of
    Γ)``. Hence ``D = Wᵀ diag(γ) W``: symmetric with eigenvalues ``γ ∈ [0, 1]`` by construction.
    Row ``b = (i, j)`` of ``W`` is ``svec(Q E_b Qᵀ)`` for the orthonormal basis matrix ``E_b``.
    """
    n = v.shape[-1]
    k = _psd_order(n)
    lam, Q = torch.linalg.eigh(smat(v, k))
    r, c, scale, _ = _svec_index(k)
    r, c = r.to(v.device), c.to(v.device)
    scale = scale.to(device=v.device, dtype=v.dtype)
    flat = r * k + c  # svec position b -> entry (r_b, c_b) of a flattened k x k matrix

    pos = lam > 0
    lp = lam.clamp(min=0)
    both = pos[..., :, None] & pos[..., None, :]
    mixed = pos[..., :, None] ^ pos[..., None, :]
    den = lam[..., :, None] - lam[..., None, :]
    num = lp[..., :, None] - lp[..., None, :]
    gamma = torch.where(mixed, num / torch.where(mixed, den, 1.0), both.to(v.dtype))
    gamma = gamma.flatten(-2).index_select(-1, flat)  # (..., n), indexed by b

    # Wt[a, b] = W[b, a] = svec_a(Q E_b Qᵀ) for a = (r_a, c_a), b = (i_b, j_b):
    #   scale_a / (2 if i_b = j_b else √2) * (Q[r_a, i_b] Q[c_a, j_b] + Q[r_a, j_b] Q[c_a, i_b]),
    # entries (i_b, j_b) and (j_b, i_b) of M_a = Q[r_a, :]ᵀ Q[c_a, :]. Read with index_select and
    # gathers: 3.5x faster than advanced indexing of the batched Q (16 10x10 blocks, one thread).
    Qr, Qc = Q.index_select(-2, r), Q.index_select(-2, c)  # (..., n_a, k)
    M = (Qr[..., :, None] * Qc[..., None, :]).flatten(-2)  # (..., n_a, k²)
    sym = (torch.gather(M, -1, flat.expand(*M.shape[:-1], n))
           + torch.gather(M, -1, (c * k + r).expand(*M.shape[:-1], n)))  # (..., n_a, n_b)
    Wt = sym * (scale[:, None] * scale[None, :] / 2)
    return (Wt * gamma[..., None, :]) @ Wt.transpose(-1, -2)


# --------------------------------------------------------------------------------------------
# Projections onto K and K*
# --------------------------------------------------------------------------------------------

def _proj_group(g: _Group, block: Tensor) -> Tensor:
    """Project a ``(B, count, n)`` block of the group's cones onto K."""
    if g.kind == "pow":
        return _proj_pow(block, g.alpha)
    return {"soc": _proj_soc, "psd": _proj_psd, "exp": _proj_exp}[g.kind](block)


def _proj_block(g: _Group, block: Tensor, dual: bool) -> Tensor:
    if dual and g.kind in ("exp", "pow"):
        # Moreau: v = Π_K(v) + Π_{K°}(v) and K° = -K*, hence Π_{K*}(v) = v + Π_K(-v).
        return block + _proj_group(g, -block)
    return _proj_group(g, block)  # SOC, PSD (and R+) are self-dual


def _project(v: Tensor, dims: ConeDims, dual: bool, name: str) -> Tensor:
    _check_batch(v, dims, name)
    B, z, l = v.shape[0], dims.zero, dims.nonneg
    # Zero cone {0}: projection 0; its dual is the whole space: identity.
    parts = [v[:, :z] if dual else torch.zeros_like(v[:, :z]), v[:, z : z + l].clamp(min=0)]
    rows = [torch.arange(z + l)]
    for g in _layout(dims):
        idx = g.rows.to(v.device)
        parts.append(_proj_block(g, v[:, idx], dual).reshape(B, -1))
        rows.append(g.rows)
    return _assemble(parts, rows, dims.size)


def proj_primal(v: Tensor, dims: ConeDims) -> Tensor:
    """Euclidean projection onto the cone ``K`` (the zero cone's rows are set to 0).

    Args:
        v: ``(B, m)`` points, ``m = dims.size``, float32 or float64, any device.
        dims: The cone dimensions.

    Returns:
        ``(B, m)`` projection, same dtype and device as ``v``.

    Examples:
        >>> dims = ConeDims(zero=1, nonneg=1, soc=(3,))
        >>> proj_primal(torch.tensor([[2.0, -1.0, 0.0, 3.0, 4.0]]), dims)
        tensor([[0.0000, 0.0000, 2.5000, 1.5000, 2.0000]])
    """
    return _project(v, dims, dual=False, name="proj_primal")


def proj_dual(v: Tensor, dims: ConeDims) -> Tensor:
    """Euclidean projection onto the dual cone ``K*``.

    The zero cone's dual is free (identity); the orthant, SOC and PSD cones are self-dual; for
    the exponential and power cones ``Π_{K*}(v) = v + Π_K(-v)`` (Moreau).

    Args:
        v: ``(B, m)`` points, ``m = dims.size``.
        dims: The cone dimensions.

    Returns:
        ``(B, m)`` projection, same dtype and device as ``v``.

    Examples:
        >>> dims = ConeDims(zero=1, nonneg=1, soc=(3,))
        >>> proj_dual(torch.tensor([[2.0, -1.0, 0.0, 3.0, 4.0]]), dims)
        tensor([[2.0000, 0.0000, 2.5000, 1.5000, 2.0000]])
    """
    return _project(v, dims, dual=True, name="proj_dual")


# --------------------------------------------------------------------------------------------
# Projection Jacobian
# --------------------------------------------------------------------------------------------


@dataclass
class ProjJacobian:
    """Block-diagonal Jacobian ``D`` of a cone projection (symmetric, eigenvalues in [0, 1]).

    Attributes:
        diag: ``(B, zero + nonneg)`` diagonal for the zero and nonnegative rows.
        blocks: ``(row offset, (B, k, k) block)`` for each SOC / PSD / exp cone, in row order.
        size: The number of rows ``m``.

    Blocks of equal size are also kept stacked (``_groups``) so that :meth:`matvec` and
    :meth:`dense` cost one batched operation per block size; when only ``blocks`` are given,
    the stacks are built from them.
    """

    diag: Tensor
    blocks: list[tuple[int, Tensor]]
    size: int
    _groups: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.blocks and not self._groups:
            by_size: dict[int, list[tuple[int, Tensor]]] = {}
            for offset, block in self.blocks:
                by_size.setdefault(block.shape[-1], []).append((offset, block))
            for n, items in by_size.items():
                rows = torch.tensor([o for o, _ in items])[:, None] + torch.arange(n)
                self._groups.append((rows, torch.stack([b for _, b in items], dim=1)))

    @property
    def groups(self) -> list[tuple[Tensor, Tensor]]:
        """The blocks stacked by size: ``(rows, stack)`` pairs, ``rows`` the ``(count, k)`` row
        indices of ``count`` cones (CPU, long) and ``stack`` their ``(B, count, k, k)`` blocks."""
        return self._groups

    def dense(self) -> Tensor:
        """The ``(B, m, m)`` matrix."""
        B, nd = self.diag.shape
        out = self.diag.new_zeros(B, self.size, self.size)
        i = torch.arange(nd, device=out.device)
        out[:, i, i] = self.diag
        for rows, stack in self._groups:
            r = rows.to(out.device)
            out[:, r[:, :, None], r[:, None, :]] = stack
        return out

    def matvec(self, u: Tensor) -> Tensor:
        """``D u`` for ``(B, m)`` vectors, without forming the dense matrix."""
        if u.shape != (self.diag.shape[0], self.size):
            raise ValueError(
                f"ProjJacobian.matvec: expected shape {(self.diag.shape[0], self.size)}, "
                f"received {tuple(u.shape)}."
            )
        nd = self.diag.shape[1]
        parts, rows = [self.diag * u[:, :nd]], [torch.arange(nd)]
        for r, stack in self._groups:
            parts.append((stack @ u[:, r.to(u.device)][..., None]).reshape(u.shape[0], -1))
            rows.append(r)
        return _assemble(parts, rows, self.size)


def _dproj_group(g: _Group, block: Tensor) -> Tensor:
    """``DΠ_K`` of a ``(B, count, n)`` block of the group's cones: ``(B, count, n, n)``."""
    if g.kind == "pow":
        return _dproj_pow(block, g.alpha)
    return {"soc": _dproj_soc, "psd": _dproj_psd, "exp": _dproj_exp}[g.kind](block)


def dproj_dual(v: Tensor, dims: ConeDims) -> ProjJacobian:
    """Jacobian ``D = DΠ_{K*}(v)`` of :func:`proj_dual`, block by block.

    Zero cone: 1 (the dual is free). Orthant: ``1[v > 0]``. SOC: closed form (identity inside,
    zero in the polar, rank-structured in between). PSD: Daleckii–Krein in svec coordinates.
    Exponential and power: ``I - DΠ_K(-v)`` by the chain rule on ``Π_{K*}(v) = v + Π_K(-v)``, with
    ``DΠ_K`` from implicit differentiation of the projection's optimality conditions.
    At kinks (measure zero) one element of the Clarke Jacobian is returned.

    Args:
        v: ``(B, m)`` points.
        dims: The cone dimensions.

    Returns:
        The block-diagonal :class:`ProjJacobian`.

    Examples:
        >>> dims = ConeDims(zero=1, nonneg=2)
        >>> dproj_dual(torch.tensor([[5.0, -1.0, 2.0]]), dims).dense()
        tensor([[[1., 0., 0.],
                 [0., 0., 0.],
                 [0., 0., 1.]]])
    """
    _check_batch(v, dims, "dproj_dual")
    z, l = dims.zero, dims.nonneg
    diag = torch.cat([torch.ones_like(v[:, :z]), (v[:, z : z + l] > 0).to(v.dtype)], dim=1)
    blocks: list[tuple[int, Tensor]] = []
    groups: list[tuple[Tensor, Tensor]] = []
    for g in _layout(dims):
        block = v[:, g.rows.to(v.device)]  # (B, count, n)
        if g.kind in ("exp", "pow"):
            jac = torch.eye(3, dtype=v.dtype, device=v.device) - _dproj_group(g, -block)
        else:
            jac = _dproj_group(g, block)
        groups.append((g.rows, jac))
        blocks.extend((off, jac[:, j]) for j, off in enumerate(g.offsets))
    blocks.sort(key=lambda item: item[0])
    return ProjJacobian(diag=diag, blocks=blocks, size=dims.size, _groups=groups)
