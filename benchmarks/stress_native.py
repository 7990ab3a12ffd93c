"""Robustness of the native solver on degenerate, infeasible and unbounded families vs Clarabel.

Each family draws batches of small LPs/QPs whose data make trouble likely (integer costs with
ties, costs tied to 1e-7, dependent rows, a zero quadratic term, infeasible or unbounded
instances) and solves every batch with ``QPLayer(solver="native")`` and with Clarabel. It prints,
per family, the status counts of both, the items where they disagree, the largest iteration
count, and for items both solved the largest objective difference. The families and their
history are in the native solver's comments (``diffopt/solvers/ipm.py``: ``_WEAK_PIVOT``,
``_WEAK_REG``, the dual form's conditioning test).

    python benchmarks/stress_native.py                 # 10 batches per family, about a minute
    python benchmarks/stress_native.py --batches 3 --families lp-ties infeasible-caps
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from common import grid_incidence

from diffopt import QPLayer

FAMILIES = ("path-ties", "path-near-ties", "path-all-rows", "lp-ties", "lp-ties-zero-P",
            "qp-singular", "box-diagonal-ties", "dual-duplicate-rows", "infeasible-caps",
            "infeasible-contradictory", "unbounded-half-free")
F64 = torch.float64


def draw(family: str, g: torch.Generator, B: int = 32) -> tuple:
    """``(P, q, G, h, A, b)`` of one batch of ``family`` (``P``, ``G``/``h``, ``A``/``b`` may be
    None)."""
    eye = torch.eye
    if family.startswith("path"):
        inc, supply = (torch.as_tensor(t) for t in grid_incidence())
        n = inc.shape[1]
        A, b = (inc, supply) if family == "path-all-rows" else (inc[:-1], supply[:-1])
        G, h = -eye(n, dtype=F64), torch.zeros(n, dtype=F64)
        if family != "path-all-rows":
            G, h = torch.cat([G, eye(n, dtype=F64)]), torch.cat([h, torch.ones(n, dtype=F64)])
        q = (1.0 + 1e-7 * torch.randn(B, n, generator=g, dtype=F64) if family == "path-near-ties"
             else torch.randint(0, 3, (B, n), generator=g).to(F64))
        return None, q, G, h, A, b
    n = 12
    if family in ("lp-ties", "lp-ties-zero-P"):
        G = torch.cat([-eye(n, dtype=F64).expand(B, n, n),
                       torch.randint(0, 2, (B, 4, n), generator=g).to(F64)], 1)
        h = torch.cat([torch.zeros(B, n), 3 * torch.ones(B, 4)], 1).to(F64)
        q = -torch.randint(0, 2, (B, n), generator=g).to(F64)
        P = torch.zeros(B, n, n, dtype=F64) if family == "lp-ties-zero-P" else None
        return P, q, G, h, torch.ones(B, 1, n, dtype=F64), 2 * torch.ones(B, 1, dtype=F64)
    box = torch.cat([-eye(n, dtype=F64), eye(n, dtype=F64)])
    unit_box = torch.cat([torch.zeros(n, dtype=F64), torch.ones(n, dtype=F64)])
    if family == "qp-singular":
        M = torch.randint(-1, 2, (B, 3, n), generator=g).to(F64)
        q = torch.randint(-1, 2, (B, n), generator=g).to(F64)
        return M.mT @ M, q, box, unit_box, torch.ones(1, n, dtype=F64), \
            torch.full((1,), 2.0, dtype=F64)
    if family == "box-diagonal-ties":
        d = torch.randint(0, 2, (B, n), generator=g).to(F64)
        q = torch.randint(-1, 2, (B, n), generator=g).to(F64) * (1 - d)
        return torch.diag_embed(d), q, box, unit_box, torch.ones(1, n, dtype=F64), \
            torch.full((1,), 2.0, dtype=F64)
    if family == "dual-duplicate-rows":
        G0 = torch.randint(-1, 2, (B, 8, n), generator=g).to(F64)
        q = torch.randint(-2, 3, (B, n), generator=g).to(F64)
        return eye(n, dtype=F64), q, torch.cat([G0, G0], 1), torch.zeros(B, 16, dtype=F64), \
            None, None
    if family == "infeasible-caps":  # 1ᵀx = 5 against three group caps summing to 3, x ≥ 0
        G = torch.cat([-eye(n, dtype=F64), torch.zeros(3, n, dtype=F64)])
        for k, cols in enumerate((slice(0, 4), slice(4, 8), slice(8, n))):
            G[n + k, cols] = 1.0
        h = torch.cat([torch.zeros(n), torch.ones(3)]).to(F64)
        q = torch.randn(B, n, generator=g, dtype=F64)
        return None, q, G, h, torch.ones(1, n, dtype=F64), torch.full((1,), 5.0, dtype=F64)
    if family == "infeasible-contradictory":  # a x <= -1 and -a x <= -1
        G = torch.randn(B, 12, 8, generator=g, dtype=F64)
        G[:, 1] = -G[:, 0]
        h = torch.rand(B, 12, generator=g, dtype=F64) + 0.5
        h[:, :2] = -1.0
        return None, torch.randn(B, 8, generator=g, dtype=F64), G, h, None, None
    if family == "unbounded-half-free":  # x ≥ 0 on half the coordinates, 1ᵀx = 1
        G = -eye(n, dtype=F64)[: n // 2]
        q = torch.randint(-1, 2, (B, n), generator=g).to(F64)
        return None, q, G, torch.zeros(n // 2, dtype=F64), torch.ones(1, n, dtype=F64), \
            torch.ones(1, dtype=F64)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _objective(P, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """½xᵀPx + qᵀx per item (``q`` batched, ``P`` None, shared or batched)."""
    value = (q * x).sum(-1)
    if P is not None:
        value = value + 0.5 * torch.einsum("bi,bij,bj->b", x, P.expand(x.shape[0], -1, -1), x)
    return value


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))


def run(family: str, batches: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    native, clarabel = collections.Counter(), collections.Counter()
    disagree, max_iters, obj_diff = 0, 0, 0.0
    for _ in range(batches):
        P, q, G, h, A, b = draw(family, g)
        outs = {}
        for name in ("native", "clarabel"):
            layer = QPLayer(solver=name, solver_args={"on_failure": "nan"})
            with torch.no_grad():
                x = layer(P, q, G, h, A, b)
            outs[name] = (x, [st.name for st in layer.info.status])
            if name == "native":
                max_iters = max(max_iters, max(layer.info.iterations))
        (xn, sn), (xc, sc) = outs["native"], outs["clarabel"]
        native.update(sn)
        clarabel.update(sc)
        disagree += sum(a != c for a, c in zip(sn, sc))
        both = [i for i, (a, c) in enumerate(zip(sn, sc)) if a == c == "OPTIMAL"]
        if both:
            diff = (_objective(P, q, xn) - _objective(P, q, xc))[both].abs().max()
            obj_diff = max(obj_diff, float(diff))
    return {"native": dict(native), "clarabel": dict(clarabel), "disagree": disagree,
            "max_iters": max_iters, "obj_diff": obj_diff}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--batches", type=int, default=10, help="batches of 32 per family")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    print(f"{'family':26s} {'native statuses':40s} {'clarabel statuses':34s} "
          f"{'disagree':>8s} {'max it':>6s} {'obj diff':>9s}")
    for family in args.families:
        start = time.perf_counter()
        r = results[family] = run(family, args.batches, args.seed)
        print(f"{family:26s} {_counts(r['native']):40s} {_counts(r['clarabel']):34s} "
              f"{r['disagree']:8d} {r['max_iters']:6d} {r['obj_diff']:9.1e}"
              f"  ({time.perf_counter() - start:.1f} s)")
    return results


if __name__ == "__main__":
    main()
