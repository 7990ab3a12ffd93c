"""Learn one ridge penalty per feature on the diabetes data set: Implicit vs Unrolled vs Truncated.

The inner problem is ridge regression with a penalty :math:`\\lambda_i = e^{\\eta_i}` per feature,

    w*(eta) = argmin_w 1/(2n) ||X_tr w - y_tr||^2 + 1/2 sum_i exp(eta_i) w_i^2,

solved by T steps of gradient descent; the outer loss is the validation error of w*. Its exact
hypergradient has a closed form, so for every strategy and every T (and k for Truncated) the
script measures:

* the relative error of the hypergradient at the initial eta against the closed form,
* the peak memory allocated by torch during one hypergradient (torch profiler, CPU allocator
  events: every tensor allocation and free, summed in time order),
* the wall time of one hypergradient (median of repeats, without the profiler),
* the validation and test loss after learning eta with that hypergradient (Adam, outer steps),
* whether the inner problem was converged ("conv.": inner gradient norm <= 1e-6 at the initial
  eta); the implicit hypergradient is exact only then.

Data: scikit-learn's diabetes data set (442 patients, 10 features), shipped inside the package.

Run ``python examples/hyperparameter_ridge.py --help`` for options; the defaults take about a
minute on two cores and write ``hyperparameter_ridge.png`` and (with ``--json``) the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

import diffopt.bilevel as bl

DT = torch.float64


@dataclass
class Data:
    X_tr: torch.Tensor
    y_tr: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_te: torch.Tensor
    y_te: torch.Tensor


def load_data(n_train: int, n_val: int, seed: int) -> Data:
    """Diabetes data, standardised with training statistics, split at random."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = torch.tensor(X, dtype=DT), torch.tensor(y, dtype=DT)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    ymu, ysd = y[tr].mean(), y[tr].std()
    X, y = (X - mu) / sd, (y - ymu) / ysd
    return Data(X[tr], y[tr], X[va], y[va], X[te], y[te])


class Problem:
    """The bi-level ridge problem and its closed-form hypergradient."""

    def __init__(self, data: Data) -> None:
        self.d = data
        self.A = data.X_tr.T @ data.X_tr / data.X_tr.shape[0]
        self.b = data.X_tr.T @ data.y_tr / data.X_tr.shape[0]
        self.lam_A = float(torch.linalg.eigvalsh(self.A).max())

    def inner(self, w: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        fit = 0.5 * ((self.d.X_tr @ w - self.d.y_tr) ** 2).mean()
        return fit + 0.5 * (eta.exp() * w * w).sum()

    @staticmethod
    def mse(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X @ w - y) ** 2).mean()

    def outer(self, w: torch.Tensor) -> torch.Tensor:
        return self.mse(self.d.X_val, self.d.y_val, w)

    def lr(self, eta: torch.Tensor) -> float:
        """1/L for the inner gradient descent, L = lambda_max(A) + max_i exp(eta_i)."""
        return 1.0 / (self.lam_A + float(eta.detach().exp().max()))

    def w_star(self, eta: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.A + torch.diag(eta.exp()), self.b)

    def closed_form(self, eta: torch.Tensor) -> torch.Tensor:
        """dL/deta = -(H^{-1} grad L(w*)) * w* * exp(eta), H = A + diag(exp(eta))."""
        lam = eta.exp()
        H = self.A + torch.diag(lam)
        w = torch.linalg.solve(H, self.b)
        g = self.d.X_val.T @ (self.d.X_val @ w - self.d.y_val) / self.d.X_val.shape[0]
        return -torch.linalg.solve(H, g) * w * lam

    def hypergrad(self, eta0: torch.Tensor, strategy: object, T: int) -> tuple[torch.Tensor, bool]:
        eta = eta0.detach().clone().requires_grad_()
        w, info = bl.minimize(
            self.inner, torch.zeros_like(self.b), eta, steps=T, lr=self.lr(eta),
            backward=strategy, return_diagnostics=True,
        )
        self.outer(w).backward()
        assert eta.grad is not None
        converged = info.inner_grad_norm <= 1e-6
        return eta.grad, converged


@contextlib.contextmanager
def _stderr_fd_silenced():
    """Send file descriptor 2 to /dev/null: the profiler's C++ side prints a ``USDT: ...
    profiler_start/stop`` line at each start and stop, with no switch to turn them off."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_allocated_bytes(run: Callable[[], object]) -> int:
    """Peak of (bytes allocated - bytes freed) by torch's CPU allocator while ``run`` executes."""
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # only the profiler's start and stop are silenced: what ``run`` writes still shows
    with _stderr_fd_silenced():
        prof.start()
    try:
        run()
    finally:
        with _stderr_fd_silenced():
            prof.stop()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@dataclass
class Row:
    method: str
    T: int
    k: int | None
    rel_error: float
    inner_converged: bool
    peak_kib: float
    time_ms: float
    val_loss: float
    test_loss: float


def make_strategy(method: str, k: int | None) -> object:
    if method == "implicit":
        return bl.Implicit(solver="cg")
    if method == "unrolled":
        return bl.Unrolled()
    assert k is not None
    return bl.Truncated(k)


