"""diffopt vs cvxpylayers (default settings), in one run, on batched problem families.

For each family: forward, backward and total time of each library (median of ``--repeats`` runs
after one warm-up), the ratios cvxpylayers / diffopt, and each library's relative error on a
random VJP against a reference. The reference is diffopt's own VJP at ``tol=1e-12``, itself
checked by directional central finite differences of tight, independent CVXPY/Clarabel solves on
two items (printed as ``ref-check``), so the reference does not rest on diffopt's word alone.

Usage::

    python benchmarks/bench_layers.py                      # every family, 3 repeats
    python benchmarks/bench_layers.py --families qp10 sdp --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    DTYPE, FAMILIES, flat_grads, rel_err, run_once, time_layers, verify_reference,
)

import diffopt  # noqa: E402

try:
    from cvxpylayers.torch import CvxpyLayer as CPLayer
except ImportError:  # pragma: no cover - optional comparison
    CPLayer = None

REF_TOLS = (1e-12, 1e-11, 1e-10)  # the reference uses the tightest one every item reaches


def machine() -> dict:
    import cvxpy
    info = dict(
        python=platform.python_version(), platform=platform.platform(),
        processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        torch=torch.__version__, torch_threads=torch.get_num_threads(), cvxpy=cvxpy.__version__,
        diffopt=getattr(diffopt, "__version__", "?"),
    )
    try:
        import cvxpylayers
        info["cvxpylayers"] = getattr(cvxpylayers, "__version__", "?")
    except ImportError:
        info["cvxpylayers"] = None
    try:
        info["affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info


def bench_family(key: str, repeats: int, verify: bool, fd_eps: float) -> dict:
    fam = FAMILIES[key]()
    gen = torch.Generator().manual_seed(1234)
    res: dict = dict(family=key, name=fam.name, description=fam.description, batch=fam.batch)

    t0 = time.perf_counter()
    ours = diffopt.CvxpyLayer(fam.problem, parameters=fam.parameters, variables=fam.variables)
    res["diffopt_setup_s"] = time.perf_counter() - t0
    # upstream gradient for the VJP, one per output, shaped like the (batched) output
    outs = ours(*fam.tensors(requires_grad=False))
    upstream = [torch.randn(o.shape, dtype=DTYPE, generator=gen) for o in outs]

    # reference VJP: diffopt at a tight tolerance, checked by finite differences
    for tol in REF_TOLS:
        try:
            _, _, ref_out, ref_grads = run_once(ours, fam, upstream, dict(solver_args={"tol": tol}))
            break
        except diffopt.SolverError:
            if tol == REF_TOLS[-1]:
                raise
    res["ref_tol"] = tol
    ref = flat_grads(ref_grads)
    if verify:
        t0 = time.perf_counter()
        res["ref_check_err"] = verify_reference(fam, upstream, ref_grads, eps=fd_eps)
        res["ref_check_s"] = time.perf_counter() - t0

    runs = {"diffopt": (ours, {})}
    if CPLayer is not None:
        t0 = time.perf_counter()
        theirs = CPLayer(fam.problem, parameters=fam.parameters, variables=fam.variables)
        res["cvxpylayers_setup_s"] = time.perf_counter() - t0
        runs["cvxpylayers"] = (theirs, {})  # default settings: no solver_args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffopt's DegenerateWarning, cvxpylayers' chatter
        timed = time_layers(runs, fam, upstream, repeats)
    for name, (times, outs, grads) in timed.items():
        res[name] = dict(**times, grad_err=rel_err(flat_grads(grads), ref),
                         sol_err=rel_err(flat_grads(outs), flat_grads(ref_out)))
    res["diffopt"]["iterations"] = list(ours.info.iterations) if ours.info else None
    res["diffopt"]["degenerate_items"] = (sum(ours.info.degenerate)
                                          if ours.info and ours.info.degenerate else 0)
    if "cvxpylayers" in res:
        for k in ("forward", "backward", "total"):
            res[f"ratio_{k}"] = res["cvxpylayers"][k] / res["diffopt"][k]
    return res


def fmt_ms(s: float) -> str:
    return f"{1e3 * s:9.1f}"


def print_family(r: dict) -> None:
    print(f"\n== {r['name']}: {r['description']}, batch {r['batch']}")
    if "ref_check_err" in r:
        print(f"   ref-check (diffopt tol={r['ref_tol']:g} VJP vs central FD of tight Clarabel "
              f"solves, 2 items): rel err {r['ref_check_err']:.2e}  ({r['ref_check_s']:.1f} s)")
    print(f"   {'':12s} {'fwd ms':>9s} {'bwd ms':>9s} {'total ms':>9s} {'grad err':>9s}")
    for lib in ("diffopt", "cvxpylayers"):
        if lib in r:
            d = r[lib]
            print(f"   {lib:12s} {fmt_ms(d['forward'])} {fmt_ms(d['backward'])} "
                  f"{fmt_ms(d['total'])} {d['grad_err']:9.1e}")
    if r["diffopt"].get("degenerate_items"):
        print(f"   note: diffopt flagged {r['diffopt']['degenerate_items']}/{r['batch']} items "
              "degenerate (singular KKT: least-squares gradient)")
    if "ratio_total" in r:
        print(f"   {'ratio cp/do':12s} {r['ratio_forward']:9.2f} {r['ratio_backward']:9.2f} "
              f"{r['ratio_total']:9.2f}")


def print_summary(results: list[dict]) -> None:
    print("\nSummary (times: median ms, forward+backward; ratio = cvxpylayers / diffopt)")
    head = (f"{'family':26s} {'diffopt':>9s} {'cvxpyl.':>9s} {'fwd x':>6s} {'bwd x':>6s} "
            f"{'total x':>7s} {'err do':>8s} {'err cpl':>8s} {'ref-chk':>8s}")
    print(head)
    print("-" * len(head))
    for r in results:
        do, cpl = r["diffopt"], r.get("cvxpylayers")
        row = f"{r['name']:26s} {fmt_ms(do['total'])} "
        row += fmt_ms(cpl["total"]) if cpl else f"{'-':>9s}"
        if cpl:
            row += (f" {r['ratio_forward']:6.2f} {r['ratio_backward']:6.2f} "
                    f"{r['ratio_total']:7.2f}")
        else:
            row += f" {'-':>6s} {'-':>6s} {'-':>7s}"
        row += f" {do['grad_err']:8.1e} " + (f"{cpl['grad_err']:8.1e}" if cpl else f"{'-':>8s}")
        row += f" {r['ref_check_err']:8.1e}" if "ref_check_err" in r else f" {'-':>8s}"
        print(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                    help="which families to run (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per library (median)")
    ap.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the finite-difference check of the reference VJP")
    ap.add_argument("--fd-eps", type=float, default=None,
                    help="relative finite-difference step (default: per family, 1e-3; SDP 1e-2)")
    args = ap.parse_args(argv)

    mach = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in mach.items()))
    if CPLayer is None:
        print("cvxpylayers is not installed: timing diffopt only")
    results = []
    for key in args.families:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported per family instead (degenerate items)
            r = bench_family(key, args.repeats, not args.no_verify, args.fd_eps)
        print_family(r)
        sys.stdout.flush()
        results.append(r)
    print_summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=mach, repeats=args.repeats,
                                                   results=results), indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
