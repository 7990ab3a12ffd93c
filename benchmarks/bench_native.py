"""The native batched LP/QP path of diffopt against cvxpylayers (default) and Moreau.

Contenders, all in float64 with ``torch.set_num_threads(1)`` (``--threads`` sets another count):

* ``diffopt``     ``diffopt.CvxpyLayer`` with its default ``solver="auto"`` (the native batched
                  torch interior-point method for LPs/QPs);
* ``qplayer``     ``diffopt.QPLayer`` on the same problems in tensor form (P, q, G, h, A, b);
* ``cvxpylayers`` ``cvxpylayers.torch.CvxpyLayer`` with default settings (diffcp; its batch runs on
                  a thread pool of ``os.cpu_count()`` workers, diffcp's default);
* ``moreau``      ``cvxpylayers.torch.CvxpyLayer(..., solver="MOREAU")`` with default settings,
                  when ``moreau`` is installed (``pip install moreau``).

Per family: forward, backward and total time (median of ``--repeats`` interleaved runs after one
warm-up, see ``common.time_layers``), the ratio cvxpylayers / contender and diffopt / Moreau, the
backward/forward ratio, each contender's relative VJP error against an exact reference, its
solution error, and the worst constraint violation of its returned solutions (CVXPY's
``constraint.violation()`` with the item's parameters).

The reference is diffopt's ``CvxpyLayer(solver="clarabel")`` at ``tol=1e-12`` (or the tightest of
1e-11, 1e-10 that every item reaches), checked by directional central finite differences of
tight, independent CVXPY/Clarabel solves (``common.verify_reference``; printed as ``ref-check``).

Then the batch scaling of the (50, 40, 5) QP family (``--scaling-batches``, default 16 64 256
1024; the items of a smaller batch are the first items of the larger one): time per item, and
peak memory of one forward+backward measured in a fresh subprocess per (contender, batch):

* ``peak RSS``: the process's resident-set high-water mark (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before the call) minus the resident set just before the call,
  after a warm-up call at batch 1 so that one-time costs (lazy imports, caches) are not counted.
  It covers everything: torch tensors, NumPy/SciPy arrays, the C/C++/Rust solvers' own buffers,
  thread stacks; it is page-granular and includes allocator slack.
* ``py peak``: ``tracemalloc``'s peak over a second, separate call: Python objects and NumPy
  arrays only (torch's CPU allocator is invisible to tracemalloc), so it shows how much of the
  footprint lives in Python/NumPy-side data (cvxpylayers/diffcp keep per-item SciPy matrices).

Usage::

    python benchmarks/bench_native.py                              # everything, 5 repeats
    python benchmarks/bench_native.py --families qp10 optnet lat500 --repeats 3 --json out.json
    python benchmarks/bench_native.py --families scaling --scaling-batches 16 64 256
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# DIFFOPT_SRC: benchmark the diffopt package found under this folder instead of this checkout's
# (e.g. a `git archive` snapshot of a commit while the working tree is being edited).
sys.path.insert(0, os.environ.get("DIFFOPT_SRC") or str(HERE.parent))

import diffopt  # noqa: E402  (first, so that bench_layers' own import reuses it)
from bench_layers import machine  # noqa: E402
from common import (  # noqa: E402
    DTYPE, Family, dense_qp, flat_grads, grid_shortest_path, max_violation, rel_err, run_once,
    time_layers, verify_reference,
)

try:
    from cvxpylayers.torch import CvxpyLayer as CPLayer
except ImportError:  # pragma: no cover - optional comparison
    CPLayer = None
try:
    import moreau  # noqa: F401
    HAVE_MOREAU = CPLayer is not None
except ImportError:  # pragma: no cover - optional comparison
    HAVE_MOREAU = False

THREADS = 1
REF_TOLS = (1e-12, 1e-11, 1e-10)

#: key -> (constructor, kind); kind "batched" families carry the targets, "latency" ones are
#: batch-1 latency (reported, no speed target).
FAMILIES = {
    "qp10": (lambda: dense_qp(10, 10, 2, 64), "batched"),
    "qp50": (lambda: dense_qp(50, 40, 5, 64), "batched"),
    "qp100": (lambda: dense_qp(100, 80, 10, 32), "batched"),
    "path": (lambda: grid_shortest_path(5, 64), "batched"),
    "optnet": (lambda: dense_qp(100, 100, 0, 128), "batched"),
    "lat10": (lambda: dense_qp(10, 5, 0, 1), "latency"),
    "lat50": (lambda: dense_qp(50, 10, 0, 1), "latency"),
    "lat100": (lambda: dense_qp(100, 20, 0, 1), "latency"),
    "lat500": (lambda: dense_qp(500, 100, 0, 1), "latency"),
}
SCALING_FAMILY = (50, 40, 5)  # dense_qp(n, m, p, B)

# targets of issue 3
TARGET_SPEEDUP = 20.0
TARGET_GRAD_ERR = 1e-6
TARGET_BWD_FWD = 0.25
SCALING_NOISE = 1.10  # a step of the per-item cost may rise by at most 10 % (timing noise)


class QPForm(torch.nn.Module):
    """``diffopt.QPLayer`` called on a family's tensor form (same inputs as the CVXPY layers)."""

    def __init__(self, fam: Family):
        super().__init__()
        self.qp_form = fam.qp_form
        self.layer = diffopt.QPLayer()

    def forward(self, *params):
        return (self.layer(**self.qp_form(*params)),)


