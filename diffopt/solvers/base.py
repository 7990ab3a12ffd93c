r"""The solver-backend contract: canonical statuses, the batched cone program, results.

Every backend solves the standard-form cone program (derived on the docs' math page)

.. math::

    \min_x \tfrac12 x^\top P x + c^\top x \quad \text{s.t.}\quad Ax + s = b,\ s \in \mathcal K,

and returns the primal-dual triple ``(x, y, s)`` with ``y`` in the dual cone, plus one canonical
:class:`Status` per item. Backends declare what they support as class attributes; the layer
checks them before solving, so a problem is never sent to a solver that cannot handle it.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import scipy.sparse as sp
import torch

from diffopt.cones import ConeDims


class Status(enum.Enum):
    """Canonical outcome of one solve. The value is a sentence telling the user what it means.

    Examples:
        >>> from diffopt import Status
        >>> Status.INFEASIBLE.ok, Status.OPTIMAL.ok
        (False, True)
        >>> Status.MAX_ITERATIONS.value
        'the iteration limit was reached before convergence; raise max_iters or check scaling'
    """

    OPTIMAL = "solved to the requested tolerance"
    INACCURATE = (
        "the solver stopped close to, but not at, the requested tolerance; loosen the tolerance "
        "or pass allow_inaccurate=True to accept such solutions"
    )
    INFEASIBLE = (
        "the problem is primal infeasible for these parameter values: no point satisfies the "
        "constraints"
    )
    UNBOUNDED = (
        "the problem is dual infeasible for these parameter values: the objective decreases "
        "without bound along a direction of the constraints' recession cone (it is unbounded "
        "below if the constraints are feasible)"
    )
    MAX_ITERATIONS = (
        "the iteration limit was reached before convergence; raise max_iters or check scaling"
    )
    NUMERICAL_ERROR = (
        "the solver failed numerically, or its answer failed verification; check the scaling of "
        "the problem data"
    )
    NOT_FINITE = (
        "the item's data (parameters) or the solver's answer contain NaN or Inf; check the "
        "inputs of this item"
    )

    @property
    def ok(self) -> bool:
        """True when the item holds a solution that may be used (and differentiated)."""
        return self is Status.OPTIMAL


@dataclass(frozen=True)
class SparsePattern:
    """Fixed sparsity pattern shared by every item of a batch (COO, row-major sorted)."""

    rows: np.ndarray
    cols: np.ndarray
    shape: tuple[int, int]
    _memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def nnz(self) -> int:
        return int(self.rows.size)

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()``, computed on the first request for ``key`` and kept with the pattern.

        For index structures that depend only on the pattern (and on what ``key`` names, e.g.
        the cones): a layer holds one pattern, so every later call reuses them.
        """
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    @functools.cached_property
    def is_full(self) -> bool:
        """Whether the pattern holds every entry of its shape, in row-major order (a dense
        matrix: its values are the matrix, reshaped)."""
        r, c = self.shape
        return self.nnz == r * c and bool((self.rows * c + self.cols == np.arange(r * c)).all())


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


