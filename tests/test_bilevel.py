"""Tests for diffopt.bilevel: hypergradients against closed forms, memory, MAML, errors."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch

import diffopt.bilevel as bl

DT = torch.float64

# Every tolerance used below, in one place.
TOL = {
    "implicit": 1e-5,  # implicit hypergradient vs closed form (the acceptance bar)
    "unrolled_long": 1e-5,  # Unrolled with enough steps to converge
    "truncated_long": 1e-5,  # Truncated with k large enough to converge
    "maml": 1e-10,  # MAML / iMAML vs hand-computed gradients (exact algebra, float64 rounding)
    "optimizer_match": 1e-12,  # same iterates, different code path
}


# --------------------------------------------------------------------------------------------
# Ridge regression with one penalty per feature, and its closed-form hypergradient.
#
#   inner  f(w, lam) = 1/(2n) ||X w - y||^2 + 1/2 sum_i lam_i w_i^2
#   w*     = (A + diag(lam))^{-1} b,  A = X^T X / n, b = X^T y / n
#   outer  L(w)      = 1/(2m) ||Xv w - yv||^2
#   dL/dlam_i = -(H^{-1} grad L(w*))_i * w*_i   with H = A + diag(lam)
# --------------------------------------------------------------------------------------------


class Ridge:
    def __init__(self, n: int = 40, m: int = 30, p: int = 5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, p, generator=g, dtype=DT)
        w_true = torch.randn(p, generator=g, dtype=DT)
        self.y = self.X @ w_true + torch.randn(n, generator=g, dtype=DT)
        self.Xv = torch.randn(m, p, generator=g, dtype=DT)
        self.yv = torch.randn(m, generator=g, dtype=DT)
        self.lam0 = 0.1 + torch.rand(p, generator=g, dtype=DT)
        self.p = p
        H = self.hessian(self.lam0)
        self.lr = 1.0 / float(torch.linalg.eigvalsh(H).max())

    def hessian(self, lam: torch.Tensor) -> torch.Tensor:
        return self.X.T @ self.X / self.X.shape[0] + torch.diag(lam)

    def inner(self, w: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.X @ w - self.y) ** 2).mean() + 0.5 * (lam * w * w).sum()

    def outer(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.Xv @ w - self.yv) ** 2).mean()

    def closed_form(self, lam: torch.Tensor) -> torch.Tensor:
        H = self.hessian(lam)
        w = torch.linalg.solve(H, self.X.T @ self.y / self.X.shape[0])
        g = self.Xv.T @ (self.Xv @ w - self.yv) / self.Xv.shape[0]
        return -torch.linalg.solve(H, g) * w

    def hypergrad(self, backward: object, steps: int, **kw: object) -> torch.Tensor:
        lam = self.lam0.clone().requires_grad_()
        w = bl.minimize(
            self.inner, torch.zeros(self.p, dtype=DT), lam, steps=steps, lr=self.lr,
            backward=backward, **kw,
        )
        self.outer(w).backward()
        assert lam.grad is not None
        return lam.grad

    def rel_error(self, grad: torch.Tensor) -> float:
        ref = self.closed_form(self.lam0)
        return float((grad - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    return Ridge()


@pytest.mark.parametrize(
    "strategy",
    [
        bl.Implicit(solver="cg"),
        bl.Implicit(solver="neumann", maxiter=2000),
        bl.Implicit(solver="direct"),
    ],
    ids=["cg", "neumann", "direct"],
)
def test_implicit_matches_closed_form(ridge: Ridge, strategy: bl.Implicit) -> None:
    lam = ridge.lam0.clone().requires_grad_()
    w, info = bl.minimize(
        ridge.inner, torch.zeros(ridge.p, dtype=DT), lam, steps=1000, lr=ridge.lr, tol=1e-12,
        backward=strategy, return_diagnostics=True,
    )
    ridge.outer(w).backward()
    assert ridge.rel_error(lam.grad) <= TOL["implicit"]
    assert info.converged and info.inner_grad_norm <= 1e-12 and info.steps < 1000
    assert info.linear_solve is not None and info.linear_solve.converged
    assert info.linear_solve.solver == strategy.solver


def _split_inner(ridge: Ridge) -> Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
    return lambda w, lam: ridge.inner(torch.cat(w), lam)


@pytest.mark.parametrize("container", ["tuple", "module"])
def test_implicit_parameter_containers(ridge: Ridge, container: str) -> None:
    """The same hypergradient when w is a tuple of tensors or an nn.Module's parameters."""
    lam = ridge.lam0.clone().requires_grad_()
    if container == "tuple":
        init: object = (torch.zeros(2, dtype=DT), torch.zeros(ridge.p - 2, dtype=DT))
        w = bl.minimize(_split_inner(ridge), init, lam, steps=1000, lr=ridge.lr, tol=1e-12)
        ridge.outer(torch.cat(w)).backward()
    else:
        net = torch.nn.Linear(ridge.p, 1, bias=False).to(DT)
        torch.nn.init.zeros_(net.weight)

        def inner(model: bl.FunctionalModule, lam: torch.Tensor) -> torch.Tensor:
            (weight,) = model.parameters()
            fit = 0.5 * ((model(ridge.X).squeeze(-1) - ridge.y) ** 2).mean()
            return fit + 0.5 * (lam * weight.squeeze(0) ** 2).sum()

        model = bl.minimize(inner, net, lam, steps=1000, lr=ridge.lr, tol=1e-12)
        assert isinstance(model, bl.FunctionalModule)
        (0.5 * ((model(ridge.Xv).squeeze(-1) - ridge.yv) ** 2).mean()).backward()
    assert ridge.rel_error(lam.grad) <= TOL["implicit"]


