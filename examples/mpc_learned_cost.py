"""Model-predictive control with a learned cost: imitate an expert's closed loop through QPs.

A point mass in the plane (state ``x = (p_x, p_y, v_x, v_y)``, input ``u`` = acceleration,
``|u_i| ≤ u_max``, time step ``Δt``) is steered to the origin by MPC. At every time step the
controller solves the horizon-``H`` problem

.. math::

    \\min_{u_0..u_{H-1}} \\sum_{k=1}^{H} x_k^\\top Q x_k + \\sum_{k=0}^{H-1} u_k^\\top R u_k
    \\quad\\text{s.t.}\\quad x_{k+1} = A x_k + B u_k,\\ \\ x_0 = x(t),\\ \\ |u_k| \\le u_{\\max},

written in condensed form as a QP in ``u`` alone (``x_k = A^k x_0 + Σ_j A^{k-1-j} B u_j``), and
applies ``u_0``. An expert uses unknown diagonal weights ``Q*, R*``; we observe its closed-loop
trajectories from a few initial states and learn diagonal ``Q = diag(e^{θ_Q})``,
``R = diag(e^{θ_R})`` (``θ`` centred: the policy does not change when the cost is scaled) by
minimizing the imitation loss

.. math::

    \\ell(\\theta) = \\frac1{NT} \\sum_{i,t} \\|x_t^{(i)}(\\theta) - x_t^{(i)*}\\|^2
    + \\|u_t^{(i)}(\\theta) - u_t^{(i)*}\\|^2

over the whole closed loop: ``T`` MPC solves in sequence, each one batched over the ``N``
initial states, with the gradient flowing back through every QP (:class:`diffopt.QPLayer`, exact
KKT derivatives, active input bounds included) and through the dynamics.

Prints the imitation loss on held-out initial states and the learned versus expert weights,
before and after training; ``--plot`` (default ``mpc_learned_cost.png``) draws closed-loop paths
and inputs of the expert and of the controller before and after, and the learning curve;
``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from diffopt import QPLayer

NAMES = ["Q_px", "Q_py", "Q_vx", "Q_vy", "R_ux", "R_uy"]


class MPC:
    """Condensed MPC for ``x⁺ = Ax + Bu`` with box-constrained inputs; ``policy`` is batched."""

    def __init__(self, dt: float, horizon: int, u_max: float):
        I2, Z2 = torch.eye(2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)
        self.A = torch.cat([torch.cat([I2, dt * I2], 1), torch.cat([Z2, I2], 1)], 0)
        self.B = torch.cat([0.5 * dt ** 2 * I2, dt * I2], 0)
        nx, nu, H = 4, 2, horizon
        self.H, self.nu, self.u_max = H, nu, u_max
        # x_{1..H} = Phi x0 + Gamma u
        self.Phi = torch.cat([torch.linalg.matrix_power(self.A, k) for k in range(1, H + 1)], 0)
        self.Gamma = torch.zeros(H * nx, H * nu, dtype=torch.float64)
        for k in range(H):
            for j in range(k + 1):
                self.Gamma[k * nx:(k + 1) * nx, j * nu:(j + 1) * nu] = (
                    torch.linalg.matrix_power(self.A, k - j) @ self.B)
        eye = torch.eye(H * nu, dtype=torch.float64)
        self.G = torch.cat([eye, -eye], 0)
        self.h = torch.full((2 * H * nu,), u_max, dtype=torch.float64)
        self.qp = QPLayer()

    def policy(self, x0, q_diag, r_diag):
        """First input of the MPC plan for a batch of states ``x0 (N, 4)``."""
        Qbar = q_diag.repeat(self.H)                                  # (H*nx,)
        Rbar = r_diag.repeat(self.H)                                  # (H*nu,)
        P = 2 * (self.Gamma.T @ (Qbar[:, None] * self.Gamma) + torch.diag(Rbar))
        q = 2 * (x0 @ self.Phi.T * Qbar) @ self.Gamma                 # (N, H*nu)
        u = self.qp(P, q, self.G, self.h)
        return u[:, : self.nu]

    def closed_loop(self, x0, q_diag, r_diag, steps):
        xs, us = [x0], []
        x = x0
        for _ in range(steps):
            u = self.policy(x, q_diag, r_diag)
            x = x @ self.A.T + u @ self.B.T
            xs.append(x)
            us.append(u)
        return torch.stack(xs, 1), torch.stack(us, 1)                # (N, T+1, 4), (N, T, 2)


def weights(theta):
    w = torch.exp(theta - theta.mean())
    return w[:4], w[4:]


def initial_states(n, seed):
    g = torch.Generator().manual_seed(seed)
    p = 4 * torch.rand(n, 2, generator=g, dtype=torch.float64) - 2
    v = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return torch.cat([p, v], 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--horizon", type=int, default=10, help="MPC horizon (steps)")
    ap.add_argument("--steps", type=int, default=20, help="closed-loop time steps")
    ap.add_argument("--dt", type=float, default=0.2, help="time step (s)")
    ap.add_argument("--u-max", type=float, default=1.0, help="bound on each control")
    ap.add_argument("--train", type=int, default=8, help="initial states for training")
    ap.add_argument("--test", type=int, default=16, help="held-out initial states")
    ap.add_argument("--iters", type=int, default=120, help="Adam steps on the cost weights")
    ap.add_argument("--lr", type=float, default=0.15, help="Adam learning rate")
    ap.add_argument("--expert", type=float, nargs=6, default=[10.0, 1.0, 0.5, 2.0, 0.2, 1.0],
                    metavar=tuple(NAMES), help="expert's diagonal Q (4) and R (2)")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--plot", default="mpc_learned_cost.png", help="figure (PNG); '' to skip")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    t0 = time.time()
    mpc = MPC(args.dt, args.horizon, args.u_max)
    theta_star = torch.log(torch.tensor(args.expert, dtype=torch.float64))
    q_star, r_star = weights(theta_star)
    x_tr, x_te = initial_states(args.train, args.seed), initial_states(args.test, args.seed + 1)
    with torch.no_grad():
        expert_tr = mpc.closed_loop(x_tr, q_star, r_star, args.steps)
        expert_te = mpc.closed_loop(x_te, q_star, r_star, args.steps)

    def imitation(x0, expert, theta):
        xs, us = mpc.closed_loop(x0, *weights(theta), args.steps)
        loss = ((xs - expert[0]) ** 2).sum(-1).mean() + ((us - expert[1]) ** 2).sum(-1).mean()
        return loss, (xs, us)

    theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)  # Q = I, R = I
    with torch.no_grad():
        test_before, traj_before = imitation(x_te, expert_te, theta)
    theta_before = theta.detach().clone()
    opt = torch.optim.Adam([theta], lr=args.lr)
    curve = []
    bar = tqdm(range(args.iters), desc="learning Q, R")
    for _ in bar:
        loss, _ = imitation(x_tr, expert_tr, theta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
        bar.set_postfix(loss=f"{curve[-1]:.2e}")
    with torch.no_grad():
        test_after, traj_after = imitation(x_te, expert_te, theta)
        train_after, _ = imitation(x_tr, expert_tr, theta)
    curve.append(float(train_after))
    seconds = time.time() - t0

    w_star = torch.cat(weights(theta_star))
    w_before, w_after = torch.cat(weights(theta_before)), torch.cat(weights(theta.detach()))
    print(f"\nMPC (H = {args.horizon}, |u| ≤ {args.u_max}), {args.steps} closed-loop steps, "
          f"{args.train} training / {args.test} test initial states ({seconds:.1f} s)")
    print(f"test imitation loss: {float(test_before):.4f} (Q = R = I) -> {float(test_after):.2e}")
    print("weights (normalized: geometric mean 1)")
    print(f"{'':>8} | " + " | ".join(f"{n:>6}" for n in NAMES))
    for label, w in (("expert", w_star), ("before", w_before), ("learned", w_after)):
        print(f"{label:>8} | " + " | ".join(f"{float(v):6.3f}" for v in w))
    saturated = float((expert_te[1].abs() > args.u_max - 1e-6).double().mean())
    print(f"fraction of expert test inputs at the bound: {saturated:.2f}")
    results = {"test_loss_before": float(test_before), "test_loss_after": float(test_after),
               "weights_expert": w_star.tolist(), "weights_before": w_before.tolist(),
               "weights_learned": w_after.tolist(), "curve": curve,
               "saturated_fraction": saturated, "seconds": seconds}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if args.plot:
        plot(args.plot, args, expert_te, traj_before, traj_after, curve)
    return results


def plot(path, args, expert, before, after, curve):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    styles = (("expert", expert, "k", "-"), ("Q = R = I", before, "tab:blue", ":"),
              ("learned", after, "tab:red", "--"))
    ax = axes[0]
    for i in range(min(6, expert[0].shape[0])):
        for label, (xs, _), color, ls in styles:
            ax.plot(xs[i, :, 0], xs[i, :, 1], color=color, ls=ls, lw=1.3,
                    label=label if i == 0 else None)
        ax.plot(*expert[0][i, 0, :2].tolist(), "ko", ms=4)
    ax.plot(0, 0, "k*", ms=10)
    ax.set_aspect("equal")
    ax.set_xlabel("p_x")
    ax.set_ylabel("p_y")
    ax.set_title("closed-loop paths (test states)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    t = np.arange(args.steps) * args.dt
    for label, (_, us), color, ls in styles:
        ax.step(t, us[0, :, 0], where="post", color=color, ls=ls, label=f"u_x, {label}")
        ax.step(t, us[0, :, 1], where="post", color=color, ls=ls, alpha=0.5)
    ax.axhline(args.u_max, color="0.6", lw=0.8)
    ax.axhline(-args.u_max, color="0.6", lw=0.8)
    ax.set_xlabel("time")
    ax.set_ylabel("input (u_x dark, u_y light)")
    ax.set_title("inputs of test state 0", fontsize=10)
    ax.legend(fontsize=7)
    axes[2].semilogy(curve)
    axes[2].set_xlabel("Adam step")
    axes[2].set_ylabel("training imitation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