def learn(problem: Problem, eta0: torch.Tensor, grad_fn: Callable[[torch.Tensor], torch.Tensor],
          steps: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """Adam on eta with the given hypergradient; returns eta and the exact validation-loss curve."""
    eta = eta0.clone().requires_grad_()
    opt = torch.optim.Adam([eta], lr=lr)
    curve = []
    for _ in range(steps):
        with torch.no_grad():
            curve.append(float(problem.outer(problem.w_star(eta))))
        eta.grad = grad_fn(eta.detach())
        opt.step()
    with torch.no_grad():
        curve.append(float(problem.outer(problem.w_star(eta))))
    return eta.detach(), curve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0]
        + " Measures hypergradient error, peak memory, time and learned-penalty losses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--Ts", default="10,100,1000", help="inner step counts T (comma-separated)")
    parser.add_argument("--ks", default="1,10,100", help="Truncated k values (k <= T are used)")
    parser.add_argument("--outer-steps", type=int, default=40, help="Adam steps on the penalties")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam learning rate")
    parser.add_argument("--n-train", type=int, default=50, help="training samples (rest: val/test)")
    parser.add_argument("--n-val", type=int, default=150, help="validation samples")
    parser.add_argument("--log-lambda0", type=float, default=-2.0, help="initial log-penalty")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--plot", "--figure", dest="figure", default="hyperparameter_ridge.png",
                        help="figure (PNG); '' to skip")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    Ts = [int(t) for t in args.Ts.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    problem = Problem(load_data(args.n_train, args.n_val, args.seed))
    p = problem.b.shape[0]
    eta0 = torch.full((p,), args.log_lambda0, dtype=DT)
    exact0 = problem.closed_form(eta0)

    configs = [(m, T, None) for T in Ts for m in ("implicit", "unrolled")]
    configs += [("truncated", T, k) for T in Ts for k in ks if k <= T]
    rows: list[Row] = []
    curves: dict[str, list[float]] = {}
    warnings.simplefilter("ignore", bl.NotConvergedWarning)  # recorded in the table instead

    for method, T, k in tqdm(configs, desc="configurations"):
        strategy = make_strategy(method, k)
        grad, converged = problem.hypergrad(eta0, strategy, T)
        rel = float((grad - exact0).norm() / exact0.norm())
        peak = peak_allocated_bytes(lambda: problem.hypergrad(eta0, strategy, T))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            problem.hypergrad(eta0, strategy, T)
            times.append(time.perf_counter() - t0)
        eta, curve = learn(problem, eta0, lambda e: problem.hypergrad(e, strategy, T)[0],
                           args.outer_steps, args.outer_lr)
        w = problem.w_star(eta)
        name = method if k is None else f"truncated(k={k})"
        curves[f"{name}, T={T}"] = curve
        rows.append(Row(name, T, k, rel, converged, peak / 1024, 1e3 * statistics.median(times),
                        curve[-1], float(problem.mse(problem.d.X_te, problem.d.y_te, w))))

    eta_cf, curve_cf = learn(problem, eta0, problem.closed_form, args.outer_steps, args.outer_lr)
    curves["closed form"] = curve_cf
    cf_test = float(problem.mse(problem.d.X_te, problem.d.y_te, problem.w_star(eta_cf)))
    ridge_val = float(problem.outer(problem.w_star(eta0)))

    header = (f"{'method':<18}{'T':>6}{'rel. error':>12}{'conv.':>7}{'peak KiB':>11}{'ms':>9}"
              f"{'val':>9}{'test':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.method:<18}{r.T:>6}{r.rel_error:>12.2e}{'yes' if r.inner_converged else 'no':>7}"
              f"{r.peak_kib:>11.1f}{r.time_ms:>9.2f}{r.val_loss:>9.4f}{r.test_loss:>9.4f}")
    print(f"{'closed form':<18}{'':>6}{'0':>12}{'':>7}{'':>11}{'':>9}"
          f"{curve_cf[-1]:>9.4f}{cf_test:>9.4f}")
    lam0 = math.exp(args.log_lambda0)
    print(f"initial (lambda = {lam0:g} for every feature): val {ridge_val:.4f}")

    if args.figure:
        plot(rows, curves, Ts, args.figure)
        print(f"figure written to {args.figure}")
    if args.json:
        result = {
            "args": vars(args),
            "rows": [asdict(r) for r in rows],
            "closed_form": {"val_loss": curve_cf[-1], "test_loss": cf_test,
                            "learned_lambda": eta_cf.exp().tolist()},
            "initial_val_loss": ridge_val,
            "curves": curves,
        }
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"results written to {args.json}")


def plot(rows: list[Row], curves: dict[str, list[float]], Ts: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    series: dict[str, list[Row]] = {}
    for r in rows:
        series.setdefault(r.method, []).append(r)
    for name, rs in series.items():
        Tx = [r.T for r in rs]
        style = "o-" if not name.startswith("truncated") else "s--"
        axes[0].loglog(Tx, [max(r.rel_error, 1e-17) for r in rs], style, label=name)
        axes[1].loglog(Tx, [r.peak_kib for r in rs], style, label=name)
        axes[2].loglog(Tx, [r.time_ms for r in rs], style, label=name)
    axes[0].set(xlabel="inner steps T", ylabel="relative hypergradient error",
                title="error vs closed form")
    axes[1].set(xlabel="inner steps T", ylabel="peak allocated KiB",
                title="peak memory (torch CPU)")
    axes[2].set(xlabel="inner steps T", ylabel="ms per hypergradient", title="time")
    T_max = max(Ts)
    for name, curve in curves.items():
        if name == "closed form" or name.endswith(f"T={T_max}"):
            axes[3].plot(curve, label=name)
    axes[3].set(xlabel="outer step", ylabel="validation loss",
                title=f"learning the penalties (T={T_max})")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
