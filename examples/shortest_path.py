"""Decision-focused learning of shortest paths (the PyEPO benchmark protocol), end to end.

A linear model predicts the 40 edge costs of a 5x5 grid from 5 features; the decision is the
shortest path from the top-left to the bottom-right node under the predicted costs, an LP:

    min_x ĉᵀx  s.t.  flow conservation (one unit from source to sink),  0 ≤ x ≤ 1.

Because the LP's solution is piecewise constant in ĉ, its exact gradient is zero almost
everywhere; each method trains through a different surrogate (diffopt's gradient modes and
decision-focused losses), and all are scored by the normalized regret of the *exact* LP decision
on held-out data:  Σ (cᵀx*(ĉ) − z*(c)) / Σ z*(c).

Data: PyEPO's generator, draw for draw (pyepo.data.shortestpath.genData): with
rnd = np.random.RandomState(seed), B = rnd.binomial(1, 0.5, (40, 5)), x = rnd.normal(0, 1, (n, 5)),
c = [(xBᵀ/√p + 3)^deg + 1] / 3.5^deg · ε with ε = rnd.uniform(1 − ε̄, 1 + ε̄, (n, 40)), costs
rounded to float32 as PyEPO returns them, and the 40 arcs in PyEPO's order. As in PyEPO's benchmark
scripts (run/utils.py: genData(n + 1000, ..., seed=s), then train_test_split(x, c, test_size=1000,
random_state=s)), each seed s generates train + test points and splits them by the permutation
np.random.RandomState(s).permutation(n): its first `--test` indices are the test set, the rest
the training set (what sklearn's train_test_split does). PyEPO's pipeline.py draws its experiment
seeds with np.random.seed(135); np.random.randint(999), whose first draws are 671, 187, 219, 459,
380 (when nothing else draws from NumPy's global generator in between); pass them to --seeds to
use those instances.

Methods: two-stage (MSE on costs, trained by Adam like the others), two-stage-ls (the same linear
model fitted in closed form by least squares, like PyEPO's two-stage LinearRegression row), SPO+,
perturbed Fenchel–Young (PFYL), QPTL (quadratic smoothing), log-barrier (central-path smoothing),
LPGD.

Every LP is solved by diffopt's native batched interior-point solver, one batch per training
step.

    python examples/shortest_path.py                      # small defaults, a few minutes
    python examples/shortest_path.py --degrees 1 2 4 6 --seeds 0 1 2 3 4 --epochs 20   # full protocol

Prints a table of normalized test regret (mean ± std over seeds), writes it as JSON (--json) and
draws a figure (--plot). Each method trains with Adam at its own learning rate (LEARNING_RATES,
chosen on validation data; --lr sets one for all). To choose a hyperparameter (--lr, --gamma, --mu,
--sigma, ...) without looking at the test set, --validation K trains on all but the last K
training points and scores on those K instead of the test set:

    python examples/shortest_path.py --methods log-barrier --mu 0.05 --validation 200 \
        --degrees 1 2 4 6 --seeds 0 1 2 3 4 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import os
import time

import cvxpy as cp
import numpy as np
import torch
from tqdm import tqdm

from diffopt import LPGD, CvxpyLayer, LogBarrier, QuadraticSmoothing
from diffopt.bilevel import normalized_regret, perturbed_fenchel_young, spo_plus

GRID = 5
METHODS = ("two-stage", "two-stage-ls", "spo+", "pfyl", "qptl", "log-barrier", "lpgd")
#: Adam's learning rate per method: the best mean validation regret among 0.005, 0.01, 0.02, 0.05
#: and 0.1, plus 0.002 where 0.005 won and 0.03 for the log-barrier (``--validation 200``, degrees
#: 1 2 4 6, seeds 0-4, 20 epochs; the table is in docs/lp_gradients.rst). ``--lr`` sets one rate
#: for every method instead.
LEARNING_RATES = {"two-stage": 0.005, "spo+": 0.005, "pfyl": 0.005, "qptl": 0.01,
                  "log-barrier": 0.03, "lpgd": 0.01}


def grid_arcs(k: int = GRID) -> list[tuple[int, int]]:
    """Arcs of the k x k grid pointing east and south, in PyEPO's order: for each row, its east
    arcs, then the south arcs leaving it (so column e of the generated costs is PyEPO's arc e)."""
    arcs = []
    for i in range(k):
        arcs += [(i * k + j, i * k + j + 1) for j in range(k - 1)]
        if i < k - 1:
            arcs += [(i * k + j, i * k + j + k) for j in range(k)]
    return arcs


def grid_graph(k: int = GRID) -> np.ndarray:
    """Node-arc incidence matrix (+1 at the tail, −1 at the head) of :func:`grid_arcs`."""
    arcs = grid_arcs(k)
    inc = np.zeros((k * k, len(arcs)))
    for e, (u, v) in enumerate(arcs):
        inc[u, e], inc[v, e] = 1.0, -1.0
    return inc


def shortest_path_layer(k: int = GRID, solver_args: dict | None = None) -> CvxpyLayer:
    inc = grid_graph(k)
    supply = np.zeros(k * k)
    supply[0], supply[-1] = 1.0, -1.0
    x = cp.Variable(inc.shape[1])
    c = cp.Parameter(inc.shape[1])
    # the sink's conservation row is implied by the others; dropping it keeps the rows independent
    cons = [inc[:-1] @ x == supply[:-1], x >= 0, x <= 1]
    return CvxpyLayer(cp.Problem(cp.Minimize(c @ x), cons), parameters=[c], variables=[x],
                      solver_args=solver_args)


def generate(n: int, deg: int, noise: float, p: int, d: int, seed: int) -> tuple:
    """PyEPO's genData(n, p, grid, deg, noise, seed): the same RandomState stream, draw order and
    float32 costs (returned as float64 tensors)."""
    rnd = np.random.RandomState(seed)
    B = rnd.binomial(1, 0.5, (d, p))
    X = rnd.normal(0, 1, (n, p))
    C = (X @ B.T / np.sqrt(p) + 3) ** deg + 1
    C /= 3.5**deg
    C *= rnd.uniform(1 - noise, 1 + noise, (n, d))
    return torch.as_tensor(X), torch.as_tensor(C.astype(np.float32).astype(np.float64))


def split(n: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices of sklearn's train_test_split(..., test_size=n_test,
    random_state=seed) on n points: the permutation's first n_test indices are the test set."""
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def learning_rate(method: str, args) -> float | None:
    """``--lr`` if given, else the method's own (see LEARNING_RATES); None for the closed-form
    fit, which trains nothing."""
    if method == "two-stage-ls":
        return None
    return args.lr if args.lr is not None else LEARNING_RATES[method]


def train_one(method, layer, Xtr, Ctr, Wtr, Ztr, Xte, Cte, Zte, args, seed,
              deg) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(Xtr.shape[1], Ctr.shape[1]).double()

    def oracle(cost):
        return layer(cost)[0]

    modes = {"qptl": QuadraticSmoothing(args.gamma), "log-barrier": LogBarrier(args.mu),
             "lpgd": LPGD(args.tau)}
    start = time.perf_counter()
    if method == "two-stage-ls":  # closed-form least squares, weights and intercept
        A = torch.cat([Xtr, torch.ones(Xtr.shape[0], 1, dtype=Xtr.dtype)], 1)
        sol = torch.linalg.lstsq(A, Ctr).solution
        with torch.no_grad():
            model.weight.copy_(sol[:-1].T)
            model.bias.copy_(sol[-1])
    epochs = 0 if method == "two-stage-ls" else args.epochs
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate(method, args)) if epochs else None
    bar = tqdm(range(epochs), desc=f"{method:>12} deg={deg} seed={seed}", leave=False,
                disable=None)  # no bar where stderr is not a terminal (logs, the docs' gallery)
    for _ in bar:
        perm = torch.randperm(Xtr.shape[0])
        for i in range(0, Xtr.shape[0], args.batch):
            idx = perm[i: i + args.batch]
            pred, c = model(Xtr[idx]), Ctr[idx]
            if method == "two-stage":
                loss = ((pred - c) ** 2).mean()
            elif method == "spo+":
                loss = spo_plus(pred, c, Wtr[idx], Ztr[idx], oracle)
            elif method == "pfyl":
                loss = perturbed_fenchel_young(pred, Wtr[idx], oracle, sigma=args.sigma,
                                               samples=args.samples)
            else:  # train the true cost of the smoothed / surrogate decision
                (x,) = layer(pred, gradient=modes[method])
                loss = (c * x).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        nreg = float(normalized_regret(model(Xte), Cte, Zte, oracle))
    return nreg, elapsed