def make_layer(name: str, fam: Family):
    kw = dict(parameters=fam.parameters, variables=fam.variables)
    if name == "diffopt":
        return diffopt.CvxpyLayer(fam.problem, **kw)
    if name == "qplayer":
        return QPForm(fam)
    if name == "cvxpylayers":
        return CPLayer(fam.problem, **kw)
    if name == "moreau":
        return CPLayer(fam.problem, solver="MOREAU", **kw)
    raise ValueError(name)


def contenders(fam: Family) -> list[str]:
    names = ["diffopt"]
    if fam.qp_form is not None:
        names.append("qplayer")
    if CPLayer is not None:
        names.append("cvxpylayers")
    if HAVE_MOREAU:
        names.append("moreau")
    return names


#: reference candidates, in order: diffopt's Clarabel backend, then its native IPM (the first one
#: that passes the finite-difference check is used; on the degenerate shortest-path LP the
#: Clarabel-backed derivative fails it, see the README).
REF_SOLVERS = ("clarabel", "auto")
REF_CHECK_MAX = 1e-5


def reference(fam: Family, upstream, solver: str):
    layer = diffopt.CvxpyLayer(fam.problem, parameters=fam.parameters, variables=fam.variables,
                               solver=solver)
    for tol in REF_TOLS:
        try:
            _, _, out, grads = run_once(layer, fam, upstream, dict(solver_args={"tol": tol}))
            return tol, out, grads
        except diffopt.SolverError:
            if tol == REF_TOLS[-1]:
                raise


def choose_reference(fam: Family, upstream, verify: bool, res: dict):
    """The exact reference VJP: the first of ``REF_SOLVERS`` whose VJP agrees with central finite
    differences to ``REF_CHECK_MAX`` (without ``verify``: the first, unchecked)."""
    best = None
    for solver in REF_SOLVERS:
        tol, out, grads = reference(fam, upstream, solver)
        if not verify:
            best = (None, solver, tol, out, grads)
            break
        t0 = time.perf_counter()
        err = verify_reference(fam, upstream, grads, items=tuple(range(min(2, fam.batch))))
        res.setdefault("ref_checks", {})[solver] = err
        res["ref_check_s"] = res.get("ref_check_s", 0.0) + time.perf_counter() - t0
        if best is None or err < best[0]:
            best = (err, solver, tol, out, grads)
        if err <= REF_CHECK_MAX:
            break
    err, solver, tol, out, grads = best
    res.update(ref_solver=solver, ref_tol=tol)
    if err is not None:
        res["ref_check_err"] = err
    return out, grads


