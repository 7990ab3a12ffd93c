"""Differential fuzzing report: outcome counts per family, per backend, and the first offenders.

Runs the harness of ``tests/fuzz.py`` (issue 18, item 5) on ``--cases`` cases of ``--batch`` items
per family, the dtypes alternating between cases, and prints the classification counts (right,
correct failure, false failure, refused at an extreme scale, silent wrong, crash, undecided,
unsupported) per family and check, then per backend, then offending/all per family, dtype and scale band,
then the offending checks with what reproduces each (``--json`` keeps every record).

    python benchmarks/fuzz_report.py                          # 20 cases x 8 items per family
    python benchmarks/fuzz_report.py --cases 5 --families lp socp
    python benchmarks/fuzz_report.py --family lp --seed 1 --dtype float32   # one case, all records
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fuzz  # noqa: E402


def _by_backend(records) -> str:
    counts = collections.Counter((r.backend, r.outcome) for r in records)
    rows = sorted({b for b, _ in counts})
    lines = [f"{'backend':24s}" + "".join(f"{o[:13]:>14s}" for o in fuzz.OUTCOMES)]
    lines += [f"{b:24s}" + "".join(f"{counts[(b, o)]:14d}" for o in fuzz.OUTCOMES) for b in rows]
    return "\n".join(lines)


def _band(r) -> str:
    worst = round(max(abs(math.log10(r.s_b)), abs(math.log10(r.s_c))))
    return f"f{r.dtype[5:]} {'unit' if worst == 0 else f'1e±{worst}'}"


def _by_band(records) -> str:
    """Offending / all checks per family and (dtype, scale band): where the defects live."""
    bands = sorted({_band(r) for r in records})
    tally = collections.defaultdict(lambda: [0, 0])
    for r in records:
        cell = tally[(f"{r.family}/{r.check}", _band(r))]
        cell[0] += r.outcome in fuzz.BAD
        cell[1] += 1
    lines = [f"{'offending/all':24s}" + "".join(f"{b:>10s}" for b in bands)]
    for row in sorted({k for k, _ in tally}):
        lines.append(f"{row:24s}" + "".join(
            f"{'%d/%d' % tuple(tally[(row, b)]):>10s}" for b in bands))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="cases per family")
    parser.add_argument("--batch", type=int, default=8, help="items per case (one batched call)")
    parser.add_argument("--grad", type=int, default=2, help="gradient checks per case")
    parser.add_argument("--seed", type=int, default=0, help="base seed (or the case's seed)")
    parser.add_argument("--families", nargs="*", default=list(fuzz.FAMILIES))
    parser.add_argument("--family", help="run the one case --seed of this family, print all")
    parser.add_argument("--dtype", default=None, choices=["float32", "float64"],
                        help="only this dtype (default: alternate float64 and float32)")
    parser.add_argument("--show", type=int, default=40, help="offending checks to list")
    parser.add_argument("--json", help="also write every record to this file")
    parser.add_argument("--load", help="print the tables of records saved with --json")
    args = parser.parse_args()
    dtypes = ((getattr(torch, args.dtype),) if args.dtype else (torch.float64, torch.float32))
    start = time.perf_counter()
    if args.family:
        records = fuzz.run_case(args.family, args.seed, args.batch, dtypes[0], args.grad)
        print(fuzz.FAMILIES[args.family](fuzz.np.random.default_rng(args.seed)).note)
        for r in records:
            print(r.line())
        return
    records = []
    if args.load:
        records = [fuzz.Record(**r) for r in json.loads(Path(args.load).read_text())]
        args.families = []
    for family in args.families:
        t0 = time.perf_counter()
        part = fuzz.run([family], args.cases, args.batch, args.grad, args.seed, dtypes)
        records += part
        items = len({(r.seed, r.item) for r in part})
        print(f"{family}: {items} items, {len(part)} checks, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    if not args.load:
        print(f"{len({(r.family, r.seed, r.item) for r in records})} items, {len(records)} "
              f"checks (item x backend x check), {time.perf_counter() - start:.0f} s; cases per "
              f"family {args.cases}, batch {args.batch}, base seed {args.seed}\n")
    extra = _by_backend(records) + "\n\n" + _by_band(records)
    print(fuzz.summary(records, first=args.show).replace("\n\n", "\n\n" + extra + "\n\n", 1))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in records]))


if __name__ == "__main__":
    main()
