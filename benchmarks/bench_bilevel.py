"""Ridge hyperparameter tuning: diffopt.bilevel against TorchOpt's ``custom_root``.

Each configuration runs in its own process with one thread. Every configuration does the same
outer loop: ``--outer`` gradient steps on the ridge penalty ``lam``, each needing one
hypergradient of the validation loss through ``T`` inner gradient-descent steps, and reports
the time per outer step (inner loop + backward, median over ``--repeats`` runs) and the largest
relative error of the hypergradient against the closed form.

Usage::

    python benchmarks/bench_bilevel.py                          # diffopt configurations
    python benchmarks/bench_bilevel.py --torchopt /tmp/topt/bin/python

The second form also runs TorchOpt in the given interpreter (a separate environment, e.g.
``python -m venv --system-site-packages /tmp/topt && /tmp/topt/bin/pip install --no-deps
torchopt optree graphviz``, so that it shares this torch); diffopt is imported from the
repository root either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("diffopt-cg", "diffopt-cg-warm", "torchopt-cg")


def _problem(p: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    w_true = torch.randn(p, generator=g, dtype=torch.float64)
    y = X @ w_true + torch.randn(n, generator=g, dtype=torch.float64)
    Xv = torch.randn(n, p, generator=g, dtype=torch.float64)
    yv = Xv @ w_true + torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, Xv, yv


def run_one(config: str, p: int, n: int, steps: int, outer: int, repeats: int) -> dict:
    """One configuration, in this process."""
    import torch

    torch.set_num_threads(1)
    X, y, Xv, yv = _problem(p, n)
    eye = torch.eye(p, dtype=torch.float64)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * lam * (w * w).sum()

    def outer_loss(w):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    def exact(lam: float) -> float:
        H = X.T @ X / n + lam * eye
        w = torch.linalg.solve(H, X.T @ y / n)
        return float(-(Xv.T @ (Xv @ w - yv) / n) @ torch.linalg.solve(H, w))

    lr = 1.0 / float(torch.linalg.eigvalsh(X.T @ X / n).max() + 1.0)

    if config.startswith("diffopt"):
        sys.path.insert(0, str(ROOT))
        import diffopt.bilevel as bl

        def make_step():
            warm = bl.WarmStart() if config.endswith("warm") else None
            strategy = bl.Implicit(solver="cg", tol=1e-10, warm_start=warm)

            def hypergradient(lam):
                w = bl.minimize(inner, torch.zeros(p, dtype=torch.float64), lam, steps=steps,
                                lr=lr, backward=strategy)
                return torch.autograd.grad(outer_loss(w), lam)[0]

            return hypergradient
    else:
        import torchopt

        def optimality(w, lam):
            return torch.func.grad(inner)(w, lam)

        solve = torchopt.linear_solve.solve_cg(rtol=1e-10, maxiter=100)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
        def solver(w, lam):
            # the same detached gradient steps as diffopt's inner loop
            lam = lam.detach()
            with torch.enable_grad():
                for _ in range(steps):
                    w = w.detach().requires_grad_()
                    (g,) = torch.autograd.grad(inner(w, lam), w)
                    w = w.detach() - lr * g
            return w

        def make_step():
            def hypergradient(lam):
                w = solver(torch.zeros(p, dtype=torch.float64), lam)
                return torch.autograd.grad(outer_loss(w), lam)[0]

            return hypergradient

    times, worst = [], 0.0
    for _ in range(repeats):
        hypergradient = make_step()
        lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        start = time.perf_counter()
        for _ in range(outer):
            g = hypergradient(lam)
            worst = max(worst, abs(float(g) - exact(float(lam))) / abs(exact(float(lam))))
            with torch.no_grad():
                lam.copy_((lam - 0.1 * g).clamp(min=0.05))
        times.append((time.perf_counter() - start) / outer)
    return {"config": config, "ms_per_outer_step": 1e3 * statistics.median(times),
            "max_rel_error": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--p", type=int, default=100)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--outer", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torchopt", help="python interpreter with torchopt installed")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [args.p, args.n, args.steps, args.outer, args.repeats]
    if args.one:
        print(json.dumps(run_one(args.one, *sizes)))
        return
    print(f"ridge p={args.p} n={args.n}, T={args.steps} inner GD steps, {args.outer} outer "
          f"steps, median of {args.repeats}, one thread")
    print(f"{'config':<18}{'ms/outer step':>15}{'max rel error':>15}")
    for config in CONFIGS:
        python = args.torchopt if config.startswith("torchopt") else sys.executable
        if python is None:
            continue
        cmd = [python, __file__, "--one", config, "--p", str(args.p), "--n", str(args.n),
               "--steps", str(args.steps), "--outer", str(args.outer),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{config:<18}{row['ms_per_outer_step']:>15.1f}{row['max_rel_error']:>15.1e}")


if __name__ == "__main__":
    main()
