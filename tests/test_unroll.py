"""Tests of the unrolled gradient modes (diffopt.diff.unroll)."""

from __future__ import annotations

import pytest
import torch

from diffopt import CvxpyLayer, Exact, InputError, ProblemError, QPLayer, UnrolledIPM

# Tolerances, in one place.
TOL_CONVERGED = 1e-4  # unrolled vs implicit gradient at solver tolerance 1e-9


def strict_qp(B=4, n=8, m=12, p=2, seed=0):
    """QPLayer data with a unique, strictly complementary solution (3 active rows + p = 5 < n)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    M = rnd(B, n, n)
    P = M @ M.mT / n + 0.5 * torch.eye(n, dtype=torch.float64)
    G, A, x0 = rnd(B, m, n), rnd(B, p, n), rnd(B, n)
    active = torch.arange(m) < 3
    lam = torch.where(active, 0.5 + torch.rand(B, m, generator=g, dtype=torch.float64), 0.0)
    slack = torch.where(active, 0.0, 0.5 + torch.rand(B, m, generator=g, dtype=torch.float64))
    nu = rnd(B, p)
    h = torch.einsum("bmn,bn->bm", G, x0) + slack
    b = torch.einsum("bpn,bn->bp", A, x0)
    q = -(torch.einsum("bij,bj->bi", P, x0) + torch.einsum("bmn,bm->bn", G, lam)
          + torch.einsum("bpn,bp->bn", A, nu))
    return P, q, G, h, A, b


def grad_q(mode, data, w, tol=1e-9):
    """∇_q ⟨w, x*⟩ under a gradient mode (native solver at tolerance ``tol``)."""
    P, q, G, h, A, b = data
    q = q.clone().requires_grad_(True)
    x = QPLayer(gradient=mode, solver_args={"tol": tol})(P, q, G, h, A, b)
    (x * w).sum().backward()
    return q.grad


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def setup():
    data = strict_qp()
    w = torch.randn(data[1].shape, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    return data, w, grad_q(Exact(), data, w)


def test_unrolled_gradient_converges_to_the_implicit_one(setup):
    data, w, exact = setup
    errors = [rel(grad_q(UnrolledIPM(), data, w, tol), exact) for tol in (1e-3, 1e-6, 1e-9)]
    assert errors[-1] <= TOL_CONVERGED
    assert errors[0] > errors[1] > errors[2]


def test_truncation_error_shrinks_with_k(setup):
    data, w, exact = setup
    # Near the solution each Newton step shrinks the error of the derivative (here about
    # 100x per step), until the solver's own tolerance is reached.
    errors = [rel(grad_q(UnrolledIPM(k), data, w), exact) for k in (1, 2, 3, 4)]
    assert all(e1 > 10 * e2 for e1, e2 in zip(errors, errors[1:]))
    assert rel(grad_q(UnrolledIPM(100), data, w), exact) <= TOL_CONVERGED
    # k beyond the iteration count is the full unroll.
    assert torch.allclose(grad_q(UnrolledIPM(100), data, w), grad_q(UnrolledIPM(), data, w),
                          rtol=1e-12, atol=0)


def saved_bytes(mode, data):
    """Bytes of the tensors autograd saves for the backward pass of one solve."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    P, q, G, h, A, b = data
    q = q.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        QPLayer(gradient=mode)(P, q, G, h, A, b)
    return total


def test_memory_grows_with_k(setup):
    data, _, _ = setup
    sizes = [saved_bytes(UnrolledIPM(k), data) for k in (1, 2, 4, 8)]
    assert all(a < b for a, b in zip(sizes, sizes[1:]))
    # Roughly linear: each recorded iteration costs about the same.
    steps = [b - a for a, b in zip(sizes, sizes[1:])]
    assert steps[2] / 4 == pytest.approx(steps[0], rel=0.5)
    # Implicit differentiation saves nothing per iteration.
    assert saved_bytes(Exact(), data) < sizes[0]


def test_values_and_info_match_the_native_solve(setup):
    data, _, _ = setup
    layer = QPLayer(duals=True)
    ref = layer(*data)
    out = layer(*data, gradient=UnrolledIPM(3))
    # Both stop at the default tolerance 1e-9 (relative), by different iterations: the unrolled
    # solve keeps its step fraction fixed.
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-8)
    assert layer.info is not None and all(layer.info.ok)
    assert max(layer.info.primal_residual) <= 1e-8


def test_cvxpylayer_with_unrolled_gradient():
    cp = pytest.importorskip("cvxpy")
    n = 4
    x = cp.Variable(n)
    c = cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(c @ x + 0.5 * cp.sum_squares(x)), [x >= 0, cp.sum(x) == 1])
    layer = CvxpyLayer(prob, parameters=[c], variables=[x], gradient=UnrolledIPM(4))
    cv = torch.tensor([[0.3, -0.2, 0.1, 0.5], [0.0, 0.1, -0.4, 0.2]], dtype=torch.float64,
                      requires_grad=True)
    (sol,) = layer(cv)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (sol * w).sum().backward()
    unrolled = cv.grad.clone()
    cv.grad = None
    (ref,) = layer(cv, gradient=Exact())
    (ref * w).sum().backward()
    assert torch.allclose(sol, ref, atol=1e-8)
    assert layer.info is not None and all(layer.info.ok)
    assert rel(unrolled, cv.grad) <= 1e-3


def test_invalid_k_is_refused():
    with pytest.raises(InputError, match="k must be None"):
        UnrolledIPM(0)
    with pytest.raises(InputError, match="k must be None"):
        UnrolledIPM(2.5)  # type: ignore[arg-type]


def test_other_cones_are_refused():
    cp = pytest.importorskip("cvxpy")
    x = cp.Variable(3)
    c = cp.Parameter(3)
    prob = cp.Problem(cp.Minimize(c @ x), [cp.norm(x) <= 1])
    layer = CvxpyLayer(prob, parameters=[c], variables=[x], gradient=UnrolledIPM())
    with pytest.raises(ProblemError, match="UnrolledIPM needs the native LP/QP solver"):
        layer(torch.ones(3, dtype=torch.float64))


def test_torch_func_jacobians_through_the_iterations():
    """jacrev and jacfwd differentiate the recorded iterations (the host reads of the loop see
    through the transforms) and agree with the implicit Jacobian at a strictly complementary
    solution; vmap, whose loop cannot stop per item, is refused with a clear error."""
    P, q, G, h, A, b = (t[0] for t in strict_qp(B=1))
    layer = QPLayer(gradient=UnrolledIPM())
    exact = torch.func.jacrev(lambda v: QPLayer()(P, v, G, h, A, b))(q)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        J = jac(lambda v: layer(P, v, G, h, A, b))(q)
        assert torch.linalg.norm(J - exact) <= TOL_CONVERGED * torch.linalg.norm(exact)
    with pytest.raises(InputError, match="cannot run under torch.func.vmap"):
        torch.func.vmap(lambda v: layer(P, v, G, h, A, b))(q.expand(3, -1))
