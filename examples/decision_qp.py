"""Decision-focused learning through a QP layer: predict returns, allocate, learn from the outcome.

A linear model maps features to predicted asset returns; a CvxpyLayer turns predictions into an
allocation w*(ĉ) = argmax_{w ∈ simplex} ĉᵀw − γ‖w‖² (a smoothed "pick the best asset" decision).
Two ways of training the model are compared on held-out data:

- two-stage: fit ĉ to the true returns by mean-squared error, then decide;
- decision-focused: maximize the realized return cᵀw*(ĉ) directly, differentiating through the
  QP's KKT conditions (the layer's exact gradient).

Run ``python examples/decision_qp.py --help`` for options. Prints a table, optionally writes JSON
(``--json``) and a PNG of the learning curves (``--plot``).
"""

from __future__ import annotations

import argparse
import json

import cvxpy as cp
import numpy as np
import torch
from tqdm import tqdm

from diffopt import CvxpyLayer


def make_data(n_samples: int, n_assets: int, n_features: int, seed: int):
    """Returns depend nonlinearly on features, so a linear model is misspecified (as in practice)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_features, n_assets))
    X = rng.standard_normal((n_samples, n_features))
    C = (X @ W / np.sqrt(n_features) + 1.0) ** 3 / 4 + 0.3 * rng.standard_normal((n_samples, n_assets))
    return torch.as_tensor(X), torch.as_tensor(C)


def allocation_layer(n_assets: int, gamma: float) -> CvxpyLayer:
    w = cp.Variable(n_assets)
    c = cp.Parameter(n_assets)
    prob = cp.Problem(cp.Maximize(c @ w - gamma * cp.sum_squares(w)), [w >= 0, cp.sum(w) == 1])
    return CvxpyLayer(prob, parameters=[c], variables=[w])


def realized_regret(model, X, C) -> float:
    """Mean (best possible return − realized return) of the hard decision: the asset with the
    highest predicted return. The QP layer is the smooth surrogate used only for training."""
    with torch.no_grad():
        pick = model(X).argmax(1, keepdim=True)
    return float((C.max(1).values - C.gather(1, pick).squeeze(1)).mean())


def train(method: str, layer, X, C, Xte, Cte, epochs: int, batch: int, lr: float, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(X.shape[1], C.shape[1]).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve = []
    for _ in tqdm(range(epochs), desc=f"{method:>16}", leave=False):
        perm = torch.randperm(X.shape[0])
        for i in range(0, X.shape[0], batch):
            idx = perm[i: i + batch]
            pred = model(X[idx])
            if method == "two-stage":
                loss = ((pred - C[idx]) ** 2).mean()
            else:
                (w,) = layer(pred)
                loss = -(C[idx] * w).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        curve.append(realized_regret(model, Xte, Cte))
    return curve


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--assets", type=int, default=8, help="assets (QP variables)")
    ap.add_argument("--features", type=int, default=5, help="features per sample")
    ap.add_argument("--train", type=int, default=400, help="training samples")
    ap.add_argument("--test", type=int, default=400, help="test samples")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs")
    ap.add_argument("--batch", type=int, default=32, help="samples per Adam step")
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    ap.add_argument("--gamma", type=float, default=1.0, help="quadratic smoothing of the decision")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per seed")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--plot", help="write learning curves to this PNG file")
    args = ap.parse_args(argv)

    layer = allocation_layer(args.assets, args.gamma)
    methods = ["two-stage", "decision-focused"]
    curves = {m: [] for m in methods}
    for seed in args.seeds:
        X, C = make_data(args.train + args.test, args.assets, args.features, seed)
        Xtr, Ctr, Xte, Cte = X[: args.train], C[: args.train], X[args.train:], C[args.train:]
        for m in methods:
            curves[m].append(train(m, layer, Xtr, Ctr, Xte, Cte, args.epochs, args.batch,
                                   args.lr, seed))
    epochs = f"{args.epochs} epoch" + ("" if args.epochs == 1 else "s")
    spread = f"mean ± std over seeds {args.seeds}" if len(args.seeds) > 1 else \
        f"one seed ({args.seeds[0]})"
    print(f"\nTest regret after {epochs} ({spread}):")
    print(f"{'method':>18} | regret")
    results = {}
    for m in methods:
        final = np.array([c[-1] for c in curves[m]])
        results[m] = {"mean": float(final.mean()), "std": float(final.std()),
                      "curves": curves[m]}
        print(f"{m:>18} | {final.mean():.4f}" + (f" ± {final.std():.4f}" if len(final) > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for m in methods:
            arr = np.array(curves[m])
            ax.plot(np.arange(1, args.epochs + 1), arr.mean(0), label=m)
            ax.fill_between(np.arange(1, args.epochs + 1), arr.min(0), arr.max(0), alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))     # whole epochs only
        ax.set_xlabel("epoch")
        ax.set_ylabel("test regret (lower is better)")
        band = ", band: min–max over seeds" if len(args.seeds) > 1 else ""
        ax.set_title(f"Decision-focused vs two-stage learning through a QP\n"
                     f"{args.assets} assets, {args.train} training samples, "
                     f"{len(args.seeds)} seed(s){band}", fontsize=10)
        ax.legend(title="method")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return results


if __name__ == "__main__":
    main()
