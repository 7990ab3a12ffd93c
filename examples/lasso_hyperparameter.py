"""Tune lasso penalties on the diabetes data by gradient descent through a CvxpyLayer.

The inner problem is the lasso, written in CVXPY with the penalties as a parameter,

    w*(alpha) = argmin_w 1/(2n) ||X_tr w - y_tr||^2 + sum_i alpha_g(i) |w_i|,

with either one penalty for every feature (``scalar``) or one per feature group (``groups``:
demographics, body measures, blood serum, pairwise interactions). The outer loss is the
validation error L(alpha) = 1/(2m) ||X_val w* - y_val||^2. The CvxpyLayer differentiates w*
through the KKT conditions of the cone program, so dL/dalpha is exact (up to the solver
tolerance) although the lasso is nonsmooth: on a fixed support w* is affine in alpha.

The script learns eta = log(alpha) with Adam on that hypergradient, and compares with a grid
search over one common penalty (the whole grid is one batched layer call). It prints

* the hypergradient at the initial penalty against a central difference of two layer solves,
* the grid's best penalty and its validation / test loss,
* the learned penalties, their validation / test loss, the number of nonzero coefficients,
  and the time per hypergradient (forward + backward),
* the largest difference between the layer's lasso solution and scikit-learn's ``Lasso`` at
  the learned scalar penalty (an independent solver of the same problem).

Data: scikit-learn's diabetes data set (442 patients, 10 features), shipped inside the package,
with the 45 pairwise interactions added (55 features), standardised with training statistics.

Run ``python examples/lasso_hyperparameter.py --help`` for options; the defaults take about a
minute on two cores and write ``lasso_hyperparameter.png`` and (with ``--json``) the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass

import cvxpy as cp
import numpy as np
import torch
from tqdm import tqdm

from diffopt import CvxpyLayer

DT = torch.float64
NAMES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
GROUPS = {"demographics": ["age", "sex"], "body": ["bmi", "bp"],
          "serum": ["s1", "s2", "s3", "s4", "s5", "s6"]}
NONZERO = 1e-6  # |w_i| above which a coefficient counts as selected (interior-point solutions)


@dataclass
class Data:
    X_tr: torch.Tensor
    y_tr: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_te: torch.Tensor
    y_te: torch.Tensor
    features: list[str]
    group_names: list[str]
    group_of: torch.Tensor  # group index of every feature


def load_data(n_train: int, n_val: int, interactions: bool, seed: int) -> Data:
    """Diabetes data (plus pairwise interactions), standardised with training statistics."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = torch.tensor(X, dtype=DT), torch.tensor(y, dtype=DT)
    features = list(NAMES)
    group_names = list(GROUPS)
    group_of = [next(k for k, g in enumerate(GROUPS.values()) if f in g) for f in NAMES]
    if interactions:
        pairs = list(itertools.combinations(range(len(NAMES)), 2))
        X = torch.cat([X, torch.stack([X[:, i] * X[:, j] for i, j in pairs], 1)], 1)
        features += [f"{NAMES[i]}*{NAMES[j]}" for i, j in pairs]
        group_names.append("interactions")
        group_of += [len(GROUPS)] * len(pairs)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    mu, sd = X[tr].mean(0), X[tr].std(0)
    ymu, ysd = y[tr].mean(), y[tr].std()
    X, y = (X - mu) / sd, (y - ymu) / ysd
    return Data(X[tr], y[tr], X[va], y[va], X[te], y[te], features, group_names,
                torch.tensor(group_of))