@dataclass
class ConeProgram:
    """A batch of cone programs sharing one sparsity pattern.

    Attributes:
        P_pattern: pattern of the full symmetric P (both triangles), or None for LPs.
        P_values: ``(B, nnz_P)`` values on ``P_pattern`` (None for LPs).
        c: ``(B, n)``.
        A_pattern: pattern of A, shape ``(m, n)``.
        A_values: ``(B, nnz_A)``.
        b: ``(B, m)``.
        dims: the cone ``K`` (rows of A in the order zero, nonneg, soc, psd, exp, pow).
    """

    P_pattern: SparsePattern | None
    P_values: torch.Tensor | None
    c: torch.Tensor
    A_pattern: SparsePattern
    A_values: torch.Tensor
    b: torch.Tensor
    dims: ConeDims

    @property
    def batch_size(self) -> int:
        return int(self.c.shape[0])

    @property
    def n(self) -> int:
        return int(self.c.shape[1])

    @property
    def m(self) -> int:
        return int(self.b.shape[1])

    def dense_A(self) -> torch.Tensor:
        """``(B, m, n)`` dense constraint matrices on the data's device and dtype."""
        out = self.A_values.new_zeros(self.batch_size, *self.A_pattern.shape)
        rows = torch.as_tensor(self.A_pattern.rows, device=out.device)
        cols = torch.as_tensor(self.A_pattern.cols, device=out.device)
        out[:, rows, cols] = self.A_values
        return out

    def dense_P(self) -> torch.Tensor:
        """``(B, n, n)`` dense quadratic terms (zeros for an LP)."""
        out = self.c.new_zeros(self.batch_size, self.n, self.n)
        if self.P_pattern is not None and self.P_values is not None:
            rows = torch.as_tensor(self.P_pattern.rows, device=out.device)
            cols = torch.as_tensor(self.P_pattern.cols, device=out.device)
            out[:, rows, cols] = self.P_values
        return out


@dataclass
class Solution:
    """Batched solver output in the standard form, with per-item diagnostics.

    Attributes:
        x: ``(B, n)`` primal solutions (NaN rows for failed items).
        y: ``(B, m)`` dual solutions, in the dual cone.
        s: ``(B, m)`` slacks, in the cone.
        status: one :class:`Status` per item.
        iterations: iterations used per item.
        primal_residual: ``‖Ax + s − b‖∞`` per item.
        dual_residual: ``‖Px + Aᵀy + c‖∞`` per item.
        gap: ``|sᵀy|`` per item (complementarity).
        solve_time: wall-clock seconds per item.
        errors: ``{item: "ExceptionType: message"}`` for the items whose solve raised (their
            status is ``NUMERICAL_ERROR``).
        refine_steps: Newton steps of solution refinement kept per item (empty: not refined).
    """

    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    status: list[Status]
    iterations: list[int] = field(default_factory=list)
    primal_residual: list[float] = field(default_factory=list)
    dual_residual: list[float] = field(default_factory=list)
    gap: list[float] = field(default_factory=list)
    solve_time: list[float] = field(default_factory=list)
    differentiator: Differentiator | None = None
    errors: dict[int, str] = field(default_factory=dict)
    refine_steps: list[int] = field(default_factory=list)