def test_implicit_with_tuple_hparams(ridge: Ridge) -> None:
    """Hypergradients reach each tensor of a tuple of hyperparameters."""
    a = ridge.lam0[:2].clone().requires_grad_()
    b = ridge.lam0[2:].clone().requires_grad_()
    w = bl.minimize(
        lambda w, h: ridge.inner(w, torch.cat(h)), torch.zeros(ridge.p, dtype=DT), (a, b),
        steps=1000, lr=ridge.lr, tol=1e-12,
    )
    ridge.outer(w).backward()
    assert ridge.rel_error(torch.cat([a.grad, b.grad])) <= TOL["implicit"]


def test_implicit_with_torch_optimizer_class(ridge: Ridge) -> None:
    lam = ridge.lam0.clone().requires_grad_()
    w = bl.minimize(
        ridge.inner, torch.zeros(ridge.p, dtype=DT), lam, steps=2000, lr=ridge.lr, tol=1e-12,
        optimizer=torch.optim.SGD, optimizer_options={"momentum": 0.5},
    )
    ridge.outer(w).backward()
    assert ridge.rel_error(lam.grad) <= TOL["implicit"]


def test_unrolled_converges_to_implicit_as_steps_grow(ridge: Ridge) -> None:
    errors = [ridge.rel_error(ridge.hypergrad(bl.Unrolled(), T)) for T in (2, 4, 8, 16, 32)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] <= TOL["unrolled_long"], errors


def test_truncated_error_shrinks_with_k(ridge: Ridge) -> None:
    errors = [ridge.rel_error(ridge.hypergrad(bl.Truncated(k), 400)) for k in (1, 2, 4, 8, 16, 32)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] <= TOL["truncated_long"], errors


def test_truncated_with_k_equal_steps_is_unrolled(ridge: Ridge) -> None:
    full = ridge.hypergrad(bl.Unrolled(), 30)
    trunc = ridge.hypergrad(bl.Truncated(30), 30)
    assert torch.allclose(full, trunc, rtol=TOL["optimizer_match"], atol=0)


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [
        ("gd", {}),
        ("sgd", {"momentum": 0.9}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),
        ("adam", {}),
    ],
)
def test_unrolled_optimizers_pass_gradcheck(ridge: Ridge, optimizer: str, options: dict) -> None:
    """Each differentiable optimizer's unrolled hypergradient matches finite differences."""

    def outer_of_lam(lam: torch.Tensor) -> torch.Tensor:
        w = bl.minimize(
            ridge.inner, torch.full((ridge.p,), 0.1, dtype=DT), lam, steps=6, lr=0.05,
            optimizer=optimizer, optimizer_options=options, backward=bl.Unrolled(),
        )
        return ridge.outer(w)

    assert torch.autograd.gradcheck(outer_of_lam, (ridge.lam0.clone().requires_grad_(),))


