"""Bring your own inner solver: a constrained inner problem and a simulated equilibrium.

Two bi-level problems whose inner solution is computed by code that knows nothing about
autograd; :mod:`diffopt.bilevel` attaches the implicit hypergradient from the condition that
characterises the solution.

**1. Constrained inner problem, a CvxpyLayer inside the condition** (``bl.fixed_point``).
Index tracking: a long-only, fully invested portfolio ``w`` (the probability simplex S) tracks
an index ``y`` from asset returns ``X``, with one ridge penalty :math:`e^{\\theta_i}` per asset,

    w*(theta) = argmin_{w in S} 1/(2n) ||X_tr w - y_tr||^2 + 1/2 sum_i exp(theta_i) w_i^2.

CVXPY solves it (any solver would do). Its solution is the fixed point of projected gradient,
:math:`w = P_S(w - \\eta \\nabla_w f(w, \\theta))`, where the projection :math:`P_S` is a
:class:`~diffopt.CvxpyLayer`, so the condition is differentiable although S has corners.
The outer loss is the validation tracking error. The script checks the hypergradient against
central differences of tight CVXPY solves, and against differentiating the whole inner problem
as one CvxpyLayer, then learns theta with Adam.

**2. A spring network's equilibrium** (``bl.fixed_point``). A net of nonlinear springs
(rest length 1, stiffness :math:`e^{\\theta_e}`) hangs from its pinned top row under gravity.
A damped explicit simulation runs it to rest (plain tensor code, no graph); the rest state is
the fixed point of :math:`x \\mapsto x + c\\,F(x, \\theta)` with F the forces. The stiffnesses
are learned so that the net comes to rest in a target shape (made by hidden stiffnesses). The
hypergradient is checked against central differences of two simulations.

Run ``python examples/bilevel_custom_solver.py --help`` for options; the defaults take a few
seconds and print both checks and the losses before and after learning.
"""

from __future__ import annotations

import argparse
import json
import time

import cvxpy as cp
import torch

import diffopt.bilevel as bl
from diffopt import CvxpyLayer

DT = torch.float64


# ---------------------------------------------------------------- 1. index tracking on S