def bench_family(key: str, repeats: int, verify: bool) -> dict:
    ctor, kind = FAMILIES[key]
    fam = ctor()
    gen = torch.Generator().manual_seed(1234)
    upstream = [torch.randn(fam.batch, *v.shape, dtype=DTYPE, generator=gen)
                for v in fam.variables]
    res: dict = dict(family=key, kind=kind, name=fam.name, description=fam.description,
                     batch=fam.batch)
    ref_out, ref_grads = choose_reference(fam, upstream, verify, res)
    ref = flat_grads(ref_grads)
    res["ref_violation"] = max_violation(fam, ref_out)

    runs = {}
    for name in contenders(fam):
        t0 = time.perf_counter()
        runs[name] = (make_layer(name, fam), {})
        res[f"{name}_setup_s"] = time.perf_counter() - t0
    timed = time_layers(runs, fam, upstream, repeats)
    for name, (times, outs, grads) in timed.items():
        d = dict(**times, grad_err=rel_err(flat_grads(grads), ref),
                 sol_err=rel_err(flat_grads(outs), flat_grads(ref_out)),
                 violation=max_violation(fam, outs))
        d["bwd_over_fwd"] = d["backward"] / d["forward"]
        if "cvxpylayers" in runs:
            d["speedup_vs_cvxpylayers"] = timed["cvxpylayers"][0]["total"] / d["total"]
        if "moreau" in runs:
            d["speedup_vs_moreau"] = timed["moreau"][0]["total"] / d["total"]
        res[name] = d
    info = runs["diffopt"][0].info
    if info is not None:
        res["diffopt"]["iterations_max"] = int(max(info.iterations))
        res["diffopt"]["degenerate_items"] = int(sum(info.degenerate)) if info.degenerate else 0
    return res


# -- batch scaling: time per item, and peak memory in fresh subprocesses -------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(name: str, B: int) -> dict:
    """Runs in a fresh subprocess: peak memory of one forward+backward of ``name`` at batch B."""
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    n, m, p = SCALING_FAMILY
    fam = dense_qp(n, m, p, B)
    layer = make_layer(name, fam)
    one = dataclasses.replace(fam, values=[v[:1] for v in fam.values])
    run_once(layer, one, [torch.ones(1, n, dtype=DTYPE)], {})  # warm-up at batch 1
    upstream = [torch.ones(B, n, dtype=DTYPE)]
    gc.collect()
    rss0 = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    run_once(layer, fam, upstream, {})
    t = time.perf_counter() - t0
    hwm = _status_kib("VmHWM")
    gc.collect()
    tracemalloc.start()
    run_once(layer, fam, upstream, {})
    py_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return dict(contender=name, batch=B, rss_before_mib=rss0 / 1024,
                peak_rss_delta_mib=(hwm - rss0) / 1024, py_peak_mib=py_peak / 2**20, time_s=t)


