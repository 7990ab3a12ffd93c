"""
SDP layer: learning the metric of a max-cut relaxation
======================================================

Learn the edge weights (a metric) that make a max-cut relaxation find the clusters.

Each graph has ``n`` nodes with features ``x_i ∈ R^d``; its nodes belong to two hidden groups
``s ∈ {±1}^n`` that only the first feature reveals (the other features are noise of larger
scale). Edge weights come from a learned metric, ``w_ij = ‖A(x_i − x_j)‖²`` (normalized to mean
one), and the partition is computed by the Goemans–Williamson semidefinite relaxation of
max-cut, slightly regularized so that its solution is unique and smooth in ``W``:

.. math::

    X^\\star(W) = \\arg\\min_{X \\succeq 0} \\ \\langle W, X \\rangle + \\tfrac\\gamma2 \\|X\\|_F^2
    \\quad\\text{s.t.}\\quad X_{ii} = 1

(maximizing the cut ``¼ Σ w_ij (1 − X_ij)``; ``X = ssᵀ`` for an exact cut ``s``). The layer is a
:class:`diffopt.CvxpyLayer` on the PSD cone (Clarabel, exact KKT gradients), batched over graphs.
``A`` is trained by Adam so that ``X*`` matches the hidden partition, with the loss
``‖X* − ssᵀ‖_F² / n²``. A partition is read off ``X*`` by the sign of its top eigenvector.

Prints the test loss and the partition accuracy (fraction of nodes on the right side, up to the
global flip) before and after training, and the learned metric ``AᵀA``; ``--plot`` (default
``plot_sdp_maxcut.png``) draws the test graph with the worst initial partition before and after,
and the learning curve; ``--json`` writes the numbers. Runs in a few seconds on a CPU:
``python examples/plot_sdp_maxcut.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import cvxpy as cp
import numpy as np
import torch
from tqdm import tqdm

from diffopt import CvxpyLayer

# %%
# The data: graphs whose nodes fall into two hidden groups
# --------------------------------------------------------
# Only feature 0 carries the group (``±0.8`` plus small noise); the other features are unit-scale
# noise, so with the identity metric the edge weights are dominated by noise and the cut is
# close to random.


def make_graphs(n_graphs: int, n: int, d: int, seed: int):
    """Features ``(G, n, d)`` and hidden ±1 labels ``(G, n)`` (balanced)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.ones(n_graphs, n, dtype=torch.float64)
    s[:, n // 2:] = -1
    s = s[:, torch.randperm(n, generator=g)]
    x = 1.0 * torch.randn(n_graphs, n, d, generator=g, dtype=torch.float64)
    x[:, :, 0] = 0.8 * s + 0.3 * torch.randn(n_graphs, n, generator=g, dtype=torch.float64)
    return x, s


# %%
# The layer: the regularized Goemans–Williamson relaxation
# --------------------------------------------------------
# One :class:`diffopt.CvxpyLayer` with a symmetric parameter ``W`` and a PSD variable ``X``; a
# batch of weight matrices ``(G, n, n)`` is solved as one batch, and ``X*`` is differentiated
# through the KKT conditions of the conic program.


def maxcut_layer(n: int, gamma: float) -> CvxpyLayer:
    X = cp.Variable((n, n), PSD=True)
    W = cp.Parameter((n, n), symmetric=True)
    obj = cp.sum(cp.multiply(W, X)) + gamma / 2 * cp.sum_squares(X)
    return CvxpyLayer(cp.Problem(cp.Minimize(obj), [cp.diag(X) == 1]), parameters=[W],
                      variables=[X])


# %%
# The learned metric and the rounding
# -----------------------------------
# Edge weights are squared distances under the metric ``AᵀA``; a cut is read off ``X*`` by the
# signs of its top eigenvector (accuracy is taken up to the global flip of the two sides).


def weights(A, x):
    diff = (x.unsqueeze(2) - x.unsqueeze(1)) @ A.T                  # (G, n, n, d)
    W = (diff ** 2).sum(-1)
    return W / W.mean(dim=(1, 2), keepdim=True)


def accuracy(X, s) -> torch.Tensor:
    """Per graph: fraction of nodes on the right side of the rounded cut (up to the flip)."""
    v = torch.linalg.eigh(X).eigenvectors[..., -1]                   # top eigenvector
    agree = (torch.sign(v) == s).double().mean(1)
    return torch.maximum(agree, 1 - agree)


# %%
# Training
# --------
# Adam on ``A`` through the layer: each step solves a batch of training graphs and back-propagates
# the loss ``‖X* − ssᵀ‖_F² / n²``. ``main`` parses the command line (``--help`` lists the options);
# ``keep_figure`` leaves the figure open for the docs build instead of writing a file.


def main(argv=None, keep_figure: bool = False) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10, help="nodes per graph")
    ap.add_argument("--features", type=int, default=4, help="features per node (one informative)")
    ap.add_argument("--train", type=int, default=64, help="training graphs")
    ap.add_argument("--test", type=int, default=64, help="test graphs")
    ap.add_argument("--steps", type=int, default=60, help="Adam steps")
    ap.add_argument("--batch", type=int, default=16, help="graphs per Adam step")
    ap.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    ap.add_argument("--gamma", type=float, default=0.2, help="Frobenius regularization of X")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--plot", default="plot_sdp_maxcut.png", help="figure (PNG); '' to skip")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, keep_figure)
    finally:
        torch.set_num_threads(threads)