class Differentiator(Protocol):
    r"""Linear solves with the Jacobian of the optimality conditions at a solution.

    Every backend's optimality conditions read ``R = [Px + Aᵀy + c ; Ax + s(·) − b] = 0`` in some
    internal variables ``z`` (``(x, v)`` for the conic KKT map, ``(x, y)`` for the barrier
    system of the interior-point method), so the data enter only through

    .. math:: dR = [\,dP\,x + dA^\top y + dc \;;\; dA\,x - db\,].

    ``adjoint`` returns ``λ = −J⁻ᵀ g_z`` split as ``(λ₁, λ₂)`` (sizes n and m), from which the data
    gradients are ``∇c = λ₁``, ``∇b = −λ₂``, ``∇A = yλ₁ᵀ + λ₂xᵀ``, ``∇P = sym(λ₁xᵀ)``.
    ``tangent`` returns ``(dx, dy, ds)`` for a given ``(dR₁, dR₂)`` by solving ``J dz = −dR``.
    """

    def adjoint(
        self, gx: torch.Tensor, gy: torch.Tensor, gs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def tangent(
        self, dr1: torch.Tensor, dr2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


#: Options every backend honours, each mapped to the backend's own settings.
COMMON_OPTIONS = frozenset({"tol", "max_iters", "verbose", "n_jobs"})


class Backend:
    """Base class for solver backends. Subclasses set the capability attributes and ``solve``.

    Attributes:
        name: the string users pass as ``solver=``.
        cones: the cone kinds supported, among ``{"zero", "nonneg", "soc", "psd", "exp",
            "pow"}`` (see :meth:`diffopt.cones.ConeDims.kinds`).
        quadratic_objective: whether ``P`` is accepted (otherwise QPs are refused).
        equilibrate: whether the program is equilibrated before ``solve`` (default True).
    """

    name: ClassVar[str]
    cones: ClassVar[frozenset[str]]
    quadratic_objective: ClassVar[bool]
    #: Whether the layer equilibrates the program before this backend solves it
    #: (:mod:`diffopt.scaling`); False for a backend that returns a precomputed answer.
    equilibrate: ClassVar[bool] = True

    def supports(self, dims: ConeDims, quadratic: bool) -> str | None:
        """Return None when the backend can solve the program, else the reason it cannot."""
        missing = sorted(dims.kinds() - self.cones)
        if missing:
            return f"solver {self.name!r} does not support the cone(s) {missing}"
        if quadratic and not self.quadratic_objective:
            return f"solver {self.name!r} does not accept a quadratic objective"
        return None

    def solve(self, program: ConeProgram, options: dict) -> Solution:  # pragma: no cover
        raise NotImplementedError

    def one_thread_derivative(self, program: ConeProgram, options: dict) -> bool:
        """Whether the derivative of this solve (the conic KKT backward and forward mode) should
        run on one torch intra-op thread; False unless a backend says otherwise."""
        return False

    def accepted_options(self) -> frozenset[str]:
        """Every ``options`` key this backend honours: the common ``tol``, ``max_iters``,
        ``verbose``, ``n_jobs`` (each backend maps them to its own settings) and its own."""
        return COMMON_OPTIONS


@dataclass
class ItemResult:
    """One item's answer from a per-item backend, in the standard form (NumPy arrays)."""

    x: np.ndarray | None
    y: np.ndarray | None
    s: np.ndarray | None
    status: Status
    iterations: int = 0
    solve_time: float = 0.0
    error: Exception | None = None  # what the backend raised for this item, if it did


#: Largest ``B·(n + m)²`` for which a per-item backend's derivative runs on one torch thread
#: (see :meth:`PerItemBackend.one_thread_derivative`); 2^21, a 16 MiB float64 system.
ONE_THREAD_DERIVATIVE = 2**21


class PerItemBackend(Backend):
    """A backend that solves items one at a time on the CPU, in a thread pool.

    Subclasses implement :meth:`solve_one` on SciPy/NumPy data. The ``n_jobs`` option sets the
    number of worker threads (default ``min(batch size, available cores)``); with ``n_jobs=1`` (or
    a batch of one) the items are solved in a plain loop, without a pool. Threads scale because
    the solvers' Python bindings release the GIL while they solve (Clarabel 0.11's
    ``py.allow_threads``, SCS 3.3, ECOS 2.0): on 2 idle cores two threads solve a batch 1.6-1.9x
    faster than one (``benchmarks/bench_parallel.py``). While the pool runs, BLAS/OpenMP
    libraries are limited to ``max(1, cores // n_jobs)`` threads (threadpoolctl), so the
    workers do not oversubscribe the cores. Every item's answer is the same whichever thread
    solved it, and statuses stay per item and in order. An exception raised while solving some
    items makes those items ``NUMERICAL_ERROR`` (its text in the solution's ``errors``; the
    others keep their answers); raised for every item (a bad option), it propagates.

    Example:
        >>> from diffopt.solvers import get_backend
        >>> get_backend("clarabel").name
        'clarabel'
        >>> # layer(..., solver_args={"n_jobs": 2})  # two worker threads
    """

    def solve_one(self, P, c, A, b, dims: ConeDims, options: dict) -> ItemResult:
        """Solve one item. ``P`` is the upper triangle of the quadratic term (CSC) or None; the
        rows of ``A``, ``b`` and of the returned ``y``, ``s`` are in :meth:`row_permutation`
        order."""
        raise NotImplementedError

    def row_permutation(self, dims: ConeDims) -> np.ndarray | None:
        """Rows of diffopt's standard form in the order the solver wants them (None: unchanged)."""
        return None

    @staticmethod
    def workers(batch: int, options: dict) -> int:
        """The threads :meth:`solve` runs for ``batch`` items with ``options`` (its ``n_jobs``)."""
        n_jobs = options.get("n_jobs")
        if n_jobs is None or n_jobs == 0:
            n_jobs = min(batch, _available_cores())
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
            raise ValueError(f"n_jobs must be a positive integer, received {n_jobs!r}")
        return int(min(n_jobs, max(batch, 1)))

    def one_thread_derivative(self, program: ConeProgram, options: dict) -> bool:
        """True for a small derivative (``B·(n + m)² <=`` :data:`ONE_THREAD_DERIVATIVE`) of a
        solve that ran on several threads: after a multi-threaded torch op, torch's idle OpenMP
        workers spin for ~8 ms, taking a core from the next forward's solver threads, while a
        small derivative gains little from them. In a training loop on 2 cores (forward,
        backward, repeat): the 10x10 nearest-correlation SDP at B = 16 18.5-18.7 -> 15.4-16.3 ms
        per step, the 30-asset portfolio SOCP at B = 64 23.5-24.8 -> 21.9-22.5 ms; larger ones
        (that SOCP at B = 256, 2.2M entries) lost more in the backward than the forward gained.
        """
        B = program.batch_size
        return (program.c.device.type == "cpu" and self.workers(B, options) > 1
                and B * (program.n + program.m) ** 2 <= ONE_THREAD_DERIVATIVE)

    def solve(self, program: ConeProgram, options: dict) -> Solution:
        B = program.batch_size
        n_jobs = self.workers(B, options)
        options = {k: v for k, v in options.items() if k != "n_jobs"}
        cores = _available_cores()
        # The sparse layouts are computed once per call; each item then only gathers its values.
        perm = self.row_permutation(program.dims)
        b = program.b.detach().cpu().double().numpy()
        pa, pp = program.A_pattern, program.P_pattern
        data = _Batch(
            c=program.c.detach().cpu().double().numpy(),
            b=b if perm is None else b[:, perm],
            A_values=program.A_values.detach().cpu().double().numpy(),
            P_values=None if program.P_values is None
            else program.P_values.detach().cpu().double().numpy(),
            A_layout=_CSCLayout(pa.rows if perm is None else np.argsort(perm)[pa.rows], pa.cols,
                                pa.shape),
            P_layout=None if pp is None else _CSCLayout(pp.rows, pp.cols, pp.shape,
                                                        keep=pp.rows <= pp.cols),
            dims=program.dims,
        )

        def solve_item(i: int) -> ItemResult:
            try:
                return self.solve_one(data.P(i), data.c[i], data.A(i), data.b[i], data.dims,
                                      options)
            except Exception as exc:  # one item's failure keeps the others' answers
                return ItemResult(None, None, None, Status.NUMERICAL_ERROR, error=exc)

        with sigint_kept():
            if n_jobs == 1:
                results = [solve_item(i) for i in range(B)]
            else:
                with _blas_limit(max(1, cores // n_jobs)), one_torch_thread():
                    results = parallel_map(solve_item, B, n_jobs)
        errors = {i: r.error for i, r in enumerate(results) if r.error is not None}
        if len(errors) == B:  # every item: a bad option or a broken solver, not the data
            raise errors[0]
        ref = program.c
        n, m = program.n, program.m

        unpermute = None if perm is None else np.argsort(perm)

        def stack(attr: str, size: int, rows: bool = False) -> torch.Tensor:
            out = np.full((B, size), np.nan)
            for i, r in enumerate(results):
                val = getattr(r, attr)
                # every answer the solver gave (a certificate for an infeasible item): the
                # layer verifies it and decides what is returned
                if val is not None:
                    out[i] = val if not rows or unpermute is None else val[unpermute]
            return torch.as_tensor(out, dtype=ref.dtype).to(ref.device)

        return Solution(
            x=stack("x", n), y=stack("y", m, rows=True), s=stack("s", m, rows=True),
            status=[r.status for r in results],
            iterations=[r.iterations for r in results],
            solve_time=[r.solve_time for r in results],
            errors={i: f"{type(e).__name__}: {e}" for i, e in errors.items()},
        )


class _CSCLayout:
    """A fixed sparsity pattern in CSC order: per item, ``matrix(values)`` only gathers values.

    ``keep`` selects the entries to use (e.g. the upper triangle of a symmetric ``P``).
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int],
                 keep: np.ndarray | None = None) -> None:
        idx = np.arange(rows.size) if keep is None else np.flatnonzero(keep)
        order = np.lexsort((rows[idx], cols[idx]))  # column-major, rows sorted within a column
        self.take = idx[order]
        self.indices = rows[self.take].astype(np.int32)
        counts = np.bincount(cols[self.take], minlength=shape[1])
        self.indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        self.shape = shape

    def matrix(self, values: np.ndarray) -> sp.csc_matrix:
        return sp.csc_matrix((values[self.take], self.indices, self.indptr), shape=self.shape)


@dataclass
class _Batch:
    """The NumPy/SciPy data of a batch, with the per-call sparse layouts; ``A(i)`` and ``P(i)``
    build item ``i``'s matrices."""

    c: np.ndarray
    b: np.ndarray
    A_values: np.ndarray
    P_values: np.ndarray | None
    A_layout: _CSCLayout
    P_layout: _CSCLayout | None
    dims: ConeDims

    def A(self, i: int) -> sp.csc_matrix:
        return self.A_layout.matrix(self.A_values[i])

    def P(self, i: int) -> sp.csc_matrix | None:
        if self.P_layout is None or self.P_values is None:
            return None
        return self.P_layout.matrix(self.P_values[i])


@torch.compiler.disable  # opaque to dynamo (a graph break, as any read of data is)
def plain(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, detached and outside any torch.func transform (the tensor underneath a
    grad/jvp/vmap wrapper, with every vmapped slice), for reads on the host: ``.numpy()`` and
    ``.tolist()`` need storage, which wrapped tensors do not have."""
    t = t.detach()
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t``'s values as a NumPy array on the host, also inside torch.func transforms (where
    ``.numpy()`` of even the unwrapped tensor needs the transforms disabled)."""
    with torch._C._DisableFuncTorch():
        return plain(t).cpu().numpy()


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads kept for the life of the process: starting threads on every
    batch cost ~1-2 ms each (a new thread waits for the GIL to signal that it runs)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="diffopt")


if hasattr(os, "register_at_fork"):  # a forked child has the pools but not their threads
    os.register_at_fork(after_in_child=_pool.cache_clear)

_in_worker = threading.local()
_SIGNAL_POLL = 0.1  # seconds between the caller's checks for signals while the pool works


def parallel_map(fn: Callable[[int], Any], count: int, n_jobs: int) -> list:
    """``[fn(0), ..., fn(count - 1)]`` computed on ``n_jobs`` threads of a persistent pool.

    Each thread takes the next undone index until none is left (items of uneven cost balance
    themselves), and one task per thread is queued, not one per item. Worth it where ``fn``
    releases the GIL for most of its time (Clarabel, SCS and ECOS solves; the torch kernels of
    the native solver's chunks). If ``fn`` raises, the threads take no further index and the
    first exception propagates once all have stopped. Called from inside a worker (nested), it
    runs serially, so a pool never waits on itself. An exception in the caller while it waits
    (Ctrl-C's KeyboardInterrupt) propagates at once and the workers stop after the items in
    hand; the pool's threads stay, idle, for the next call.

    Example:
        >>> from diffopt.solvers.base import parallel_map
        >>> parallel_map(lambda i: i * i, 5, n_jobs=2)
        [0, 1, 4, 9, 16]
    """
    if n_jobs <= 1 or count <= 1 or getattr(_in_worker, "active", False):
        return [fn(i) for i in range(count)]
    out: list = [None] * count
    indices = iter(range(count))
    lock = threading.Lock()
    failed = threading.Event()

    def work() -> None:
        _in_worker.active = True
        try:
            while not failed.is_set():
                with lock:
                    i = next(indices, None)
                if i is None:
                    return
                out[i] = fn(i)
        except BaseException:
            failed.set()
            raise
        finally:
            _in_worker.active = False

    workers = min(n_jobs, count)
    futures = []
    try:
        for _ in range(workers):
            futures.append(_pool(workers).submit(work))
        pending = set(futures)
        while pending:  # timed waits: a SIGINT that lands just before a wait is seen in 0.1 s
            pending = wait(pending, timeout=_SIGNAL_POLL).not_done
    except BaseException:  # KeyboardInterrupt in the caller: the workers take no further index
        failed.set()
        raise
    for future in futures:
        future.result()
    return out


@contextlib.contextmanager
def sigint_kept() -> Iterator[None]:
    """Re-install Python's SIGINT handler after the block, when run in the main thread.

    ECOS installs a Ctrl-C handler of its own for each solve; solves on several threads restore
    each other's, and Ctrl-C then no longer raised KeyboardInterrupt in the process.
    """
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if saved is not None:
            signal.signal(signal.SIGINT, saved)


@functools.cache
def _threadpools() -> Any:
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries, scanned once (a scan costs
    ~2.4 ms, which was paid on every batch), or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with SciPy
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def one_torch_thread(enabled: bool = True) -> Iterator[None]:
    """One torch intra-op thread within the block when ``enabled`` (restored afterwards).

    For work that torch's thread pool would only slow down: tiny batched kernels (the native
    solver on small problems), or per-item solves on a pool of threads of their own, next to
    which idle OpenMP workers still spin for cores (Clarabel on the 30-asset portfolio SOCP at
    B = 64: forward 25.7 -> 21.6 ms with 2 cores).

    Example:
        >>> import torch
        >>> from diffopt.solvers.base import one_torch_thread
        >>> before = torch.get_num_threads()
        >>> with one_torch_thread():
        ...     inside = torch.get_num_threads()
        >>> inside, torch.get_num_threads() == before
        (1, True)
    """
    threads = torch.get_num_threads()
    enabled = enabled and threads > 1
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(threads)


def lu_factor(J: torch.Tensor, out: tuple | None = None) -> tuple:
    """``torch.linalg.lu_factor_ex(J, out=out)``; a CPU batch of order 128 or more is factored
    on one intra-op thread.

    torch 2.13's batched CPU LU on two threads returned zero pivots for matrices of order 150
    and more (B = 32, N = 200: Intel MKL's "Parameter 6 was incorrect on entry to DLASWP", then
    ``lu_solve`` raised; N = 150 hung; orders up to 145 were exact), where one thread is exact.
    Smaller orders keep torch's threads (on one, the backward of the 10x10 SDP, N = 120, and of
    the 30-asset portfolio took 20-30 % longer), as do single matrices and the solves.

    Example:
        >>> import torch
        >>> from diffopt.solvers.base import lu_factor
        >>> LU, piv, info = lu_factor(torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
        >>> int(piv.min()), int(info.max())
        (1, 0)
    """
    with one_torch_thread(J.device.type == "cpu" and J.dim() > 2 and J.shape[-1] >= 128):
        return torch.linalg.lu_factor_ex(J, out=out)


def _blas_limit(n_threads: int):
    """Limit BLAS/OpenMP threads within a ``with`` block (no-op without threadpoolctl)."""
    pools = _threadpools()
    return contextlib.nullcontext() if pools is None else pools.limit(limits=n_threads)


def _available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
