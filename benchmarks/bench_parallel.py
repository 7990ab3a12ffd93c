"""Parallel per-item solves: serial vs a pool of two threads (issue 6, item 3).

Times the forward pass of ``diffopt.CvxpyLayer`` with a per-item backend (the solve is where the
workers act) under ``solver_args`` ``{"n_jobs": 1}`` and ``{"n_jobs": 2}``, on:

- ``socp``: 100-asset SOCP portfolio, B=64 (Clarabel)
- ``sdp``: 20x20 nearest-correlation SDP, B=16 (Clarabel)
- ``qp``: dense QP n=50, 40 inequalities, 5 equalities, B=64 (Clarabel)
- ``socp-scs``, ``socp-ecos``: the SOCP with SCS (tol 1e-6) and ECOS, for the GIL check

Median of ``--repeats`` interleaved rounds (each round runs every mode once) after one warm-up
round. Each timed
call also records the share of the machine's CPU that *other* processes used meanwhile (from
``/proc/stat``): on a shared machine a speed-up near 1 with a large share means "no free core",
not "no parallelism".

    python benchmarks/bench_parallel.py
    python benchmarks/bench_parallel.py --families socp sdp --repeats 5 --json parallel.json
    python benchmarks/bench_parallel.py --quiet-wait 60   # shared machine: wait for idle CPUs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, os.environ.get("DIFFOPT_SRC", str(Path(__file__).resolve().parents[1])))

import diffopt  # noqa: E402
from common import dense_qp, nearest_correlation, portfolio  # noqa: E402

FAMILIES = {
    "socp": (lambda: portfolio(100, 64), "clarabel", {}),
    "sdp": (lambda: nearest_correlation(20, 16), "clarabel", {}),
    "qp": (lambda: dense_qp(50, 40, 5, 64), "clarabel", {}),
    "socp-scs": (lambda: portfolio(100, 64), "scs", {"tol": 1e-6}),
    "socp-ecos": (lambda: portfolio(100, 64), "ecos", {}),
}
MODES = {
    "serial": {"n_jobs": 1},
    "threads2": {"n_jobs": 2},
}


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat (Linux), else None."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


def _own_jiffies() -> int:
    """CPU jiffies used by this process (all its threads)."""
    try:
        fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def timed_call(fn) -> tuple[float, float | None]:
    """Wall time of ``fn()`` and the share of the machine's CPU used by *other* processes meanwhile
    (0 = quiet machine; 0.5 = one of two cores busy elsewhere)."""
    m0, o0 = _busy_jiffies(), _own_jiffies()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    m1, o1 = _busy_jiffies(), _own_jiffies()
    if m0 is None or m1 is None or m1[1] <= m0[1]:
        return dt, None
    foreign = (m1[0] - m0[0]) - (o1 - o0)
    return dt, max(0.0, foreign / (m1[1] - m0[1]))


def wait_for_quiet(limit_s: float, threshold: float = 0.1) -> float | None:
    """Wait (up to ``limit_s``) until other processes use < ``threshold`` of the CPUs over 0.5 s;
    returns the last share measured (None where /proc/stat is unavailable)."""
    deadline = time.monotonic() + limit_s
    while True:
        a = _busy_jiffies()
        time.sleep(0.5)
        b = _busy_jiffies()
        if a is None or b is None or b[1] <= a[1]:
            return None
        share = (b[0] - a[0]) / (b[1] - a[1])
        if share < threshold or time.monotonic() >= deadline:
            return share


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "load_avg_start": list(os.getloadavg()),
    }
    for mod in ("clarabel", "scs", "ecos", "threadpoolctl"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                    help="before each round, wait up to this long for other processes to leave "
                         "the CPUs idle (shared machines); 0 = do not wait")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    results = {"machine": info, "families": {}}
    for key in args.families:
        make, solver, extra = FAMILIES[key]
        fam = make()
        layer = diffopt.CvxpyLayer(fam.problem, parameters=fam.parameters,
                                   variables=fam.variables, solver=solver)
        params = fam.tensors(requires_grad=False)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        loads: dict[str, list[float]] = {m: [] for m in MODES}
        outs = {}
        for rnd in range(args.repeats + 1):  # round 0 is the warm-up
            if args.quiet_wait > 0:
                wait_for_quiet(args.quiet_wait)
            for mode, opts in MODES.items():
                for attempt in range(3 if args.quiet_wait > 0 else 1):
                    box = []
                    dt, foreign = timed_call(
                        lambda: box.append(layer(*params, solver_args={**extra, **opts})[0]))
                    if foreign is None or foreign < 0.15 or rnd == 0:
                        break
                    wait_for_quiet(args.quiet_wait)  # load arrived mid-call: wait, redo once more
                if rnd == 0:
                    outs[mode] = box[0]
                else:
                    times[mode].append(dt)
                    if foreign is not None:
                        loads[mode].append(foreign)
        in_solver = sum(layer.info.solve_time)
        med = {m: statistics.median(t) for m, t in times.items()}
        diff = max(float((outs[m] - outs["serial"]).abs().max()) for m in MODES)
        row = {
            "family": fam.description, "solver": solver, "batch": fam.batch,
            "median_ms": {m: 1e3 * v for m, v in med.items()},
            "all_ms": {m: [1e3 * v for v in t] for m, t in times.items()},
            "speedup_vs_serial": {m: med["serial"] / v for m, v in med.items()},
            "in_solver_ms_last_call": 1e3 * in_solver,
            "max_abs_diff_vs_serial": diff,
            "foreign_cpu_share": {m: statistics.median(v) if v else None
                                  for m, v in loads.items()},
        }
        results["families"][key] = row
        print(f"{key:10s} {fam.description} B={fam.batch} ({solver}); max |Δx| vs serial {diff:.1e}")
        for m in MODES:
            load = row["foreign_cpu_share"][m]
            load_txt = "" if load is None else f"   (other processes: {100 * load:.0f}% of the CPUs)"
            print(f"    {m:9s} {row['median_ms'][m]:8.1f} ms   x{row['speedup_vs_serial'][m]:.2f}"
                  + load_txt)
    info["load_avg_end"] = list(os.getloadavg())
    print(f"load average at start {info['load_avg_start']}, at end {info['load_avg_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