def _run(args, keep_figure: bool) -> dict:
    t0 = time.time()
    torch.manual_seed(args.seed)
    xtr, s_tr = make_graphs(args.train, args.nodes, args.features, args.seed)
    xte, s_te = make_graphs(args.test, args.nodes, args.features, args.seed + 1)
    layer = maxcut_layer(args.nodes, args.gamma)
    A = torch.eye(args.features, dtype=torch.float64, requires_grad=True)

    def loss_fn(X, s):
        return ((X - s.unsqueeze(2) * s.unsqueeze(1)) ** 2).mean()

    def test():
        with torch.no_grad():
            (X,) = layer(weights(A, xte))
        acc = accuracy(X, s_te)
        return float(loss_fn(X, s_te)), float(acc.mean()), X, acc

    loss_before, acc_before, X_before, per_graph = test()
    opt = torch.optim.Adam([A], lr=args.lr)
    curve = []
    # no bar when not on a terminal (a docs build or a log would keep every frame)
    bar = tqdm(range(args.steps), desc="learning the metric", disable=None)
    for _ in bar:
        idx = torch.randint(0, args.train, (args.batch,))
        (X,) = layer(weights(A, xtr[idx]))
        loss = loss_fn(X, s_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
        bar.set_postfix(loss=f"{curve[-1]:.3f}")
    loss_after, acc_after, X_after, _ = test()
    M = (A.T @ A).detach()
    M = M / M.abs().max()
    seconds = time.time() - t0

    print(f"\nMax-cut SDP on {args.test} test graphs of {args.nodes} nodes "
          f"({args.steps} Adam steps, {seconds:.1f} s)")
    print(f"{'':>8} | {'test loss':>9} | {'partition accuracy':>18}")
    print(f"{'before':>8} | {loss_before:9.4f} | {acc_before:18.3f}")
    print(f"{'after':>8} | {loss_after:9.4f} | {acc_after:18.3f}")
    print("learned metric AᵀA (scaled to max |entry| = 1; only feature 0 is informative):")
    print(np.array2string(M.numpy(), precision=3, suppress_small=True))
    results = {"loss_before": loss_before, "loss_after": loss_after, "acc_before": acc_before,
               "acc_after": acc_after, "metric": M.tolist(), "curve": curve, "seconds": seconds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if args.plot or keep_figure:
        import matplotlib.pyplot as plt

        k = int(per_graph.argmin())                                  # the hardest test graph
        fig = plot(xte[k], s_te[k], X_before[k], X_after[k], curve)
        if args.plot:
            fig.savefig(args.plot, dpi=120)
            print(f"wrote {args.plot}")
        if not keep_figure:
            plt.close(fig)
    return results


# %%
# The figure
# ----------
# Left and middle: the test graph whose initial cut is worst, drawn in its first two features,
# before and after learning the metric. Right: the training loss per Adam step.


def plot(x, s, X_before, X_after, curve):
    """The before/after partitions of one test graph and the learning curve; returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, X, title in ((axes[0], X_before, "before: metric A = I"),
                         (axes[1], X_after, "after: learned metric")):
        v = torch.linalg.eigh(X).eigenvectors[:, -1]
        side = torch.sign(v) * torch.sign((torch.sign(v) * s).sum() + 0.5)  # align the flip
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                if side[i] != side[j]:
                    ax.plot(x[[i, j], 0], x[[i, j], 1], color="0.8", lw=0.6, zorder=0)
        for lab, marker in ((1.0, "o"), (-1.0, "s")):
            m = s == lab
            ax.scatter(x[m, 0], x[m, 1], c=np.where(side[m] > 0, "tab:red", "tab:blue"),
                       marker=marker, s=60, edgecolors="k", zorder=2)
        acc = float((side == s).double().mean())
        ax.set_title(f"{title}: {acc:.0%} correct", fontsize=10)
        ax.set_xlabel("feature 0 (informative)")
        ax.set_ylabel("feature 1 (noise)")
    fig.suptitle("test graph with the worst initial cut — marker: hidden group, colour: side of "
                 "the rounded SDP cut, grey: cut edges", fontsize=9)
    axes[2].plot(curve)
    axes[2].set_xlabel("Adam step")
    axes[2].set_ylabel("training loss ‖X* − ssᵀ‖² / n²")
    fig.tight_layout()
    return fig


# %%
# Run
# ---
# From the command line, with the options of ``--help``; in the docs build, with the defaults and
# the figure shown below instead of written to a file.

if __name__ == "__main__":
    if "sphinx_gallery" in sys.modules:
        main(["--plot", ""], keep_figure=True)
    else:
        main()
