r"""Differentiable physics: learn a throw through a rollout whose every time step solves a QP.

Two disks move in the plane above a floor ``y = 0`` under gravity and a light linear drag. Ball A
is thrown from a fixed point with an initial velocity ``v0`` that we learn; ball B rests on the
floor. Contact is handled the way rigid-body engines do it (velocity-level time stepping, an LCP
written as a QP): at every step the new velocity of both balls is the mass-weighted projection of
the unconstrained velocity onto the velocities that do not penetrate,

.. math::

    v_{t+1} = \arg\min_v \tfrac12 (v - \tilde v)^\top M (v - \tilde v)
    \quad\text{s.t.}\quad n_k^\top J_k v \ge b_k \quad (k = \text{A–floor, B–floor, A–B}),

    \tilde v = (1 - c\,\Delta t)\, v_t + \Delta t\, g, \qquad p_{t+1} = p_t + \Delta t\, v_{t+1},

    b_k = e_k u_k \ \text{ if an impact happens during the step } (u_k \Delta t > d_k
    \text{ and } u_k > v_{\text{rest}}), \qquad b_k = -d_k / \Delta t \ \text{ otherwise},

where ``d_k`` is the current gap of contact ``k`` (height minus radius, or centre distance minus
both radii), ``n_k`` its normal (for the ball pair, linearized at the current positions),
``u_k = -n_kᵀ J_k ṽ`` the approach speed and ``e_k`` the coefficient of restitution: an impact
leaves with the fraction ``e_k`` of its normal speed (Newton's law; the QP splits the impulse
according to the masses), slower contacts only may not penetrate (``-d_k/Δt`` lets a ball close
the gap exactly). Setting the bounce speed directly, rather than through the gap, keeps the step
map smooth in the state, so gradients through impacts are well behaved. The constraints'
Lagrange multipliers are the contact impulses. Each step is one call of :class:`diffopt.QPLayer`
(4 variables, 3 constraints), batched over several throws simulated together.

The loss is the squared distance between ball B's position at the final time and a target: ball
A has to knock B so that B (sliding on the floor, slowed by the drag) ends up at the target. The
gradient of the loss with respect to ``v0`` flows back through all time steps, i.e. through every
contact QP (exact KKT derivatives), and ``v0`` is learned by Adam. With ``--targets`` several
throws, each with its own target, are optimized in one batched rollout. (The loss is not convex
in ``v0``: a very different throw can hit B from above or twice; the default initial guess hits
B once, in flight, and training moves it to the throws that send B to the targets.)

Prints the loss per target before and after training and the learned initial velocities;
``--plot`` draws the trajectories before and after training and the loss curve (default
``differentiable_simulation.png``), ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from diffopt import QPLayer


class ContactSim:
    """Two disks on a floor; one QP per step, batched over independent scenes."""

    def __init__(self, radius=(0.15, 0.2), mass=(1.0, 2.0), dt=0.025,
                 restitution=(0.6, 0.9), drag=0.5, rest_speed=0.5, gravity=9.81):
        self.r = torch.tensor(radius, dtype=torch.float64)
        self.mass = torch.tensor(mass, dtype=torch.float64)
        self.dt = dt
        self.e = torch.tensor([restitution[0], restitution[0], restitution[1]],
                              dtype=torch.float64)  # floor A, floor B, pair
        self.drag, self.rest_speed = drag, rest_speed
        self.g = torch.tensor([0.0, -gravity], dtype=torch.float64)
        self.M = torch.diag(self.mass.repeat_interleave(2))          # (4, 4)
        self.layer = QPLayer()

    def constraints(self, p, v_free):
        """Rows ``n_kᵀ J_k v ≥ b_k`` as ``G v ≤ h`` (``G = -N``, ``h = -b``), batched."""
        B = p.shape[0]
        rows, gaps = [], []
        for i in range(2):  # floor contact of each ball
            row = p.new_zeros(B, 4)
            row[:, 2 * i + 1] = 1.0
            rows.append(row)
            gaps.append(p[:, i, 1] - self.r[i])
        d = p[:, 1] - p[:, 0]                                        # A -> B
        dist = d.norm(dim=1, keepdim=True)
        n = d / dist
        rows.append(torch.cat([-n, n], dim=1))                       # n·(v_B - v_A) >= b
        gaps.append(dist[:, 0] - self.r.sum())
        N = torch.stack(rows, dim=1)                                 # (B, 7, 4)
        gap = torch.stack(gaps, dim=1)                               # (B, 7)
        speed = -(N @ v_free.reshape(B, 4, 1)).squeeze(-1)          # approach speed
        bounce = (speed * self.dt > gap) & (speed > self.rest_speed)  # impact within this step
        b = torch.where(bounce, self.e * speed, -gap / self.dt)
        return -N, -b

    def rollout(self, p0, v0, steps):
        """Positions ``(steps + 1, B, 2, 2)`` of both balls, differentiable w.r.t. ``p0, v0``."""
        p, v = p0, v0
        traj = [p]
        for _ in range(steps):
            v_free = (1 - self.drag * self.dt) * v + self.dt * self.g
            G, h = self.constraints(p, v_free)
            vf = v_free.reshape(-1, 4)
            v = self.layer(self.M, -(vf @ self.M), G, h).reshape(-1, 2, 2)
            p = p + self.dt * v
            traj.append(p)
        return torch.stack(traj)


def initial_state(sim, n_scenes):
    p = torch.tensor([[0.4, 1.2], [2.2, 0.0]], dtype=torch.float64)
    p[1, 1] = sim.r[1]                                               # B rests on the floor
    return p.expand(n_scenes, 2, 2).clone()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="time steps of the rollout")
    ap.add_argument("--dt", type=float, default=0.025, help="time step (s)")
    ap.add_argument("--iters", type=int, default=40, help="gradient steps on v0")
    ap.add_argument("--lr", type=float, default=0.05, help="Adam step (cosine-annealed)")
    ap.add_argument("--targets", type=float, nargs="+", default=[3.8, 4.2],
                    help="x positions (on the floor) where ball B must be at the final time")
    ap.add_argument("--v0", type=float, nargs=2, default=[3.2, 0.5],
                    help="initial guess of ball A's launch velocity")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny QPs: 1 is fastest)")
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--plot", default="differentiable_simulation.png",
                    help="trajectory figure (PNG); '' to skip")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    t_start = time.time()
    sim = ContactSim(dt=args.dt)
    K = len(args.targets)
    p0 = initial_state(sim, K)
    target = torch.stack([torch.tensor(args.targets, dtype=torch.float64),
                          sim.r[1].expand(K)], dim=1)                 # (K, 2)
    v0 = torch.tensor(args.v0, dtype=torch.float64).repeat(K, 1).requires_grad_(True)
    opt = torch.optim.Adam([v0], lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(args.iters, 1))

    def loss_of(traj):
        return ((traj[-1, :, 1] - target) ** 2).sum(1)               # per scene

    def rollout(v):
        vel = torch.zeros(K, 2, 2, dtype=torch.float64)
        vel = torch.cat([v.unsqueeze(1), vel[:, 1:]], dim=1)
        return sim.rollout(p0, vel, args.steps)

    with torch.no_grad():
        traj_before = rollout(v0)
    loss_before = loss_of(traj_before)
    curve = []
    bar = tqdm(range(args.iters), desc="training v0")
    for _ in bar:
        per_scene = loss_of(rollout(v0))
        loss = per_scene.sum()
        curve.append(float(per_scene.detach().mean()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{curve[-1]:.4f}")
    with torch.no_grad():
        traj_after = rollout(v0)
        loss_after = loss_of(traj_after)
    curve.append(float(loss_after.mean()))

    print(f"\nBall B to targets x = {args.targets} after {args.steps} steps of dt = {args.dt}")
    print(f"{'scene':>6} | {'target':>6} | {'loss before':>11} | {'loss after':>10} | learned v0")
    v_learned = v0.detach()
    for k in range(K):
        print(f"{k:>6} | {args.targets[k]:6.2f} | {float(loss_before[k]):11.4f} | "
              f"{float(loss_after[k]):10.2e} | ({float(v_learned[k, 0]):.3f}, "
              f"{float(v_learned[k, 1]):.3f})")
    print(f"mean loss: {float(loss_before.mean()):.4f} -> {float(loss_after.mean()):.2e} "
          f"({args.iters} Adam steps, {time.time() - t_start:.1f} s)")
    results = {
        "loss_before": float(loss_before.mean()), "loss_after": float(loss_after.mean()),
        "loss_before_per_target": loss_before.tolist(),
        "loss_after_per_target": loss_after.tolist(),
        "v0_learned": v0.detach().tolist(), "curve": curve,
        "seconds": time.time() - t_start,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    if args.plot:
        plot(args.plot, sim, traj_before, traj_after, target, curve)
    return results


def plot(path, sim, before, after, target, curve):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    K = target.shape[0]
    fig, axes = plt.subplots(1, K + 1, figsize=(4.2 * K + 3.5, 3.4),
                             gridspec_kw={"width_ratios": [4] * K + [3]})
    for k in range(K):
        ax = axes[k]
        for traj, style, label in ((before, ":", "before"), (after, "-", "after")):
            for i, color in ((0, "tab:blue"), (1, "tab:orange")):
                ax.plot(traj[:, k, i, 0], traj[:, k, i, 1], style, color=color, lw=1.5,
                        label=f"ball {'AB'[i]}, {label}")
        for i, color in ((0, "tab:blue"), (1, "tab:orange")):
            ax.add_patch(Circle(after[0, k, i].tolist(), float(sim.r[i]), color=color, alpha=0.3))
            ax.add_patch(Circle(after[-1, k, i].tolist(), float(sim.r[i]), fill=False,
                                color=color, lw=1.5))
            ax.add_patch(Circle(before[-1, k, i].tolist(), float(sim.r[i]), fill=False,
                                color=color, lw=1, ls=":"))
        ax.plot(*target[k].tolist(), "kx", ms=10, mew=2, label="target for B")
        ax.axhline(0, color="k", lw=1)
        ax.set_xlim(-0.2, max(5.0, float(target[:, 0].max()) + 0.5))
        ax.set_ylim(-0.1, 1.8)
        ax.set_aspect("equal")
        ax.set_title(f"scene {k}: target x = {float(target[k, 0]):.2f}")
        if k == 0:
            ax.legend(fontsize=7, loc="upper right")
    axes[-1].semilogy(curve)
    axes[-1].set_xlabel("Adam step")
    axes[-1].set_ylabel("mean loss ‖p_B(T) − target‖²")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