def parser() -> argparse.ArgumentParser:
    """The command line's options (also what :func:`figure` reads its labels from)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--degrees", type=int, nargs="+", default=[1, 4],
                    help="polynomial degree of the true cost in the features (1: linear, a "
                         "linear model is well specified; higher: misspecified)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                    help="training methods to compare")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="one run per seed s: PyEPO's genData(..., seed=s) and "
                         "train_test_split(..., random_state=s); s also seeds the model's init")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs per run")
    ap.add_argument("--train", type=int, default=1000, help="training points n")
    ap.add_argument("--test", type=int, default=1000, help="test points")
    ap.add_argument("--validation", type=int, default=0,
                    help="hold out the last K training points and report the regret on them "
                         "instead of the test set (for tuning hyperparameters)")
    ap.add_argument("--noise", type=float, default=0.5, help="ε̄: multiplicative noise half-width")
    ap.add_argument("--batch", type=int, default=32, help="training points per Adam step")
    ap.add_argument("--lr", type=float, default=None,
                    help="Adam's learning rate for every method; None: each method's own, "
                         "chosen on validation data (see LEARNING_RATES)")
    ap.add_argument("--gamma", type=float, default=1.0,
                    help="QPTL smoothing: QuadraticSmoothing(γ) adds γ/2‖x‖²")
    ap.add_argument("--mu", type=float, default=0.1, help="log-barrier parameter")
    ap.add_argument("--tau", type=float, default=5.0, help="LPGD step")
    ap.add_argument("--sigma", type=float, default=1.0, help="PFYL perturbation")
    ap.add_argument("--samples", type=int, default=1, help="PFYL samples per item")
    ap.add_argument("--max-iters", type=int, default=None,
                    help="iteration limit of the native solver; None: its own, 100 (small "
                         "--gamma can need more)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (a linear model and 32 small LPs per step: one is "
                         "fastest)")
    ap.add_argument("--json", help="write the results to this JSON file (folders are created)")
    ap.add_argument("--plot",
                    help="write a bar chart of the regrets to this PNG file (folders are created)")
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    if not 0 <= args.validation < args.train:
        ap.error(f"--validation must be in [0, --train) = [0, {args.train}), received "
                 f"{args.validation}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    layer = shortest_path_layer(solver_args=None if args.max_iters is None
                                else {"max_iters": args.max_iters})
    results: dict = {m: {} for m in args.methods}
    for deg in args.degrees:
        for seed in args.seeds:
            X, C = generate(args.train + args.test, deg, args.noise, 5, 40, seed)
            with torch.no_grad():
                W = layer(C)[0]
            Z = (C * W).sum(1)
            tr, te = (torch.as_tensor(i) for i in split(args.train + args.test, args.test, seed))
            if args.validation:
                tr, te = tr[:-args.validation], tr[-args.validation:]
            for m in args.methods:
                nreg, secs = train_one(m, layer, X[tr], C[tr], W[tr], Z[tr], X[te], C[te], Z[te],
                                       args, seed, deg)
                results[m].setdefault(deg, []).append({"regret": nreg, "seconds": secs})
                tqdm.write(f"{m:>12} deg={deg} seed={seed}: normalized regret "
                           f"{100 * nreg:.2f}%  ({secs:.1f} s)")

    scored = f"validation ({args.validation} held-out training points)" if args.validation \
        else "test"
    spread = f"mean ± std over seeds {args.seeds}" if len(args.seeds) > 1 else \
        f"one seed ({args.seeds[0]})"
    print(f"\nNormalized {scored} regret (%), {spread}, "
          f"{plural(args.epochs, 'epoch')}, n={args.train}, noise={args.noise}")
    print(f"{'method':>12} | " + " | ".join(f"{'deg ' + str(d):>13}" for d in args.degrees)
          + " | s/run")
    table = {}
    for m in args.methods:
        cells, secs = [], []
        for d in args.degrees:
            r = np.array([100 * e["regret"] for e in results[m][d]])
            secs += [e["seconds"] for e in results[m][d]]
            cells.append(f"{r.mean():6.2f} ± {r.std():4.2f}" if len(r) > 1 else f"{r.mean():6.2f}")
            table.setdefault(m, {})[d] = {"mean": float(r.mean()), "std": float(r.std()),
                                          "lr": learning_rate(m, args), "runs": results[m][d]}
        print(f"{m:>12} | " + " | ".join(f"{c:>13}" for c in cells) + f" | {np.mean(secs):5.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "normalized_regret_percent": table}, f, indent=2)
    if args.plot:
        plot(table, args, args.plot)
    return table


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def plot(table, args, path) -> None:
    """Write :func:`figure` to the PNG file ``path`` (folders are created)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(table, args)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def figure(table, args):
    """Grouped bars of mean normalized regret per method and degree (lower is better); error bars
    (one standard deviation over seeds) only when there are several seeds. Returns the figure."""
    import matplotlib.pyplot as plt

    methods, degrees = args.methods, args.degrees
    seeds = len(args.seeds)
    fig, ax = plt.subplots(figsize=(3.2 + 2.0 * len(degrees), 5.0))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        pos = np.arange(len(degrees)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(pos, [table[m][d]["mean"] for d in degrees], width, label=m,
               yerr=[table[m][d]["std"] for d in degrees] if seeds > 1 else None, capsize=2)
    ax.set_xticks(np.arange(len(degrees)), [f"deg {d}" for d in degrees])
    ax.set_xlabel("deg: polynomial degree of the true costs in the features\n"
                  "(deg 1: a linear model is well specified)")
    scored = "validation" if args.validation else "test"
    ax.set_ylabel(f"normalized {scored} regret (%) — lower is better")
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed, no error bars"
    ax.set_title(f"Shortest path on a 5×5 grid: {scored} regret by training method\n"
                 f"n = {args.train} training points, {plural(args.epochs, 'epoch')}, "
                 f"noise ε̄ = {args.noise}, {spread}", fontsize=10)
    ax.grid(axis="y", color="0.9", zorder=0)
    ax.set_axisbelow(True)
    # the legend beside the axes, so it covers no bar
    ax.legend(fontsize=9, title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
