"""Native solver on a GPU: ``diffopt.QPLayer`` on CUDA tensors against the same call on the CPU.

For each family, batch size and dtype, one forward + backward is timed on the CPU and on the GPU
(median of ``--repeats`` after one warm-up, the GPU synchronized around each phase), and the
GPU's solution and gradients are compared with the CPU's (``x diff``, ``grad diff``) and its
gradients with float64 ones on the CPU (``grad err``). The batches are the benchmark
families' items (``benchmarks/common.py``) tiled to the batch size, so every row solves the same
problems and only the batch grows.

Usage (on a machine with CUDA)::

    python benchmarks/bench_gpu.py --batches 64 256 1024 4096 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import dense_qp, grid_shortest_path, rel_err

import diffopt

FAMILIES = {
    "qp50": lambda: dense_qp(50, 40, 5, 64),
    "path": lambda: grid_shortest_path(5, 64),
}
#: name -> (dtype of the data, solver_args): float32 data are solved in float64 by default;
#: ``f32-iter`` iterates in float32 (the native solver's ``dtype`` option).
DTYPES = {
    "float64": (torch.float64, {}),
    "float32": (torch.float32, {}),
    "f32-iter": (torch.float32, {"dtype": torch.float32}),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(fam, B: int, dtype: torch.dtype, device: str, repeats: int, solver_args: dict) -> dict:
    """Time QPLayer on ``fam``'s items tiled to ``B`` on ``device``; return times and results."""
    base = fam.tensors(requires_grad=False)
    reps = -(-B // base[0].shape[0])
    values = [t.repeat(reps, *([1] * (t.dim() - 1)))[:B].to(device, dtype) for t in base]
    layer = diffopt.QPLayer(solver_args=solver_args)
    gen = torch.Generator().manual_seed(0)
    upstream = None
    samples = dict(forward=[], backward=[])
    for r in range(repeats + 1):
        params = [v.clone().requires_grad_() for v in values]
        _sync(device)
        t0 = time.perf_counter()
        x = layer(**fam.qp_form(*params))
        _sync(device)
        t1 = time.perf_counter()
        if upstream is None:
            upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device, dtype)
        grads = torch.autograd.grad((x * upstream).sum(), params)
        _sync(device)
        t2 = time.perf_counter()
        if r:  # the first run is the warm-up
            samples["forward"].append(t1 - t0)
            samples["backward"].append(t2 - t1)
    ok = sum(s.name == "OPTIMAL" for s in layer.info.status)
    times = {k: statistics.median(v) for k, v in samples.items()}
    return dict(times=times, total=times["forward"] + times["backward"], optimal=ok,
                x=x.detach().cpu().double(), grads=[g.cpu().double() for g in grads])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                    help="float32: float32 data (solved in float64); f32-iter: float32 iterates")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median)")
    ap.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("no CUDA device: this benchmark compares the GPU with the CPU")
    print(f"GPU: {torch.cuda.get_device_name()}; CPU threads: {torch.get_num_threads()}")
    header = (f"{'family':6} {'B':>5} {'dtype':8} {'cpu ms':>9} {'gpu ms':>9} {'gpu/cpu':>8} "
              f"{'gpu µs/item':>11} {'optimal':>9} {'x diff':>8} {'grad diff':>9} {'grad err':>8}")
    print(header)
    rows = []
    for key in args.families:
        fam = FAMILIES[key]()
        for B in args.batches:
            ref = run(fam, B, torch.float64, "cpu", 1, {})  # float64 on the CPU
            for dname in args.dtypes:
                dtype, solver_args = DTYPES[dname]
                cpu = run(fam, B, dtype, "cpu", args.repeats, solver_args)
                gpu = run(fam, B, dtype, "cuda", args.repeats, solver_args)
                row = dict(family=key, B=B, dtype=dname, cpu=cpu["times"], gpu=gpu["times"],
                           speedup=cpu["total"] / gpu["total"],
                           optimal_cpu=cpu["optimal"], optimal_gpu=gpu["optimal"],
                           x_diff=rel_err(gpu["x"], cpu["x"]),
                           grad_diff=max(rel_err(a, c) for a, c in zip(gpu["grads"], cpu["grads"])),
                           grad_err=max(rel_err(a, c) for a, c in zip(gpu["grads"], ref["grads"])))
                rows.append(row)
                print(f"{key:6} {B:5d} {dname:8} {1e3 * cpu['total']:9.1f} "
                      f"{1e3 * gpu['total']:9.1f} {row['speedup']:7.2f}x "
                      f"{1e6 * gpu['total'] / B:11.1f} {gpu['optimal']:4d}/{B:<4d} "
                      f"{row['x_diff']:8.1e} {row['grad_diff']:9.1e} {row['grad_err']:8.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
