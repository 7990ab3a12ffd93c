"""Differentiable Markowitz portfolio: an SOCP layer trained end to end for realized return.

Each period, features ``x ∈ R^p`` are observed and a linear model predicts the assets' expected
returns ``μ̂ = f_θ(x)``. A risk-constrained Markowitz problem turns the prediction into a
portfolio,

.. math::

    w^\\star(\\hat\\mu) = \\arg\\max_w \\hat\\mu^\\top w \\quad\\text{s.t.}\\quad
    \\|L^\\top w\\|_2 \\le \\sigma,\\quad \\mathbf 1^\\top w = 1,\\quad w \\ge 0,

with ``Σ = L Lᵀ`` the (known) covariance of the returns, so the constraint bounds the
portfolio's standard deviation by ``σ`` (a second-order cone: the problem is an SOCP, solved by a
:class:`diffopt.CvxpyLayer`). Because the risk ball is curved, ``w*`` is a smooth function of
``μ̂`` where the risk constraint is active, and the layer's exact KKT gradient is informative.
Realized returns are ``r = μ(x) + Lε`` with a nonlinear ``μ(x)``, so the linear model is
misspecified. Two ways of training it are compared on held-out periods:

- **two-stage**: fit ``μ̂`` to the realized returns by mean-squared error, then optimize;
- **decision-focused**: maximize the mean realized return ``rᵀw*(μ̂)`` directly, differentiating
  through the SOCP.

References: an equal-weight portfolio and the oracle ``w*(μ(x))`` that knows the true expected
returns. Prints, per method, the mean realized test return, the regret ``μᵀw_oracle − μᵀw`` (in
expectation, so without the noise) and the portfolio std ``‖Lᵀw‖``; ``--plot`` writes the test
regret per epoch and per method (default ``portfolio_socp.png``), ``--json`` the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import cvxpy as cp
import numpy as np
import torch
from tqdm import tqdm

from diffopt import CvxpyLayer


def make_market(n_assets: int, n_features: int, n_factors: int, seed: int):
    """Factor covariance ``Σ = F Fᵀ + D²`` and a nonlinear map ``x ↦ μ(x)``."""
    rng = np.random.default_rng(seed)
    F = 0.08 * rng.standard_normal((n_assets, n_factors))
    D = np.diag(rng.uniform(0.04, 0.12, n_assets))
    L = np.linalg.cholesky(F @ F.T + D @ D)
    W = rng.standard_normal((n_features, n_assets))
    return L, W


def sample(L, W, n: int, degree: int, seed: int):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, W.shape[0]))
    mu = 0.02 * ((X @ W / np.sqrt(W.shape[0]) + 1.0) ** degree - 1.0) / degree  # E[r | x]
    R = mu + rng.standard_normal((n, L.shape[0])) @ L.T                         # realized
    return (torch.as_tensor(X), torch.as_tensor(mu), torch.as_tensor(R))


def portfolio_layer(L: np.ndarray, sigma: float) -> CvxpyLayer:
    n = L.shape[0]
    w = cp.Variable(n)
    mu = cp.Parameter(n)
    prob = cp.Problem(cp.Maximize(mu @ w), [cp.norm(L.T @ w, 2) <= sigma, cp.sum(w) == 1, w >= 0])
    return CvxpyLayer(prob, parameters=[mu], variables=[w])


def min_risk(L: np.ndarray) -> float:
    w = cp.Variable(L.shape[0])
    prob = cp.Problem(cp.Minimize(cp.norm(L.T @ w, 2)), [cp.sum(w) == 1, w >= 0])
    prob.solve()
    return float(prob.value)


def evaluate(layer, model, X, mu, R, L_t, w_oracle) -> dict:
    with torch.no_grad():
        (w,) = layer(model(X)) if model is not None else (w_oracle,)
    ret = (R * w).sum(1)
    return {"return": float(ret.mean()),
            "regret": float(((mu * w_oracle).sum(1) - (mu * w).sum(1)).mean()),
            "risk": float((w @ L_t).norm(dim=1).mean()), "realized_std": float(ret.std()),
            "weights": w}


def train(method, layer, X, R, Xte, Rte, mute, L_t, w_orc, epochs, batch, lr, seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(X.shape[1], R.shape[1]).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve = []
    for _ in tqdm(range(epochs), desc=f"{method:>16} seed {seed}", leave=False):
        perm = torch.randperm(X.shape[0])
        for i in range(0, X.shape[0], batch):
            idx = perm[i: i + batch]
            pred = model(X[idx])
            if method == "two-stage":
                loss = ((pred - R[idx]) ** 2).mean()
            else:
                (w,) = layer(pred)
                loss = -(R[idx] * w).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        curve.append(evaluate(layer, model, Xte, mute, Rte, L_t, w_orc)["regret"])
    return model, curve


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--assets", type=int, default=12, help="assets")
    ap.add_argument("--features", type=int, default=5, help="features per sample")
    ap.add_argument("--factors", type=int, default=3, help="risk factors")
    ap.add_argument("--degree", type=int, default=4, help="nonlinearity of E[r | x] (1: linear)")
    ap.add_argument("--risk", type=float, default=1.5,
                    help="σ as a multiple of the minimum achievable portfolio std")
    ap.add_argument("--train", type=int, default=400, help="training samples")
    ap.add_argument("--test", type=int, default=1000, help="test samples")
    ap.add_argument("--epochs", type=int, default=12, help="training epochs")
    ap.add_argument("--batch", type=int, default=32, help="samples per Adam step")
    ap.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--plot", default="portfolio_socp.png", help="figure (PNG); '' to skip")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    t0 = time.time()
    methods = ["two-stage", "decision-focused"]
    rows = {m: [] for m in methods + ["equal-weight", "oracle"]}
    curves = {m: [] for m in methods}
    for seed in args.seeds:
        L, W = make_market(args.assets, args.features, args.factors, seed)
        sigma = args.risk * min_risk(L)
        layer = portfolio_layer(L, sigma)
        L_t = torch.as_tensor(L)
        X, mu, R = sample(L, W, args.train, args.degree, 1000 + seed)
        Xte, mute, Rte = sample(L, W, args.test, args.degree, 2000 + seed)
        with torch.no_grad():
            (w_orc,) = layer(mute)
        rows["oracle"].append(evaluate(layer, None, Xte, mute, Rte, L_t, w_orc))
        w_eq = torch.full_like(w_orc, 1.0 / args.assets)
        rows["equal-weight"].append(evaluate(layer, None, Xte, mute, Rte, L_t, w_eq))
        rows["equal-weight"][-1]["regret"] = float(((mute * w_orc).sum(1)
                                                     - (mute * w_eq).sum(1)).mean())
        rows["equal-weight"][-1]["return"] = float((Rte * w_eq).sum(1).mean())
        rows["equal-weight"][-1]["risk"] = float((w_eq @ L_t).norm(dim=1).mean())
        for m in methods:
            model, curve = train(m, layer, X, R, Xte, Rte, mute, L_t, w_orc, args.epochs,
                                 args.batch, args.lr, seed)
            rows[m].append(evaluate(layer, model, Xte, mute, Rte, L_t, w_orc))
            curves[m].append(curve)
    seconds = time.time() - t0

    print(f"\nTest periods: {args.test}, {args.assets} assets, risk budget σ = {args.risk} × "
          f"min std; mean ± std over seeds {args.seeds} ({seconds:.1f} s)")
    print(f"{'method':>18} | {'realized return':>17} | {'regret':>17} | {'portfolio std':>13}")
    results = {}
    for m, vals in rows.items():
        ret = np.array([v["return"] for v in vals])
        reg = np.array([v["regret"] for v in vals])
        risk = np.array([v["risk"] for v in vals])
        results[m] = {"return_mean": float(ret.mean()), "return_std": float(ret.std()),
                      "regret_mean": float(reg.mean()), "regret_std": float(reg.std()),
                      "risk_mean": float(risk.mean())}
        if m in curves:
            results[m]["curves"] = curves[m]
        print(f"{m:>18} | {ret.mean():8.5f} ± {ret.std():.5f} | {reg.mean():8.5f} ± {reg.std():.5f}"
              f" | {risk.mean():13.4f}")
    results["seconds"] = seconds
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if args.plot:
        plot(args.plot, curves, rows, args)
    return results


def plot(path, curves, rows, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = np.arange(1, args.epochs + 1)
    colors = {"two-stage": "tab:blue", "decision-focused": "tab:red", "equal-weight": "0.6",
              "oracle": "k"}
    for m in ("two-stage", "decision-focused"):
        arr = np.array(curves[m])
        ax.plot(ep, arr.mean(0), color=colors[m], label=m)
        ax.fill_between(ep, arr.min(0), arr.max(0), color=colors[m], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test regret μᵀw_oracle − μᵀw")
    ax.set_title(f"mean and range over seeds {args.seeds}", fontsize=10)
    ax.legend(fontsize=8)
    names = [m for m in rows if m != "oracle"]
    x = np.arange(len(args.seeds))
    width = 0.8 / len(names)
    for k, m in enumerate(names):
        ax2.bar(x + k * width, [v["regret"] for v in rows[m]], width, color=colors[m], label=m)
    ax2.set_xticks(x + width * (len(names) - 1) / 2, [f"seed {s}" for s in args.seeds])
    ax2.set_yscale("log")
    ax2.set_ylabel("final test regret (log)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