def measure_memory(name: str, B: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name, str(B),
           "--threads", str(THREADS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return dict(contender=name, batch=B, error=proc.stderr.strip().splitlines()[-1:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_scaling(batches: list[int], repeats: int, memory: bool) -> dict:
    n, m, p = SCALING_FAMILY
    big = dense_qp(n, m, p, max(batches))
    names = contenders(big)
    res: dict = dict(family=f"qp_n{n}_m{m}_p{p}", batches=batches, time={}, memory=[])
    for B in batches:
        fam = dataclasses.replace(big, values=[v[:B] for v in big.values])
        upstream = [torch.ones(B, n, dtype=DTYPE)]
        runs = {name: (make_layer(name, fam), {}) for name in names}
        timed = time_layers(runs, fam, upstream, repeats)
        res["time"][B] = {name: dict(**t, per_item_ms=1e3 * t["total"] / B)
                          for name, (t, _, _) in timed.items()}
        print(f"   B={B:5d}  " + "  ".join(f"{name} {res['time'][B][name]['per_item_ms']:.3f}"
                                           for name in names) + "  (ms/item)", flush=True)
    res["per_item_falling"] = {}
    for name in names:
        seq = [res["time"][B][name]["per_item_ms"] for B in batches]
        ok = seq[-1] < seq[0] and all(b <= SCALING_NOISE * a for a, b in zip(seq, seq[1:]))
        res["per_item_falling"][name] = ok
    if memory:
        for B in batches:
            for name in names:
                r = measure_memory(name, B)
                res["memory"].append(r)
                if "error" in r:
                    print(f"   memory {name} B={B}: failed {r['error']}", flush=True)
                else:
                    print(f"   memory {name:12s} B={B:5d}: peak RSS +{r['peak_rss_delta_mib']:8.1f}"
                          f" MiB, py peak {r['py_peak_mib']:8.1f} MiB", flush=True)
    return res


# -- printing -------------------------------------------------------------------------------------

def ms(s: float) -> str:
    return f"{1e3 * s:9.2f}"


def mark(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def print_family(r: dict) -> None:
    print(f"\n== {r['family']} ({r['name']}): {r['description']}, batch {r['batch']}")
    if "ref_check_err" in r:
        checks = ", ".join(f"{k} {v:.1e}" for k, v in r["ref_checks"].items())
        print(f"   reference: diffopt solver={r['ref_solver']} tol={r['ref_tol']:g}; ref-check vs "
              f"central FD of tight Clarabel solves: {checks} ({r['ref_check_s']:.1f} s); "
              f"its violation {r['ref_violation']:.1e}")
        if r["ref_check_err"] > REF_CHECK_MAX:
            print(f"   WARNING: no reference passed the FD check ({REF_CHECK_MAX:g})")
    print(f"   {'':12s} {'fwd ms':>9s} {'bwd ms':>9s} {'total ms':>9s} {'x cvxpyl':>8s} "
          f"{'bwd/fwd':>7s} {'grad err':>8s} {'sol err':>8s} {'max viol':>8s}")
    for name in ("diffopt", "qplayer", "cvxpylayers", "moreau"):
        if name not in r:
            continue
        d = r[name]
        sp = d.get("speedup_vs_cvxpylayers")
        print(f"   {name:12s} {ms(d['forward'])} {ms(d['backward'])} {ms(d['total'])} "
              f"{(f'{sp:8.1f}' if sp else '       -')} {d['bwd_over_fwd']:7.2f} "
              f"{d['grad_err']:8.1e} {d['sol_err']:8.1e} {d['violation']:8.1e}")
    if r["diffopt"].get("degenerate_items"):
        print(f"   note: diffopt flagged {r['diffopt']['degenerate_items']}/{r['batch']} items "
              "degenerate (least-squares gradient)")


def print_summary(results: list[dict], scaling: dict | None) -> None:
    print(f"\nSummary (torch threads = {THREADS}; median total fwd+bwd ms; targets: "
          f">= {TARGET_SPEEDUP:g}x vs cvxpylayers, faster than Moreau, grad err <= "
          f"{TARGET_GRAD_ERR:g}, bwd <= {TARGET_BWD_FWD:g} fwd; latency rows carry no target)")
    head = (f"{'family':8s} {'layer':8s} {'total':>8s} {'cvxpyl':>8s} {'moreau':>8s} "
            f"{'x cpl':>6s} {'':4s} {'x mor':>6s} {'':4s} {'grad err':>8s} {'':4s} "
            f"{'bwd/fwd':>7s} {'':4s} {'mor gerr':>8s} {'mor viol':>8s}")
    print(head)
    print("-" * len(head))
    for r in results:
        cpl, mor = r.get("cvxpylayers"), r.get("moreau")
        target = r["kind"] == "batched"
        for name in ("diffopt", "qplayer"):
            if name not in r:
                continue
            d = r[name]
            sc, sm = d.get("speedup_vs_cvxpylayers"), d.get("speedup_vs_moreau")
            row = f"{r['family']:8s} {name:8s} {ms(d['total'])[1:]} "
            row += (ms(cpl["total"])[1:] if cpl else f"{'-':>8s}") + " "
            row += (ms(mor["total"])[1:] if mor else f"{'-':>8s}") + " "
            row += (f"{sc:6.1f} {mark(sc >= TARGET_SPEEDUP if target else None):4s} " if sc
                    else f"{'-':>6s} {'-':4s} ")
            row += (f"{sm:6.2f} {mark(sm > 1.0 if target else None):4s} " if sm
                    else f"{'-':>6s} {'-':4s} ")
            row += f"{d['grad_err']:8.1e} {mark(d['grad_err'] <= TARGET_GRAD_ERR):4s} "
            bwd_ok = d["bwd_over_fwd"] <= TARGET_BWD_FWD if target else None
            row += f"{d['bwd_over_fwd']:7.2f} {mark(bwd_ok):4s} "
            row += (f"{mor['grad_err']:8.1e} {mor['violation']:8.1e}" if mor else "")
            print(row)
    if scaling:
        bs = scaling["batches"]
        print(f"\nCost per item (ms) vs batch, {scaling['family']}; target: falling "
              f"(each step <= {SCALING_NOISE:.2f}x the previous, last < first)")
        print(f"{'layer':12s} " + " ".join(f"{'B=' + str(B):>9s}" for B in bs) + "  falling")
        for name, ok in scaling["per_item_falling"].items():
            print(f"{name:12s} " + " ".join(f"{scaling['time'][B][name]['per_item_ms']:9.3f}"
                                            for B in bs)
                  + f"  {mark(ok) if name in ('diffopt', 'qplayer') else ('yes' if ok else 'no')}")
        if scaling["memory"]:
            print("\nPeak memory of one forward+backward (MiB; fresh subprocess per cell): "
                  "peak RSS above the pre-call RSS / tracemalloc peak (Python + NumPy only)")
            names = list(scaling["per_item_falling"])
            print(f"{'layer':12s} " + " ".join(f"{'B=' + str(B):>15s}" for B in bs))
            for name in names:
                cells = []
                for B in bs:
                    r = next((x for x in scaling["memory"]
                              if x["contender"] == name and x["batch"] == B), None)
                    cells.append(f"{'failed':>15s}" if r is None or "error" in r else
                                 f"{r['peak_rss_delta_mib']:7.1f}/{r['py_peak_mib']:7.1f}")
                print(f"{name:12s} " + " ".join(cells))


def main(argv=None) -> int:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choices = list(FAMILIES) + ["scaling"]
    ap.add_argument("--families", nargs="+", choices=choices, default=choices,
                    help="families to run; 'scaling' is the batch-scaling/memory study "
                         "(default: all)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per layer (median)")
    ap.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the finite-difference check of the reference VJP")
    ap.add_argument("--scaling-batches", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--scaling-repeats", type=int, default=None,
                    help="timed repeats of the scaling study (default: --repeats)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch.set_num_threads for every library (default 1; diffopt solves "
                         "several chunks of large problems on that many threads)")
    ap.add_argument("--memory-child", nargs=2, metavar=("LAYER", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    THREADS = args.threads

    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]))))
        return 0

    torch.set_num_threads(THREADS)
    mach = machine()
    mach["diffopt_path"] = str(Path(diffopt.__file__).resolve().parent)
    try:
        mach["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                          capture_output=True, text=True).stdout.strip()
        mach["git_dirty_diffopt"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--", "diffopt"], cwd=HERE.parent,
            capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    print("machine: " + ", ".join(f"{k}={v}" for k, v in mach.items()))
    print(f"torch.set_num_threads({THREADS}) for every library; cvxpylayers/diffcp keeps its "
          f"default thread pool (os.cpu_count()={os.cpu_count()} workers); float64")
    if CPLayer is None:
        print("cvxpylayers is not installed: no cvxpylayers or Moreau columns")
    elif not HAVE_MOREAU:
        print("moreau is not installed (pip install moreau): no Moreau column")
    results, scaling = [], None
    for key in args.families:
        if key == "scaling":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffopt's DegenerateWarning, Moreau's chatter
            r = bench_family(key, args.repeats, not args.no_verify)
        print_family(r)
        sys.stdout.flush()
        results.append(r)
    if "scaling" in args.families:
        print(f"\n== scaling: dense QP {SCALING_FAMILY}, batches {args.scaling_batches}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scaling = bench_scaling(args.scaling_batches, args.scaling_repeats or args.repeats,
                                    not args.no_memory)
    print_summary(results, scaling)
    if args.json:
        Path(args.json).write_text(json.dumps(
            dict(machine=mach, threads=THREADS, repeats=args.repeats, results=results,
                 scaling=scaling, date=time.strftime("%Y-%m-%d %H:%M %Z")), indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