def test_functional_optimizers_follow_torch_optim(ridge: Ridge) -> None:
    """The differentiable GD/SGD/Adam follow the same iterates as torch.optim."""
    lam = ridge.lam0
    for name, cls, options in [
        ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
        ("adam", torch.optim.Adam, {"betas": (0.8, 0.99)}),
    ]:
        ours = bl.minimize(
            ridge.inner, torch.zeros(ridge.p, dtype=DT), lam, steps=25, lr=0.05,
            optimizer=name, optimizer_options=options, backward=bl.Unrolled(),
        )
        with pytest.warns(bl.NotConvergedWarning):
            theirs = bl.minimize(
                ridge.inner, torch.zeros(ridge.p, dtype=DT), lam, steps=25, lr=0.05,
                optimizer=cls, optimizer_options=options,
            )
        assert torch.allclose(ours, theirs, rtol=0, atol=TOL["optimizer_match"]), name


# --------------------------------------------------------------------------------------------
# Memory: bytes of the tensors the autograd graph holds when backward starts. Each saved tensor
# is registered through a saved-tensor hook; those still alive once the inner solve returned are
# the graph's memory (storages counted once).
# --------------------------------------------------------------------------------------------


def graph_bytes(build: Callable[[], torch.Tensor]) -> int:
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = build()
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    loss.backward()  # the graph was complete and usable
    return sum(storages.values())


@pytest.mark.parametrize(
    ("strategy", "grows"),
    [(bl.Implicit(), False), (bl.Truncated(10), False), (bl.Unrolled(), True)],
    ids=["implicit", "truncated10", "unrolled"],
)
def test_graph_memory_in_T(ridge: Ridge, strategy: object, grows: bool) -> None:
    def build(T: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            lam = ridge.lam0.clone().requires_grad_()
            w = bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=DT), lam, steps=T,
                            lr=ridge.lr, backward=strategy)
            return ridge.outer(w)
        return run

    small, large = graph_bytes(build(100)), graph_bytes(build(1000))
    assert small > 0
    if grows:
        assert large / small > 8, (small, large)  # linear in T up to a constant
    else:
        assert large == small, (small, large)


# --------------------------------------------------------------------------------------------
# Meta-learning against hand-computed gradients (quadratic tasks, where everything is linear).
#   support L(phi) = 1/2 ||A phi - b||^2, query Lq(phi) = 1/2 ||C phi - d||^2
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(*s, generator=g, dtype=DT) for k, s in
            {"A": (6, 3), "b": (6,), "C": (4, 3), "d": (4,), "theta": (3,)}.items()}


