"""QPLayer: tensor-form QPs against CVXPY, gradients, broadcasting, optional blocks, errors."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffopt import InputError, QPLayer, SolverError
from problems import rel_err


def _qp(rng, B=4, n=5, m=4, p=2):
    L = rng.standard_normal((n, n))
    P = torch.as_tensor(L @ L.T + np.eye(n))
    q = torch.as_tensor(rng.standard_normal((B, n)))
    G = torch.as_tensor(rng.standard_normal((m, n)))
    x0 = rng.standard_normal(n)
    h = torch.as_tensor(G.numpy() @ x0 + rng.uniform(0.1, 1, m))
    A = torch.as_tensor(rng.standard_normal((p, n)))
    b = torch.as_tensor(A.numpy() @ x0)
    return P, q, G, h, A, b


def _cvxpy(P, q, G, h, A, b):
    x = cp.Variable(P.shape[0])
    cons = ([G.numpy() @ x <= h.numpy()] if G is not None else []) + (
        [A.numpy() @ x == b.numpy()] if A is not None else [])
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(x, P.numpy()) + q.numpy() @ x), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    duals = [c.dual_value for c in cons]
    return x.value, duals


@pytest.mark.parametrize("solver", ["native", "clarabel"])
@pytest.mark.parametrize("blocks", ["both", "ineq", "eq", "none"])
def test_matches_cvxpy_with_optional_blocks(solver, blocks):
    rng = np.random.default_rng(0)
    P, q, G, h, A, b = _qp(rng)
    if blocks in ("eq", "none"):
        G = h = None
    if blocks in ("ineq", "none"):
        A = b = None
    x, nu, lam = QPLayer(solver=solver, duals=True)(P, q, G, h, A, b)
    for i in range(q.shape[0]):
        ref, duals = _cvxpy(P, q[i], G, h, A, b)
        assert np.allclose(x[i].numpy(), ref, atol=1e-6)
        if A is not None:
            assert np.allclose(nu[i].numpy(), duals[-1], atol=1e-6)
        if G is not None:
            assert np.allclose(lam[i].numpy(), duals[0], atol=1e-6)


def test_gradcheck_all_arguments_including_nonsymmetric_P():
    rng = np.random.default_rng(1)
    P, q, G, h, A, b = _qp(rng, B=2, n=3, m=2, p=1)
    P = P + 0.3 * torch.as_tensor(rng.standard_normal((3, 3)))  # not symmetric; sym part is PD
    args = tuple(t.clone().requires_grad_() for t in (P, q, G, h, A, b))
    layer = QPLayer(solver="clarabel", solver_args={"tol": 1e-12})
    assert torch.autograd.gradcheck(lambda *t: layer(*t), args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_shared_arguments_get_summed_gradient():
    rng = np.random.default_rng(2)
    P, q, G, h, A, b = _qp(rng, B=3)
    Gs = G.clone().requires_grad_()
    QPLayer()(P, q, Gs, h, A, b).sum().backward()
    total = torch.zeros_like(G)
    for i in range(3):
        Gi = G.clone().requires_grad_()
        QPLayer()(P, q[i], Gi, h, A, b).sum().backward()
        total += Gi.grad
    assert rel_err(Gs.grad, total) < 1e-6


def test_unbatched_returns_unbatched():
    rng = np.random.default_rng(3)
    P, q, G, h, A, b = _qp(rng, B=1)
    x = QPLayer()(P, q[0], G, h, A, b)
    assert x.shape == (5,)


def test_float32_gradients_as_accurate_as_float32_holds():
    """float32 inputs are solved in float64 by default: the float32 gradient matches the float64
    gradient of the same (rounded) data, with several constraints active."""
    rng = np.random.default_rng(7)
    P, q, G, h, A, b = _qp(rng, B=16, n=20, m=15, p=3)
    q = 3 * q
    args32 = [t.float() for t in (P, q, G, h, A, b)]
    grads = {}
    for dtype in (torch.float32, torch.float64):
        ts = [t.to(dtype).requires_grad_() for t in args32]
        x = QPLayer()(*ts)
        assert x.dtype == dtype
        w = torch.arange(20, dtype=dtype) / 20
        grads[dtype] = torch.autograd.grad((x * w).sum(), ts)
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert g32.dtype == torch.float32
        assert rel_err(g32.double(), g64) < 1e-6


@pytest.mark.parametrize("solver", ["native", "clarabel"])
def test_no_P_is_a_linear_program(solver):
    # min qᵀx s.t. x ≥ 0, 1ᵀx = 1: the vertex at the smallest cost, and a gradient w.r.t. h that
    # the P = 0 form of the same LP gives too.
    q = torch.tensor([[0.3, -0.2, 0.5], [1.0, 2.0, 0.5]], dtype=torch.float64)
    G, h = -torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    A, b = torch.ones(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    hs = [h.clone().requires_grad_() for _ in range(2)]
    layer = QPLayer(solver=solver)
    x = layer(None, q, G, hs[0], A, b)
    assert torch.allclose(x, torch.tensor([[0.0, 1, 0], [0, 0, 1]], dtype=torch.float64),
                          atol=1e-7)
    x0 = layer(torch.zeros(3, 3, dtype=torch.float64), q, G, hs[1], A, b)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (x * w).sum().backward()
    (x0 * w).sum().backward()
    assert hs[0].grad.abs().max() > 0.1  # moving the active bounds moves the vertex
    assert rel_err(hs[0].grad, hs[1].grad) < 1e-6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 9), extra=st.integers(1, 8),
       quad=st.sampled_from(["none", "zero", "diagonal"]))
def test_degenerate_lps_and_qps_match_clarabel(seed, n, extra, quad):
    # Integer data make ties and degenerate vertices common: costs in {-1, 0, 1}, rows in
    # {-1, 0, 1}, right-hand sides G x0 + {0, 1} at an integer x0 in the box 0 <= x <= 3 (slack 0:
    # a constraint active at x0), and P absent, zero (the dual form's trap) or diagonal with
    # zeros. Stress runs of such families found items stalling at max_iters or failing
    # numerically (fixed in 53bacc3 and 1c23b5d); the optimal value must match Clarabel's.
    rng = np.random.default_rng(seed)
    B = 8
    G0 = rng.integers(-1, 2, (B, extra, n)).astype(float)
    x0 = rng.integers(0, 3, (B, n)).astype(float)
    h0 = np.einsum("bmn,bn->bm", G0, x0) + rng.integers(0, 2, (B, extra))
    eye = np.broadcast_to(np.eye(n), (B, n, n))
    G = torch.as_tensor(np.concatenate([G0, -eye, eye], 1))
    h = torch.as_tensor(np.concatenate([h0, np.zeros((B, n)), np.full((B, n), 3.0)], 1))
    q = torch.as_tensor(rng.integers(-1, 2, (B, n)).astype(float))
    P = {"none": None, "zero": torch.zeros(B, n, n, dtype=torch.float64),
         "diagonal": torch.diag_embed(torch.as_tensor(rng.integers(0, 2, (B, n)).astype(float)))
         }[quad]
    layer = QPLayer(solver_args={"on_failure": "nan"})
    x = layer(P, q, G, h)
    assert all(st.name == "OPTIMAL" for st in layer.info.status), layer.info.status
    ref = QPLayer(solver="clarabel")(P, q, G, h)

    def objective(v):
        value = (q * v).sum(1)
        return value if P is None else value + 0.5 * torch.einsum("bi,bij,bj->b", v, P, v)

    assert float((objective(x) - objective(ref)).abs().max()) <= 1e-7
    assert float((G @ x.unsqueeze(-1)).squeeze(-1).sub(h).max()) <= 1e-7


def test_errors():
    rng = np.random.default_rng(4)
    P, q, G, h, A, b = _qp(rng)
    layer = QPLayer()
    with pytest.raises(InputError, match="G and h go together"):
        layer(P, q, G, None)
    with pytest.raises(InputError, match=r"G: expected shape \(4, 5\) or \(batch, \*\(4, 5\)\)"):
        layer(P, q, G[:, :3], h)
    with pytest.raises(InputError, match=r"Inconsistent batch sizes \[3, 4\]"):
        layer(P, q, G, h.expand(3, 4))
    with pytest.raises(SolverError, match="NOT_FINITE: the item.s data"):
        layer(P, q, G, h * float("nan"))
    with pytest.raises(InputError, match="expected a floating-point torch.Tensor"):
        layer(P, q.numpy(), G, h)
    with pytest.raises(InputError, match="one device, received P on meta, q on cpu, G on cpu"):
        layer(P.to("meta"), q, G, h)
    with pytest.raises(InputError, match="q: the linear term is required"):
        layer(P, None, G, h)


def test_backward_reads_few_scalars_whatever_the_batch():
    """The backward makes a handful of host reads (``.item()``, ``bool()``: a GPU synchronization
    each), not one per item: a loop over a device tensor made 4,096 of them at B = 4096 (most of
    a 44 ms backward on an H100)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountScalarReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    P, q, G, h, A, b = _qp(np.random.default_rng(3), B=256)
    q = q.requires_grad_()
    x = QPLayer()(P, q, G, h, A, b)
    with CountScalarReads() as mode:
        torch.autograd.grad(x.sum(), q)
    assert mode.count <= 16  # the refinement's stopping tests (3-4 here); was 260