class Tracking:
    """Data, the CVXPY inner solver, the projection layer and the fixed-point map."""

    def __init__(self, assets: int, samples: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        factor = torch.randn(2 * samples, 1, generator=g, dtype=DT)
        X = 0.8 * factor + torch.randn(2 * samples, assets, generator=g, dtype=DT)
        truth = torch.rand(assets, generator=g, dtype=DT) * (torch.arange(assets) % 2 == 0)
        truth = truth / truth.sum()  # half the assets are not in the index
        y = X @ truth + 0.3 * torch.randn(2 * samples, generator=g, dtype=DT)
        self.X_tr, self.y_tr = X[:samples], y[:samples]
        self.X_val, self.y_val = X[samples:], y[samples:]
        self.A = self.X_tr.T @ self.X_tr / samples
        self.b = self.X_tr.T @ self.y_tr / samples
        self.n = assets

        # Inner solver: a plain CVXPY problem, solved tightly; the outer code never sees inside.
        self.w = cp.Variable(assets)
        self.lam = cp.Parameter(assets, nonneg=True)
        objective = cp.sum_squares(self.X_tr.numpy() @ self.w - self.y_tr.numpy()) / (2 * samples)
        objective = objective + 0.5 * cp.sum(cp.multiply(self.lam, cp.square(self.w)))
        self.problem = cp.Problem(cp.Minimize(objective), [self.w >= 0, cp.sum(self.w) == 1])

        # The projection onto S as a layer: the differentiable piece of the condition.
        z, x = cp.Parameter(assets), cp.Variable(assets)
        projection = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [x >= 0, cp.sum(x) == 1])
        self.project = CvxpyLayer(projection, parameters=[z], variables=[x],
                                  solver_args={"tol": 1e-12})
        self.eta = 1.0 / float(torch.linalg.eigvalsh(self.A).max())

    def solve(self, theta: torch.Tensor) -> torch.Tensor:
        self.lam.value = theta.detach().exp().numpy()
        self.problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12,
                           tol_feas=1e-12)
        return torch.tensor(self.w.value, dtype=DT)

    def step(self, w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Projected gradient: w* is its fixed point for any step eta > 0."""
        grad = self.A @ w - self.b + theta.exp() * w
        (out,) = self.project(w - self.eta * grad)
        return out

    def val_loss(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.X_val @ w - self.y_val) ** 2).mean()

    def hypergradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = theta.detach().requires_grad_(True)
        w = bl.fixed_point(self.step, self.solve(theta), theta,
                           backward=bl.Implicit(solver="direct"))
        loss = self.val_loss(w)
        (grad,) = torch.autograd.grad(loss, theta)
        return loss.detach(), grad

    def whole_layer_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        """The alternative: the whole inner problem as one CvxpyLayer (differentiated by KKT)."""
        layer = CvxpyLayer(self.problem, parameters=[self.lam], variables=[self.w],
                           solver_args={"tol": 1e-12})
        theta = theta.detach().requires_grad_(True)
        (w,) = layer(theta.exp())
        (grad,) = torch.autograd.grad(self.val_loss(w), theta)
        return grad


def run_tracking(args: argparse.Namespace) -> dict:
    task = Tracking(args.assets, args.samples, args.seed)
    theta = torch.full((task.n,), args.theta0, dtype=DT)
    t0 = time.perf_counter()
    loss0, grad = task.hypergradient(theta)
    seconds = time.perf_counter() - t0
    direction = torch.randn(task.n, generator=torch.Generator().manual_seed(args.seed + 1),
                            dtype=DT)
    h = args.fd_step
    fd = (task.val_loss(task.solve(theta + h * direction))
          - task.val_loss(task.solve(theta - h * direction))) / (2 * h)
    fd_error = abs(float(grad @ direction - fd)) / max(abs(float(fd)), 1e-300)
    layer_error = float((grad - task.whole_layer_gradient(theta)).norm() / grad.norm())

    opt = torch.optim.Adam([theta.requires_grad_(True)], lr=args.lr)
    for _ in range(args.outer_steps):
        _, g = task.hypergradient(theta)
        theta.grad = g
        opt.step()
    w = task.solve(theta)
    out = {"val_loss_before": float(loss0), "val_loss_after": float(task.val_loss(w)),
           "fd_rel_error": fd_error, "whole_layer_rel_error": layer_error,
           "hypergradient_seconds": seconds, "active_assets": int((w > 1e-8).sum()),
           "assets": task.n}
    print(f"[tracking] hypergradient vs central difference: rel. error {fd_error:.1e}; "
          f"vs whole-problem CvxpyLayer: {layer_error:.1e} ({seconds * 1e3:.0f} ms)")
    print(f"[tracking] validation loss {out['val_loss_before']:.5f} -> "
          f"{out['val_loss_after']:.5f} after {args.outer_steps} Adam steps; "
          f"{out['active_assets']}/{task.n} assets held")
    return out


# ---------------------------------------------------------------- 2. spring network at rest


class SpringNet:
    """A rows x cols net of springs hanging from its pinned top row."""

    def __init__(self, rows: int, cols: int, gravity: float) -> None:
        index = torch.arange(rows * cols).reshape(rows, cols)
        edges = [(index[r, c], index[r, c + 1]) for r in range(rows) for c in range(cols - 1)]
        edges += [(index[r, c], index[r + 1, c]) for r in range(rows - 1) for c in range(cols)]
        self.i = torch.tensor([int(a) for a, _ in edges])
        self.j = torch.tensor([int(b) for _, b in edges])
        grid = torch.stack(torch.meshgrid(torch.arange(cols, dtype=DT),
                                          -torch.arange(rows, dtype=DT), indexing="xy"), -1)
        self.start = grid.reshape(-1, 2)
        self.free = torch.arange(cols, rows * cols)  # row 0 is pinned
        self.edges, self.gravity = len(edges), gravity

    def forces(self, x_free: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        x = self.start.index_put((self.free,), x_free)
        d = x[self.j] - x[self.i]
        length = d.norm(dim=1, keepdim=True)
        pull = theta.exp().unsqueeze(1) * (length - 1.0) * d / length  # on i, towards j
        f = torch.zeros_like(x).index_add(0, self.i, pull).index_add(0, self.j, -pull)
        f[:, 1] -= self.gravity
        return f[self.free]

    def simulate(self, theta: torch.Tensor, x0: torch.Tensor, dt: float, damping: float,
                 tol: float, max_steps: int) -> tuple[torch.Tensor, int]:
        """Damped semi-implicit Euler until the forces vanish (unit masses)."""
        x, v = x0.clone(), torch.zeros_like(x0)
        with torch.no_grad():
            for step in range(max_steps):
                f = self.forces(x, theta)
                if float(f.norm()) < tol:
                    return x, step
                v = (1 - damping * dt) * v + dt * f
                x = x + dt * v
        raise RuntimeError(f"the simulation did not come to rest in {max_steps} steps; "
                           f"lower --dt or raise --max-sim-steps.")


def run_springs(args: argparse.Namespace) -> dict:
    net = SpringNet(args.rows, args.cols, args.gravity)
    g = torch.Generator().manual_seed(args.seed)
    hidden = 1.0 + 0.8 * torch.randn(net.edges, generator=g, dtype=DT)
    x_rest = net.start[net.free]
    sim = {"dt": args.dt, "damping": args.damping, "tol": 1e-11, "max_steps": args.max_sim_steps}
    target, _ = net.simulate(hidden, x_rest, **sim)
    c = args.dt ** 2  # T(x) = x + c F(x): a contraction near a stable rest state for small c

    def mapping(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return x + c * net.forces(x, theta)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return ((x - target) ** 2).sum(1).mean()

    backward = (bl.Implicit(solver="direct") if args.backward == "direct"
                else bl.Implicit(solver="neumann", alpha=1.0, maxiter=args.neumann_iters,
                                 tol=1e-9))
    state = {"x": x_rest, "sim_steps": 0}

    def hypergradient(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = theta.detach().requires_grad_(True)
        x_star, steps = net.simulate(theta, state["x"], **sim)  # warm start from the last rest
        state["x"], state["sim_steps"] = x_star, state["sim_steps"] + steps
        x = bl.fixed_point(mapping, x_star, theta, backward=backward)
        loss = loss_of(x)
        (grad,) = torch.autograd.grad(loss, theta)
        return loss.detach(), grad

    theta = torch.zeros(net.edges, dtype=DT)
    t0 = time.perf_counter()
    loss0, grad = hypergradient(theta)
    seconds = time.perf_counter() - t0
    direction = torch.randn(net.edges, generator=g, dtype=DT)
    h = args.fd_step
    fd = (loss_of(net.simulate(theta + h * direction, x_rest, **sim)[0])
          - loss_of(net.simulate(theta - h * direction, x_rest, **sim)[0])) / (2 * h)
    fd_error = abs(float(grad @ direction - fd)) / max(abs(float(fd)), 1e-300)

    opt = torch.optim.Adam([theta.requires_grad_(True)], lr=args.lr)
    for _ in range(args.outer_steps):
        _, g_theta = hypergradient(theta)
        theta.grad = g_theta
        opt.step()
    final = loss_of(net.simulate(theta.detach(), state["x"], **sim)[0])
    out = {"loss_before": float(loss0), "loss_after": float(final), "fd_rel_error": fd_error,
           "hypergradient_seconds": seconds, "springs": net.edges,
           "simulation_steps": state["sim_steps"]}
    print(f"[springs] hypergradient vs central difference: rel. error {fd_error:.1e} "
          f"({seconds * 1e3:.0f} ms, {args.backward} backward)")
    print(f"[springs] shape error {out['loss_before']:.2e} -> {out['loss_after']:.2e} after "
          f"{args.outer_steps} Adam steps ({state['sim_steps']} simulation steps in all)")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--part", choices=["both", "tracking", "springs"], default="both",
                        help="which problem to run")
    parser.add_argument("--assets", type=int, default=12, help="tracking: number of assets")
    parser.add_argument("--samples", type=int, default=60,
                        help="tracking: training (and validation) samples")
    parser.add_argument("--theta0", type=float, default=-5.0,
                        help="tracking: initial log-penalty of every asset")
    parser.add_argument("--rows", type=int, default=4, help="springs: rows of nodes (top pinned)")
    parser.add_argument("--cols", type=int, default=4, help="springs: columns of nodes")
    parser.add_argument("--gravity", type=float, default=0.5, help="springs: weight of a node")
    parser.add_argument("--dt", type=float, default=0.1, help="springs: simulation time step")
    parser.add_argument("--damping", type=float, default=1.0, help="springs: velocity damping")
    parser.add_argument("--max-sim-steps", type=int, default=20000,
                        help="springs: most steps of one simulation")
    parser.add_argument("--backward", choices=["direct", "neumann"], default="direct",
                        help="springs: linear solve of the implicit backward (neumann converges "
                             "slowly here, at rate 1 - dt^2 lambda_min, and warns if it stops short)")
    parser.add_argument("--neumann-iters", type=int, default=5000,
                        help="springs: Neumann terms with --backward neumann")
    parser.add_argument("--outer-steps", type=int, default=30, help="Adam steps on theta")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    parser.add_argument("--fd-step", type=float, default=1e-5,
                        help="step of the central-difference check")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data")
    parser.add_argument("--json", default="", help="write the numbers to this file ('' = no)")
    args = parser.parse_args(argv)
    out = {}
    if args.part in ("both", "tracking"):
        out["tracking"] = run_tracking(args)
    if args.part in ("both", "springs"):
        out["springs"] = run_springs(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
