r"""
Why LP gradients vanish, and what the surrogates return instead
===============================================================

A linear program's solution sits at a vertex of its feasible set, so as the cost vector moves the
solution *jumps* from vertex to vertex: :math:`x^\star(c)` is piecewise constant, and its exact
derivative is zero wherever it exists (and undefined at the ties where it jumps). This example
makes that visible on the smallest LP there is, the probability simplex in three dimensions,

.. math::

    x^\star(c) = \arg\min_x\ c^\top x \quad\text{s.t.}\quad x_1 + x_2 + x_3 = 1,\ x \ge 0,

along the slice :math:`c(t) = (t,\ 0,\ 1 - t)` of costs: vertex :math:`e_1` is optimal for
:math:`t < 0`, :math:`e_2` for :math:`0 < t < 1` and :math:`e_3` for :math:`t > 1`. We follow
the scalar :math:`y(t) = x_3^\star - x_1^\star` (the "position" of the decision: −1, 0 or +1),
and its derivative :math:`dy/dt`, which every gradient mode of :class:`diffopt.CvxpyLayer`
computes by ordinary autograd (``y.sum().backward()`` with respect to ``t``).

Runs in a few seconds on a CPU: ``python examples/plot_lp_surrogates.py`` (writes
``lp_surrogates.png``). See :doc:`/lp_gradients` for the formulas behind each curve.
"""

import sys
import time

import cvxpy as cp
import matplotlib.pyplot as plt
import numpy as np
import torch

from diffopt import LPGD, CvxpyLayer, Exact, LogBarrier, Perturbed, QuadraticSmoothing

start = time.perf_counter()

# %%
# The layer: an LP whose only parameter is the cost
# -------------------------------------------------
# With the default ``solver="auto"`` an LP goes to diffopt's native batched interior-point
# solver, so the whole slice (and, for the perturbed mode, every Monte-Carlo sample) is one
# batched solve.

x = cp.Variable(3)
c = cp.Parameter(3)
layer = CvxpyLayer(cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0]),
                   parameters=[c], variables=[x])

# c(t) = c0 + t * direction
c0 = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
direction = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
# 250 points: the grid steps over the ties at t = 0 and t = 1
# instead of landing on them.
ts = np.linspace(-1.5, 2.5, 250)


def slice_curve(mode):
    """y(t) = x3* - x1* along the slice, and dy/dt from the backward pass."""
    t = torch.tensor(ts, dtype=torch.float64, requires_grad=True)
    cost = c0 + t[:, None] * direction
    (sol,) = layer(cost, gradient=mode)
    y = sol[:, 2] - sol[:, 0]
    y.sum().backward()  # independent items: t.grad[i] = dy_i/dt_i
    return y.detach().numpy(), t.grad.numpy()


# %%
# Every mode along the slice
# --------------------------
# Two smoothing levels per surrogate. ``Perturbed`` is a Monte-Carlo estimate: 100 samples per
# point, seeded so that the figure is reproducible. ``LPGD`` keeps the exact forward pass and
# only changes the backward pass, so we plot its derivative alone.

y_exact, d_exact = slice_curve(Exact())
panels = {
    "QuadraticSmoothing(γ)": [
        (f"γ = {g}", QuadraticSmoothing(gamma=g)) for g in (0.25, 1.0)],
    "LogBarrier(μ)": [
        (f"μ = {m}", LogBarrier(mu=m)) for m in (0.02, 0.1)],
    "Perturbed(σ, samples=100)": [
        (f"σ = {s}", Perturbed(sigma=s, samples=100, seed=0)) for s in (0.1, 0.3)],
    "LPGD(τ)  (backward only)": [
        (f"τ = {tau}", LPGD(tau=tau)) for tau in (0.25, 1.0)],
}
curves = {name: [(label, *slice_curve(mode)) for label, mode in modes]
          for name, modes in panels.items()}

print(f"exact LP: max |dy/dt| over the slice = {np.abs(d_exact).max():.1e}")
probe = [0.5, 0.9]  # inside the middle flat piece, and close to the tie at t = 1
idx = [int(np.abs(ts - p).argmin()) for p in probe]
print("dy/dt at t ≈ " + ", ".join(f"{ts[i]:.3f}" for i in idx) + " (exact: 0 there)")
for name, rows in curves.items():
    for label, _, d in rows:
        values = "".join(f"{d[i]:9.3f}" for i in idx)
        print(f"  {name.split('(')[0]:<18} {label:<9}{values}")

# %%
# The figure
# ----------
# Top row: the value returned by the forward pass, against the exact staircase (grey). Bottom
# row: the derivative returned by the backward pass. The exact derivative is zero everywhere
# on the grid; each surrogate spreads the two jumps of height 1 into bumps whose area is
# (close to) 1, of width set by its smoothing parameter.

fig, axes = plt.subplots(2, 4, figsize=(13, 5.6), sharex=True, sharey="row")
colors = ["tab:blue", "tab:orange"]
for col, (name, rows) in enumerate(curves.items()):
    top, bottom = axes[0, col], axes[1, col]
    top.plot(ts, y_exact, color="0.6", lw=2.5, label="exact LP")
    bottom.plot(ts, d_exact, color="0.6", lw=2.5, label="exact LP")
    for (label, y, d), color in zip(rows, colors):
        if not name.startswith("LPGD"):
            top.plot(ts, y, color=color, lw=1.4, label=label)
        bottom.plot(ts, d, color=color, lw=1.4, label=label)
    top.set_title(name, fontsize=10)
    top.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel("t   (cost c = (t, 0, 1 − t))")
    for ax in (top, bottom):
        ax.axvline(0, color="0.85", lw=0.8, zorder=0)
        ax.axvline(1, color="0.85", lw=0.8, zorder=0)
axes[0, 3].text(0.5, -0.6, "forward pass =\nexact solution", ha="center", fontsize=8,
                color="0.3")
axes[0, 0].set_ylabel("y = x₃* − x₁*  (forward)")
axes[1, 0].set_ylabel("dy/dt  (backward)")
fig.suptitle("A 3-vertex LP along a line of costs: "
             "solution and derivative per gradient mode", fontsize=11)
fig.tight_layout()

print(f"total time {time.perf_counter() - start:.1f} s")

# %%
# Run as a script (not by the docs build), save the figure in the working directory.
if __name__ == "__main__" and "sphinx_gallery" not in sys.modules:
    fig.savefig("lp_surrogates.png", dpi=120)
    print("wrote lp_surrogates.png")