def mse(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Half the mean squared error; broadcasts over a leading batch of coefficient vectors."""
    return 0.5 * ((w @ X.T - y) ** 2).mean(-1)


def lasso_layer(data: Data, tol: float) -> CvxpyLayer:
    """The lasso with one (nonnegative) penalty per feature, as a layer of that penalty vector."""
    n, p = data.X_tr.shape
    w = cp.Variable(p)
    alpha = cp.Parameter(p, nonneg=True)
    fit = cp.sum_squares(data.X_tr.numpy() @ w - data.y_tr.numpy()) / (2 * n)
    # alpha multiplies the parameter-free convex |w| elementwise: DPP, so the problem is
    # canonicalized once and every call only re-solves.
    problem = cp.Problem(cp.Minimize(fit + cp.sum(cp.multiply(alpha, cp.abs(w)))))
    assert problem.is_dpp()
    return CvxpyLayer(problem, parameters=[alpha], variables=[w], solver_args={"tol": tol})


@dataclass
class Run:
    """One gradient-descent run on the log-penalties."""

    penalty: str
    alpha: list[float]  # learned penalty per group (one entry for "scalar")
    val_loss: float
    test_loss: float
    nonzeros: int
    ms_per_hypergradient: float
    path_alpha: list[list[float]]
    path_val_loss: list[float]


class Tuner:
    """The bi-level lasso: validation loss and its hypergradient in the log-penalties."""

    def __init__(self, data: Data, layer: CvxpyLayer) -> None:
        self.data = data
        self.layer = layer

    def expand(self, alpha: torch.Tensor, penalty: str) -> torch.Tensor:
        """Per-feature penalties from one per group (or a single one); keeps a batch dim."""
        if penalty == "scalar":
            return alpha[..., :1].expand(*alpha.shape[:-1], self.data.X_tr.shape[1])
        return alpha[..., self.data.group_of]

    def solve(self, alpha: torch.Tensor, penalty: str) -> torch.Tensor:
        (w,) = self.layer(self.expand(alpha, penalty))
        return w

    def val_loss(self, eta: torch.Tensor, penalty: str) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.solve(eta.exp(), penalty)
        return mse(self.data.X_val, self.data.y_val, w), w

    def learn(self, eta0: torch.Tensor, penalty: str, steps: int, lr: float) -> Run:
        eta = eta0.clone().requires_grad_()
        opt = torch.optim.Adam([eta], lr=lr)
        path_alpha, path_val, times = [], [], []
        for _ in tqdm(range(steps), desc=f"gradient descent ({penalty})", leave=False):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss, _ = self.val_loss(eta, penalty)
            loss.backward()
            times.append(time.perf_counter() - t0)
            path_alpha.append(eta.detach().exp().tolist())
            path_val.append(float(loss.detach()))
            opt.step()
        with torch.no_grad():
            loss, w = self.val_loss(eta, penalty)
        path_alpha.append(eta.detach().exp().tolist())
        path_val.append(float(loss))
        d = self.data
        return Run(penalty, eta.detach().exp().tolist(), float(loss),
                   float(mse(d.X_te, d.y_te, w)), int((w.abs() > NONZERO).sum()),
                   1e3 * statistics.median(times), path_alpha, path_val)


def check_hypergradient(tuner: Tuner, eta0: torch.Tensor, h: float) -> tuple[float, float]:
    """dL/deta at eta0 (scalar penalty) by the layer, and by a central difference of solves."""
    eta = eta0.clone().requires_grad_()
    loss, _ = tuner.val_loss(eta, "scalar")
    loss.backward()
    assert eta.grad is not None
    with torch.no_grad():
        up, _ = tuner.val_loss(eta0 + h, "scalar")
        down, _ = tuner.val_loss(eta0 - h, "scalar")
    return float(eta.grad[0]), float((up - down) / (2 * h))


def sklearn_gap(data: Data, tuner: Tuner, alpha: float) -> float:
    """max |w_layer - w_sklearn| for the scalar lasso at ``alpha`` (same objective scaling)."""
    from sklearn.linear_model import Lasso

    ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    ref.fit(data.X_tr.numpy(), data.y_tr.numpy())
    with torch.no_grad():
        w = tuner.solve(torch.tensor([alpha], dtype=DT), "scalar")
    return float(np.abs(w.numpy() - ref.coef_).max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--penalty", choices=["scalar", "groups", "both"], default="both",
                        help="learn one penalty, one per feature group, or both runs")
    parser.add_argument("--no-interactions", dest="interactions", action="store_false",
                        help="use the 10 raw features only")
    parser.add_argument("--n-train", type=int, default=100, help="training samples")
    parser.add_argument("--n-val", type=int, default=150, help="validation samples (rest: test)")
    parser.add_argument("--grid", type=int, default=60, help="grid points over the penalty")
    parser.add_argument("--grid-range", type=float, default=1e-3,
                        help="smallest grid penalty as a fraction of alpha_max")
    parser.add_argument("--alpha0", type=float, default=0.3,
                        help="initial penalty as a fraction of alpha_max (w* = 0 above it)")
    parser.add_argument("--outer-steps", type=int, default=100, help="Adam steps on log(alpha)")
    parser.add_argument("--outer-lr", type=float, default=0.1, help="Adam learning rate")
    parser.add_argument("--tol", type=float, default=1e-10, help="Clarabel tolerance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--plot", "--figure", dest="figure", default="lasso_hyperparameter.png",
                        help="figure (PNG)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = load_data(args.n_train, args.n_val, args.interactions, args.seed)
    n, p = data.X_tr.shape
    # Above alpha_max = ||X^T y||_inf / n the lasso solution is zero (and the hypergradient too).
    alpha_max = float((data.X_tr.T @ data.y_tr).abs().max() / n)
    t0 = time.perf_counter()
    tuner = Tuner(data, lasso_layer(data, args.tol))
    build_s = time.perf_counter() - t0
    print(f"diabetes: {n} train / {data.X_val.shape[0]} val / {data.X_te.shape[0]} test, "
          f"{p} features; alpha_max = {alpha_max:.4f}; layer built in {build_s:.2f} s")

    # Grid search over one common penalty: the whole grid is one batched solve.
    alphas = alpha_max * torch.logspace(math.log10(args.grid_range), 0, args.grid, dtype=DT)
    t0 = time.perf_counter()
    with torch.no_grad():
        w_grid = tuner.solve(alphas.unsqueeze(1), "scalar")
    grid_s = time.perf_counter() - t0
    grid_val = mse(data.X_val, data.y_val, w_grid)
    grid_test = mse(data.X_te, data.y_te, w_grid)
    best = int(grid_val.argmin())
    grid_nnz = int((w_grid[best].abs() > NONZERO).sum())
    print(f"grid search: {args.grid} penalties in {grid_s:.2f} s (one batched call); best "
          f"alpha = {float(alphas[best]):.4f}: val {float(grid_val[best]):.4f}, "
          f"test {float(grid_test[best]):.4f}, {grid_nnz} nonzeros")

    eta0 = torch.tensor([math.log(args.alpha0 * alpha_max)], dtype=DT)
    analytic, numeric = check_hypergradient(tuner, eta0, 1e-4)
    print(f"dL/dlog(alpha) at alpha0 = {args.alpha0 * alpha_max:.4f}: layer {analytic:.6e}, "
          f"central difference {numeric:.6e} (rel. diff "
          f"{abs(analytic - numeric) / abs(numeric):.1e})")

    penalties = ["scalar", "groups"] if args.penalty == "both" else [args.penalty]
    runs = []
    for penalty in penalties:
        size = 1 if penalty == "scalar" else len(data.group_names)
        runs.append(tuner.learn(eta0.expand(size), penalty, args.outer_steps, args.outer_lr))

    header = f"{'method':<22}{'val':>9}{'test':>9}{'nonzeros':>10}{'ms/hypergrad':>14}  penalties"
    print(header)
    print("-" * len(header))
    print(f"{'grid (' + str(args.grid) + ' points)':<22}{float(grid_val[best]):>9.4f}"
          f"{float(grid_test[best]):>9.4f}{grid_nnz:>10}{'':>14}  {float(alphas[best]):.4f}")
    for r in runs:
        names = ["alpha"] if r.penalty == "scalar" else data.group_names
        pen = ", ".join(f"{k}={a:.4f}" for k, a in zip(names, r.alpha))
        print(f"{'gradient (' + r.penalty + ')':<22}{r.val_loss:>9.4f}{r.test_loss:>9.4f}"
              f"{r.nonzeros:>10}{r.ms_per_hypergradient:>14.1f}  {pen}")
    scalar = next((r for r in runs if r.penalty == "scalar"), None)
    gap = None
    if scalar is not None:
        gap = sklearn_gap(data, tuner, scalar.alpha[0])
        print(f"layer vs sklearn Lasso at the learned alpha: max |w diff| = {gap:.1e}")

    plot(alphas, grid_val, grid_test, runs, args.figure)
    print(f"figure written to {args.figure}")
    if args.json:
        result = {
            "args": vars(args),
            "alpha_max": alpha_max,
            "groups": data.group_names,
            "grid": {"alpha": alphas.tolist(), "val_loss": grid_val.tolist(),
                     "test_loss": grid_test.tolist(), "best_alpha": float(alphas[best]),
                     "best_val_loss": float(grid_val[best]),
                     "best_test_loss": float(grid_test[best]), "nonzeros": grid_nnz,
                     "seconds": grid_s},
            "hypergradient_check": {"layer": analytic, "central_difference": numeric},
            "runs": [asdict(r) for r in runs],
            "sklearn_max_abs_diff": gap,
        }
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"results written to {args.json}")


def plot(alphas: torch.Tensor, grid_val: torch.Tensor, grid_test: torch.Tensor, runs: list[Run],
         path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax0.semilogx(alphas, grid_val, "-", color="C0", label="validation loss (grid)")
    ax0.semilogx(alphas, grid_test, ":", color="C0", alpha=0.6, label="test loss (grid)")
    for r in runs:
        if r.penalty == "scalar":
            a = [x[0] for x in r.path_alpha]
            ax0.semilogx(a, r.path_val_loss, ".-", color="C3", ms=4, lw=0.8,
                         label="gradient-descent path")
            ax0.plot(a[0], r.path_val_loss[0], "o", color="C3", mfc="none", label="start")
            ax0.plot(a[-1], r.path_val_loss[-1], "*", color="C3", ms=12, label="end")
        else:
            ax0.axhline(r.val_loss, color="C2", ls="--", lw=1,
                        label=f"per-group penalties (val {r.val_loss:.4f})")
    ax0.set(xlabel="lasso penalty alpha", ylabel="loss (1/2 MSE, standardised y)",
            title="validation loss vs penalty")
    best = float(grid_val.min())
    for r in runs:
        ax1.plot(r.path_val_loss, color=f"C{3 if r.penalty == 'scalar' else 2}",
                 label=f"gradient descent ({r.penalty})")
    ax1.axhline(best, color="C0", ls="--", lw=1, label="grid search best")
    ax1.set(xlabel="outer step", ylabel="validation loss", title="learning the penalties")
    for ax in (ax0, ax1):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