def _support(task: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda phi: 0.5 * ((task["A"] @ phi - task["b"]) ** 2).sum()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_maml_matches_hand_computed_gradient(task: dict, first_order: bool, steps: int) -> None:
    A, b, C, d, alpha = task["A"], task["b"], task["C"], task["d"], 0.05
    theta = task["theta"].clone().requires_grad_()
    phi = bl.maml_adapt(_support(task), theta, lr=alpha, steps=steps, first_order=first_order)
    (0.5 * ((C @ phi - d) ** 2).sum()).backward()

    # By hand: phi_{t+1} = (I - alpha A^T A) phi_t + alpha A^T b, so d phi_T / d theta = J^T.
    J = torch.eye(3, dtype=DT) - alpha * A.T @ A
    phi_ref = task["theta"].clone()
    for _ in range(steps):
        phi_ref = J @ phi_ref + alpha * A.T @ b
    outer_grad = C.T @ (C @ phi_ref - d)
    expected = outer_grad if first_order else torch.linalg.matrix_power(J, steps) @ outer_grad
    assert torch.allclose(phi, phi_ref, rtol=0, atol=TOL["maml"])
    assert torch.allclose(theta.grad, expected, rtol=0, atol=TOL["maml"])


def test_maml_with_module_matches_tensor_version(task: dict) -> None:
    net = torch.nn.Linear(3, 1, bias=False).to(DT)
    with torch.no_grad():
        net.weight.copy_(task["theta"][None])
    A, b = task["A"], task["b"]

    def support(model: bl.FunctionalModule) -> torch.Tensor:
        return 0.5 * ((model(A).squeeze(-1) - b) ** 2).sum()

    adapted = bl.maml_adapt(support, net, lr=0.05, steps=2)
    (0.5 * ((adapted(task["C"]).squeeze(-1) - task["d"]) ** 2).sum()).backward()

    theta = task["theta"].clone().requires_grad_()
    phi = bl.maml_adapt(_support(task), theta, lr=0.05, steps=2)
    (0.5 * ((task["C"] @ phi - task["d"]) ** 2).sum()).backward()
    assert torch.allclose(net.weight.grad[0], theta.grad, rtol=0, atol=TOL["maml"])


def test_imaml_matches_closed_form(task: dict) -> None:
    A, b, C, d, rho = task["A"], task["b"], task["C"], task["d"], 2.0
    theta = task["theta"].clone().requires_grad_()
    lr = 1.0 / float(torch.linalg.eigvalsh(A.T @ A).max() + rho)
    phi, info = bl.imaml_adapt(_support(task), theta, reg=rho, lr=lr, steps=2000, tol=1e-13,
                               return_diagnostics=True)
    (0.5 * ((C @ phi - d) ** 2).sum()).backward()

    # phi* = (A^T A + rho I)^{-1}(A^T b + rho theta);  d phi*/d theta = rho (A^T A + rho I)^{-1}
    M = A.T @ A + rho * torch.eye(3, dtype=DT)
    phi_ref = torch.linalg.solve(M, A.T @ b + rho * task["theta"])
    expected = rho * torch.linalg.solve(M, C.T @ (C @ phi_ref - d))
    assert torch.allclose(phi, phi_ref, rtol=0, atol=1e-10)
    assert torch.allclose(theta.grad, expected, rtol=0, atol=1e-8)
    assert info.linear_solve is not None and info.linear_solve.converged


# --------------------------------------------------------------------------------------------
# Diagnostics and warnings
# --------------------------------------------------------------------------------------------


def test_warns_when_inner_problem_not_converged(ridge: Ridge) -> None:
    lam = ridge.lam0.clone().requires_grad_()
    with pytest.warns(bl.NotConvergedWarning, match=r"inner problem is not converged.*Unrolled"):
        w, info = bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=DT), lam, steps=3,
                              lr=ridge.lr, return_diagnostics=True)
    assert info.converged is False and info.steps == 3 and info.inner_grad_norm > 1e-5
    ridge.outer(w).backward()  # still usable: the gradient of a different (unsolved) problem
    assert ridge.rel_error(lam.grad) > TOL["implicit"]


def test_warns_when_linear_solve_not_converged(ridge: Ridge) -> None:
    lam = ridge.lam0.clone().requires_grad_()
    w, info = bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=DT), lam, steps=1000,
                          lr=ridge.lr, tol=1e-12, backward=bl.Implicit(maxiter=1),
                          return_diagnostics=True)
    with pytest.warns(bl.NotConvergedWarning, match=r"linear solve \(solver='cg'\).*maxiter"):
        ridge.outer(w).backward()
    assert info.linear_solve is not None
    assert info.linear_solve.iterations == 1 and not info.linear_solve.converged


def test_unrolled_diagnostics_without_tol(ridge: Ridge) -> None:
    _, info = bl.minimize(ridge.inner, torch.zeros(ridge.p, dtype=DT), ridge.lam0, steps=3,
                          lr=ridge.lr, backward=bl.Unrolled(), return_diagnostics=True)
    assert info.converged is None and info.linear_solve is None and info.steps == 3


def test_dtype_follows_inputs(ridge: Ridge) -> None:
    lam = ridge.lam0.float().requires_grad_()
    w = bl.minimize(lambda w, l: ridge.inner(w.double(), l.double()).float(),
                    torch.zeros(ridge.p), lam, steps=500, lr=ridge.lr, tol=1e-5)
    ridge.outer(w.double()).backward()
    assert w.dtype == torch.float32 and lam.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Errors: what was expected, what was received, how to fix it
# --------------------------------------------------------------------------------------------


