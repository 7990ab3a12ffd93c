"""Learning constraints OptNet-style: recover an unknown polytope from projected points.

An unknown convex polygon ``C = {x : G* x ≤ h*}`` only reveals itself through examples
``(y, x)`` where ``x = Π_C(y)`` is the Euclidean projection of a point ``y`` onto it (inside
points stay put, outside points land on an edge or a vertex). The model is a QP layer whose
constraints are the learned parameters,

.. math::

    \\hat x(y) = \\arg\\min_x \\tfrac12 \\|x - y\\|^2 \\quad\\text{s.t.}\\quad G x \\le h,
    \\qquad G \\in \\mathbb R^{m \\times 2},\\ h \\in \\mathbb R^m \\ (\\texttt{nn.Parameter}),

and ``G, h`` are trained by Adam on the mean squared error ``‖x̂(y) − x‖²``, differentiating
through the QP's KKT conditions (:class:`diffopt.QPLayer`, exact gradients, one batched solve
per step). The learned polytope starts as a large regular ``m``-gon (``m`` is larger than the true
number of edges: the surplus constraints have to become inactive or redundant).

Prints the test MSE and the intersection-over-union (IoU, on a grid) between the learned and
the true polygon, before and after training; ``--plot`` draws the true, initial and learned
polygons with a few training pairs, and the learning curve (default ``optnet_polytope.png``);
``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from diffopt import QPLayer


def true_polygon(n_edges: int, seed: int):
    """A random convex polygon ``G* x ≤ h*`` around the origin (unit normals)."""
    rng = np.random.default_rng(seed)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n_edges))
    angles += 0.6 * (np.linspace(0, 2 * np.pi, n_edges, endpoint=False) - angles)  # spread out
    G = np.stack([np.cos(angles), np.sin(angles)], 1)
    h = rng.uniform(0.5, 1.0, n_edges)
    offset = rng.uniform(-0.3, 0.3, 2)                    # not centred at the origin
    return torch.as_tensor(G), torch.as_tensor(h + G @ offset)


class PolytopeProjection(torch.nn.Module):
    """``y ↦ argmin ½‖x − y‖² s.t. Gx ≤ h`` with learnable ``G, h``."""

    def __init__(self, m: int, radius: float):
        super().__init__()
        a = torch.arange(m, dtype=torch.float64) * 2 * math.pi / m + 0.3
        self.G = torch.nn.Parameter(torch.stack([a.cos(), a.sin()], 1))
        self.h = torch.nn.Parameter(torch.full((m,), radius, dtype=torch.float64))
        self.qp = QPLayer()
        self.register_buffer("eye", torch.eye(2, dtype=torch.float64))

    def forward(self, y):
        return self.qp(self.eye, -y, self.G, self.h)


def project(G, h, y):
    with torch.no_grad():
        return QPLayer()(torch.eye(2, dtype=torch.float64), -y, G, h)


def iou(G1, h1, G2, h2, lim=2.5, n=300) -> float:
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    a = ((pts @ G1.T) <= h1).all(1)
    b = ((pts @ G2.T) <= h2).all(1)
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--true-edges", type=int, default=5, help="edges of the unknown polygon")
    ap.add_argument("--m", type=int, default=8, help="learned constraints (rows of G)")
    ap.add_argument("--train", type=int, default=1024, help="training points")
    ap.add_argument("--test", type=int, default=512, help="test points")
    ap.add_argument("--steps", type=int, default=250, help="Adam steps")
    ap.add_argument("--batch", type=int, default=128, help="points per Adam step")
    ap.add_argument("--lr", type=float, default=0.03, help="Adam learning rate")
    ap.add_argument("--init-radius", type=float, default=1.6, help="radius of the initial polygon")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--plot", default="optnet_polytope.png", help="figure (PNG); '' to skip")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    t0 = time.time()
    torch.manual_seed(args.seed)
    G_true, h_true = true_polygon(args.true_edges, args.seed)
    Y = 1.3 * torch.randn(args.train + args.test, 2, dtype=torch.float64)
    X = project(G_true, h_true, Y)
    Ytr, Xtr, Yte, Xte = Y[: args.train], X[: args.train], Y[args.train:], X[args.train:]

    model = PolytopeProjection(args.m, args.init_radius)
    G0, h0 = model.G.detach().clone(), model.h.detach().clone()

    def test_mse():
        with torch.no_grad():
            return float(((model(Yte) - Xte) ** 2).sum(1).mean())

    mse_before, iou_before = test_mse(), iou(G0, h0, G_true, h_true)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.steps, 1))
    curve = []
    bar = tqdm(range(args.steps), desc="learning G, h")
    for _ in bar:
        idx = torch.randint(0, args.train, (args.batch,))
        loss = ((model(Ytr[idx]) - Xtr[idx]) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        bar.set_postfix(mse=f"{curve[-1]:.2e}")
    G, h = model.G.detach(), model.h.detach()
    mse_after, iou_after = test_mse(), iou(G, h, G_true, h_true)
    seconds = time.time() - t0

    print(f"\nUnknown {args.true_edges}-gon, {args.m} learned constraints, {args.steps} Adam steps "
          f"of {args.batch} pairs ({seconds:.1f} s)")
    print(f"{'':>8} | {'test MSE':>9} | {'IoU':>6}")
    print(f"{'before':>8} | {mse_before:9.2e} | {iou_before:6.3f}")
    print(f"{'after':>8} | {mse_after:9.2e} | {iou_after:6.3f}")
    results = {"mse_before": mse_before, "mse_after": mse_after, "iou_before": iou_before,
               "iou_after": iou_after, "curve": curve, "G": G.tolist(), "h": h.tolist(),
               "seconds": seconds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if args.plot:
        plot(args.plot, (G_true, h_true), (G0, h0), (G, h), Ytr[:40], Xtr[:40], curve)
    return results


def plot(path, true, init, learned, Y, X, curve):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = 2.5
    g = torch.linspace(-lim, lim, 400, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 4.2))
    for (G, h), color, label, fill in ((true, "k", "true polygon", True),
                                       (init, "tab:gray", "initial", False),
                                       (learned, "tab:red", "learned", False)):
        viol = ((pts @ G.T) - h).max(-1).values
        if fill:
            ax.contourf(g, g, viol, levels=[-10, 0], colors=["0.85"])
        ax.contour(g, g, viol, levels=[0], colors=[color],
                   linestyles="--" if label == "initial" else "-",
                   linewidths=3.5 if fill else 1.5)
        ax.plot([], [], color=color, ls="--" if label == "initial" else "-", label=label,
                lw=3.5 if fill else 1.5)
    ax.plot(Y[:, 0], Y[:, 1], ".", color="tab:blue", ms=4, label="input y")
    for y, x in zip(Y, X):
        ax.plot([y[0], x[0]], [y[1], x[1]], color="tab:blue", lw=0.5, alpha=0.6)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("pairs (y, Π_C(y)) and polygons")
    ax2.semilogy(curve)
    ax2.set_xlabel("Adam step")
    ax2.set_ylabel("training MSE (batch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
