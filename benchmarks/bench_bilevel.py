"""Bi-level benchmarks: diffopt.bilevel against TorchOpt and higher, each in its own process.

Two tasks, each configuration in its own process with one thread:

* ``ridge``: ``--outer`` gradient steps on a ridge penalty ``lam``, each needing one
  hypergradient of the validation loss through ``T`` inner gradient-descent steps; reports the
  time per outer step (inner loop + backward, median over ``--repeats`` runs) and the largest
  relative error of the hypergradient against the closed form. Implicit (CG) and unrolled.
* ``imaml``: implicit MAML on sine regression (a 1-40-40-1 tanh network, ``--tasks`` tasks per
  meta-step, ``--imaml-steps`` inner gradient steps on the proximal problem, CG to relative residual 1e-9);
  reports the time per meta-step and the largest relative difference of the meta-gradient from
  the one computed with an exact (direct) linear solve at the same inner solution (checked
  in the first run).

Usage::

    python benchmarks/bench_bilevel.py                          # diffopt configurations
    python benchmarks/bench_bilevel.py --torchopt /tmp/topt/bin/python

The second form also runs TorchOpt and higher in the given interpreter (a separate environment,
e.g. ``python -m venv --system-site-packages /tmp/topt && /tmp/topt/bin/pip install --no-deps
torchopt optree graphviz higher``, so that it shares this torch); diffopt is imported from the
repository root either way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RIDGE = ("diffopt-cg", "diffopt-cg-warm", "torchopt-cg", "diffopt-unrolled", "higher-unrolled")
IMAML = ("diffopt-imaml", "torchopt-imaml")
CONFIGS = RIDGE + IMAML
FOREIGN = ("torchopt", "higher")  # run in the --torchopt interpreter


def _problem(p: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    w_true = torch.randn(p, generator=g, dtype=torch.float64)
    y = X @ w_true + torch.randn(n, generator=g, dtype=torch.float64)
    Xv = torch.randn(n, p, generator=g, dtype=torch.float64)
    yv = Xv @ w_true + torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, Xv, yv


def run_ridge(config: str, p: int, n: int, steps: int, outer: int, repeats: int) -> dict:
    """One ridge configuration, in this process."""
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

        if config == "diffopt-unrolled":

            def make_step():
                def hypergradient(lam):
                    w = bl.minimize(inner, torch.zeros(p, dtype=torch.float64), lam,
                                    steps=steps, lr=lr, backward=bl.Unrolled())
                    return torch.autograd.grad(outer_loss(w), lam)[0]

                return hypergradient
    elif config == "higher-unrolled":
        import higher

        class Weights(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(p, dtype=torch.float64))

        def make_step():
            def hypergradient(lam):
                model = Weights()
                opt = torch.optim.SGD(model.parameters(), lr=lr)
                with higher.innerloop_ctx(model, opt) as (fmodel, diffopt_):
                    for _ in range(steps):
                        diffopt_.step(inner(fmodel.w, lam))
                    return torch.autograd.grad(outer_loss(fmodel.w), lam)[0]

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
            g = hypergradient(lam).detach()
            worst = max(worst, abs(float(g) - exact(float(lam))) / abs(exact(float(lam))))
            with torch.no_grad():
                lam.copy_((lam - 0.1 * g).clamp(min=0.05))
        times.append((time.perf_counter() - start) / outer)
    return {"config": config, "ms_per_outer_step": 1e3 * statistics.median(times),
            "max_rel_error": worst}


def _sine_tasks(tasks: int, k: int):
    import torch

    g = torch.Generator().manual_seed(1)
    amp = 0.1 + 4.9 * torch.rand(tasks, generator=g, dtype=torch.float64)
    phase = 3.14159 * torch.rand(tasks, generator=g, dtype=torch.float64)
    x = -5 + 10 * torch.rand(tasks, 2 * k, 1, generator=g, dtype=torch.float64)
    y = amp[:, None, None] * torch.sin(x - phase[:, None, None])
    return x[:, :k], y[:, :k], x[:, k:], y[:, k:]


def run_imaml(config: str, tasks: int, steps: int, outer: int, repeats: int) -> dict:
    """One iMAML configuration, in this process: meta-steps of Adam on the network's weights."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import diffopt.bilevel as bl

    # iMAML's inner loop is approximate by design; every configuration differentiates the same
    # iterate, and the reference is the exact solve at that iterate.
    warnings.simplefilter("ignore", bl.NotConvergedWarning)
    reg, lr, cg_iters, cg_tol = 2.0, 0.02, 50, 1e-9
    xs, ys, xq, yq = _sine_tasks(tasks, 10)
    g = torch.Generator().manual_seed(0)
    sizes = [(1, 40), (40, 40), (40, 1)]
    init = []
    for fan_in, fan_out in sizes:
        init += [torch.randn(fan_in, fan_out, generator=g, dtype=torch.float64) / fan_in**0.5,
                 torch.zeros(fan_out, dtype=torch.float64)]

    def net(params, x):
        h = x
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            if i + 2 < len(params):
                h = torch.tanh(h)
        return h

    def support_loss(t):
        return lambda phi: ((net(phi, xs[t]) - ys[t]) ** 2).mean()

    def query_loss(t, phi):
        return ((net(phi, xq[t]) - yq[t]) ** 2).mean()

    def adapt_diffopt(t, theta, solver):
        return bl.imaml_adapt(support_loss(t), theta, reg=reg, lr=lr, steps=steps,
                              backward=bl.Implicit(solver=solver, maxiter=cg_iters, tol=cg_tol))

    if config == "diffopt-imaml":
        def adapt(t, theta):
            return adapt_diffopt(t, theta, "cg")
    else:
        import torchopt

        def make(t):
            def optimality(phi, theta):
                grads = torch.func.grad(support_loss(t))(phi)
                return tuple(gr + reg * (p - q) for gr, p, q in zip(grads, phi, theta))

            @torchopt.diff.implicit.custom_root(
                optimality, argnums=1,
                solve=torchopt.linear_solve.solve_cg(rtol=cg_tol, maxiter=cg_iters))
            def solver(phi, theta):
                # the same gradient steps as diffopt's inner loop, started at theta
                theta = tuple(q.detach() for q in theta)
                phi = theta
                with torch.enable_grad():
                    for _ in range(steps):
                        phi = tuple(x.detach().requires_grad_() for x in phi)
                        loss = support_loss(t)(phi) + 0.5 * reg * sum(
                            ((a - b) ** 2).sum() for a, b in zip(phi, theta))
                        grads = torch.autograd.grad(loss, phi)
                        phi = tuple(a.detach() - lr * gr for a, gr in zip(phi, grads))
                return phi

            return solver

        solvers = [make(t) for t in range(tasks)]

        def adapt(t, theta):
            return solvers[t](tuple(q.detach() for q in theta), theta)

    def meta_gradient(theta, adapt_fn):
        loss = sum(query_loss(t, adapt_fn(t, theta)) for t in range(tasks)) / tasks
        return torch.autograd.grad(loss, theta)

    def flat(grads):
        return torch.cat([x.reshape(-1) for x in grads])

    times, worst = [], 0.0
    for repeat in range(repeats):
        theta = tuple(x.clone().requires_grad_() for x in init)
        opt = torch.optim.Adam(theta, lr=1e-3)
        elapsed = 0.0
        for _ in range(outer):
            start = time.perf_counter()
            grads = meta_gradient(theta, adapt)
            elapsed += time.perf_counter() - start
            if repeat == 0:  # the reference costs one product per weight: checked once
                exact = flat(meta_gradient(theta, lambda t, th: adapt_diffopt(t, th, "direct")))
                worst = max(worst, float((flat(grads) - exact).norm() / exact.norm()))
            for x, gr in zip(theta, grads):
                x.grad = gr
            opt.step()
        times.append(elapsed / outer)
    return {"config": config, "ms_per_outer_step": 1e3 * statistics.median(times),
            "max_rel_error": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--p", type=int, default=100, help="ridge: number of features")
    parser.add_argument("--n", type=int, default=500, help="ridge: training/validation samples")
    parser.add_argument("--steps", type=int, default=1000, help="ridge: inner GD steps T")
    parser.add_argument("--outer", type=int, default=10, help="ridge: outer steps per run")
    parser.add_argument("--meta-steps", type=int, default=5, help="imaml: meta-steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--tasks", type=int, default=4, help="imaml: tasks per meta-step")
    parser.add_argument("--imaml-steps", type=int, default=100,
                        help="imaml: inner gradient steps on the proximal problem")
    parser.add_argument("--only", choices=["ridge", "imaml"], help="run one task only")
    parser.add_argument("--torchopt", help="python interpreter with torchopt and higher")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    ridge_sizes = [args.p, args.n, args.steps, args.outer, args.repeats]
    imaml_sizes = [args.tasks, args.imaml_steps, args.meta_steps, args.repeats]
    if args.one:
        row = (run_ridge(args.one, *ridge_sizes) if args.one in RIDGE
               else run_imaml(args.one, *imaml_sizes))
        print(json.dumps(row))
        return
    for task, configs in (("ridge", RIDGE), ("imaml", IMAML)):
        if args.only not in (None, task):
            continue
        if task == "ridge":
            print(f"ridge p={args.p} n={args.n}, T={args.steps} inner GD steps, {args.outer} "
                  f"outer steps, median of {args.repeats}, one thread; error vs closed form")
        else:
            print(f"iMAML sine, {args.tasks} tasks/meta-step, {args.imaml_steps} inner steps, "
                  f"{args.meta_steps} meta-steps, median of {args.repeats}, one thread; "
                  f"error vs direct solve")
        print(f"{'config':<18}{'ms/outer step':>15}{'max rel error':>15}")
        for config in configs:
            python = args.torchopt if config.startswith(FOREIGN) else sys.executable
            if python is None:
                continue
            cmd = [python, __file__, "--one", config, "--p", str(args.p), "--n", str(args.n),
                   "--steps", str(args.steps), "--outer", str(args.outer),
                   "--repeats", str(args.repeats), "--tasks", str(args.tasks),
                   "--imaml-steps", str(args.imaml_steps), "--meta-steps", str(args.meta_steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{config:<18}{row['ms_per_outer_step']:>15.1f}{row['max_rel_error']:>15.1e}")


if __name__ == "__main__":
    main()