def _call(ridge: Ridge, **overrides: object) -> object:
    kwargs: dict = {"steps": 5, "lr": 0.1, "backward": bl.Implicit(stationarity_tol=1e3)}
    kwargs.update(overrides)
    fn = kwargs.pop("fn", ridge.inner)
    init = kwargs.pop("init", torch.zeros(ridge.p, dtype=DT))
    hparams = kwargs.pop("hparams", ridge.lam0)
    return bl.minimize(fn, init, hparams, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"init": [1.0, 2.0]}, TypeError, r"init must be a tensor.*received a list of float"),
        ({"init": torch.zeros(5, dtype=torch.long)}, TypeError, r"floating-point.*torch.int64"),
        ({"hparams": 0.5}, TypeError, r"hparams must be a tensor.*type float"),
        ({"steps": -1}, ValueError, r"steps must be a non-negative integer; received -1"),
        ({"steps": 2.5}, ValueError, r"steps must be a non-negative integer; received 2.5"),
        ({"lr": -1.0}, ValueError, r"lr must be a positive number; received -1.0"),
        ({"tol": -1.0}, ValueError, r"tol must be None or a non-negative number"),
        ({"optimizer": "lbfgs"}, ValueError, r"optimizer must be one of \['adam', 'gd', 'sgd'\]"),
        ({"optimizer": 3}, TypeError, r"optimizer must be 'gd', 'sgd', 'adam'.*received 3"),
        ({"optimizer_options": {"momentum": 0.9}}, TypeError, r"'gd' does not accept.*momentum"),
        ({"backward": bl.Implicit}, TypeError,
         r"strategy instance.*Call it: backward=Implicit\(\)"),
        ({"backward": "implicit"}, TypeError, r"backward must be Implicit.*received str"),
        ({"backward": bl.Truncated(10)}, ValueError, r"Truncated\(k=10\).*steps=5.*Unrolled"),
        ({"optimizer": torch.optim.Adam, "backward": bl.Unrolled()}, ValueError,
         r"torch.optim.Adam.*only with backward=Implicit"),
        ({"fn": lambda w, lam: w * lam}, ValueError, r"scalar tensor.*received \(5,\).*\.sum\(\)"),
    ],
)
def test_minimize_errors(ridge: Ridge, overrides: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _call(ridge, **overrides)


def test_error_when_fn_ignores_part_of_w(ridge: Ridge) -> None:
    init = (torch.zeros(ridge.p, dtype=DT), torch.zeros(2, dtype=DT))
    with pytest.raises(ValueError, match=r"does not depend on .* position \[1\] of init"):
        _call(ridge, fn=lambda w, lam: ridge.inner(w[0], lam), init=init)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: bl.Implicit(solver="lu"), ValueError,
         r"one of \['cg', 'neumann', 'direct'\]; received 'lu'"),
        (lambda: bl.Implicit(maxiter=0), ValueError, r"maxiter=...\) must be at least 1"),
        (lambda: bl.Implicit(solver="neumann", alpha=-1.0), ValueError, r"alpha.*positive.*None"),
        (lambda: bl.Truncated(0), ValueError, r"positive integer number of steps; received 0"),
        (lambda: bl.imaml_adapt(lambda p: p.sum(), torch.zeros(2), reg=0.0, lr=0.1, steps=1),
         ValueError, r"reg .* must be positive; received 0.0"),
        (lambda: bl.imaml_adapt(lambda p: p.sum(), torch.zeros(2), reg=1.0, lr=0.1, steps=1,
                                backward=bl.Unrolled()),
         TypeError, r"needs backward=Implicit.*maml_adapt"),
    ],
)
def test_strategy_and_meta_errors(make: Callable[[], object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("hyperparameter_ridge.py", ["--Ts", "10,30", "--ks", "1,10", "--outer-steps", "2",
                                     "--repeats", "1"]),
        ("maml_sine.py", ["--meta-iters", "3", "--test-tasks", "5"]),
    ],
)
def test_examples_run(tmp_path, script: str, args: list[str]) -> None:
    """The examples run end to end with tiny settings and write their figure and JSON."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(root / "examples" / script), "--json", str(out),
           "--figure", str(tmp_path / "fig.png"), *args]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert json.loads(out.read_text()) and (tmp_path / "fig.png").stat().st_size > 0
