"""Forward and backward time of the native interior-point backend on batched QP families.

Usage::

    python benchmarks/ipm_speed.py [--device cpu|cuda] [--dtype float64|float32] [--reps 5]

Each family ``(n, m_ineq, p_eq, B)`` is a batch of random strictly convex QPs with a known
primal-dual solution. "forward" is ``NativeIPM().solve``; "backward" is one adjoint solve with the
final factorization plus the data-gradient formulas (∇c, ∇b, ∇A, ∇P). Median of ``--reps`` runs,
in milliseconds, after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from diffopt.cones import ConeDims
from diffopt.solvers.base import ConeProgram, SparsePattern
from diffopt.solvers.ipm import NativeIPM

FAMILIES = [(10, 10, 2, 64), (50, 40, 5, 64), (100, 80, 10, 32), (100, 100, 0, 128)]


def family(n: int, l: int, p: int, B: int, device: str, dtype: torch.dtype) -> ConeProgram:
    g = torch.Generator().manual_seed(0)
    m = p + l
    A = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, n, generator=g, dtype=torch.float64)
    active = torch.rand(B, l, generator=g, dtype=torch.float64) < 0.5
    s0 = torch.zeros(B, m, dtype=torch.float64)
    s0[:, p:] = torch.where(active, 0.0, torch.rand(B, l, generator=g, dtype=torch.float64))
    y0 = torch.zeros(B, m, dtype=torch.float64)
    y0[:, :p] = torch.randn(B, p, generator=g, dtype=torch.float64)
    y0[:, p:] = torch.where(active, torch.rand(B, l, generator=g, dtype=torch.float64), 0.0)
    M = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    P = M @ M.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    b = torch.einsum("bmn,bn->bm", A, x0) + s0
    c = -torch.einsum("bmn,bm->bn", A, y0) - torch.einsum("bij,bj->bi", P, x0)
    rows, cols = np.nonzero(np.ones((m, n)))
    pr, pc = np.nonzero(np.ones((n, n)))

    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return ConeProgram(SparsePattern(pr, pc, (n, n)), to(P.reshape(B, -1)), to(c),
                       SparsePattern(rows, cols, (m, n)), to(A.reshape(B, -1)), to(b),
                       ConeDims(zero=p, nonneg=l))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(prog: ConeProgram, device: str, reps: int) -> tuple[float, float, int, int]:
    solver = NativeIPM()
    fwd, bwd = [], []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        sol = solver.solve(prog, {})
        sync(device)
        t1 = time.perf_counter()
        gx = torch.ones_like(sol.x)
        l1, l2 = sol.differentiator.adjoint(gx, torch.zeros_like(sol.y), torch.zeros_like(sol.s))
        grads = (l1, -l2, sol.y.unsqueeze(2) * l1.unsqueeze(1) + l2.unsqueeze(2) * sol.x.unsqueeze(1),
                 0.5 * (l1.unsqueeze(2) * sol.x.unsqueeze(1) + sol.x.unsqueeze(2) * l1.unsqueeze(1)))
        ok = torch.tensor([st.ok for st in sol.status], device=gx.device)
        assert all(torch.isfinite(g[ok]).all() for g in grads)
        sync(device)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    ok = sum(st.ok for st in sol.status)
    return (1e3 * statistics.median(fwd[1:]), 1e3 * statistics.median(bwd[1:]), ok,
            max(sol.iterations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}")
    print(f"{'n':>4} {'m':>4} {'p':>3} {'B':>4} {'fwd ms':>9} {'bwd ms':>8} {'ok':>4} {'iters':>5}")
    for n, l, p, B in FAMILIES:
        f, b, ok, it = run(family(n, l, p, B, args.device, dtype), args.device, args.reps)
        print(f"{n:>4} {l:>4} {p:>3} {B:>4} {f:9.2f} {b:8.2f} {ok:>4} {it:>5}")


if __name__ == "__main__":
    main()
