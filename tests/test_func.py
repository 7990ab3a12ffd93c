"""torch.func (vmap, grad, jacrev, jacfwd) and torch.compile through the layers, in float64.

References: the batched layer (one call on the merged batch; its VJP and JVP row by row) and
central finite differences of tight solves.
"""

from __future__ import annotations

import cvxpy as cp
import pytest
import torch
from torch.func import grad, jacfwd, jacrev, vmap

from diffopt import CvxpyLayer, QPLayer
from diffopt.cones import ConeDims
from diffopt.layers import _dense_pattern
from diffopt.solve import cone_solve, make_call
from problems import rel_err

#: Tolerances, in one place. Relative errors against the batched layer (same solves, so only the
#: linear algebra differs) and against central differences of tight (tol 1e-12) solves.
TOL_BATCHED = 1e-10
TOL_FD = 1e-8
TOL_FD_CURVED = 1e-6  # SOCP: the solution map is curved, central differences carry O(eps²)
SOLVERS = {"clarabel": {"tol": 1e-12}, "native": {"tol": 1e-12}}

N, M = 3, 4


def _qp_data():
    gen = torch.Generator().manual_seed(0)
    R = torch.randn(N, N, generator=gen, dtype=torch.float64)
    P = R @ R.T + torch.eye(N, dtype=torch.float64)
    G = torch.randn(M, N, generator=gen, dtype=torch.float64)
    h = 0.3 * torch.rand(M, generator=gen, dtype=torch.float64)
    q = torch.randn(5, 2, N, generator=gen, dtype=torch.float64)  # (vmapped, batch, n)
    return P, q, G, h


def _qp(entry: str, solver: str, kkt: str = "auto"):
    """``(P, q, G, h) -> x`` through a QPLayer, or straight through ``cone_solve``."""
    args = {**SOLVERS[solver], "kkt": kkt}
    if entry == "layer":
        return QPLayer(solver=solver, solver_args=args)

    def solve(P, q, G, h):
        B = q.shape[0]
        call = make_call(args, solver, _dense_pattern(N, N), _dense_pattern(M, N),
                         ConeDims(nonneg=M))
        flat = [t.reshape(-1, k).expand(B, k) for t, k in ((P, N * N), (G, M * N), (h, M))]
        return cone_solve(flat[0], q, flat[1], flat[2], call)[0]

    return solve


ENTRIES = ["cone", "layer"]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_vmap_and_grad_match_the_batched_layer(entry, solver):
    P, q, G, h = _qp_data()
    f = _qp(entry, solver)
    V, B = q.shape[:2]
    qq = q.reshape(V * B, N).requires_grad_()
    x_ref = f(P, qq, G, h)
    (g_ref,) = torch.autograd.grad(x_ref.pow(3).sum(), qq)
    x_ref, g_ref = x_ref.detach().reshape(V, B, N), g_ref.reshape(V, B, N)

    def loss(q):
        return f(P, q, G, h).pow(3).sum()

    assert rel_err(vmap(f, in_dims=(None, 0, None, None))(P, q, G, h), x_ref) < TOL_BATCHED
    assert rel_err(grad(lambda q: vmap(loss)(q).sum())(q), g_ref) < TOL_BATCHED
    assert rel_err(vmap(grad(loss))(q), g_ref) < TOL_BATCHED  # per-sample gradients
    # nested vmaps merge into one batch; the per-sample backward sees every level
    q4 = q.reshape(V, B, 1, N).transpose(1, 2).contiguous()  # (V, 1, B, n)
    assert rel_err(vmap(vmap(grad(loss)))(q4).squeeze(1), g_ref) < TOL_BATCHED


@pytest.mark.parametrize("entry", ENTRIES)
def test_vmap_over_every_argument_with_batched_jacobians(entry):
    P, q, G, h = _qp_data()
    f = _qp(entry, "clarabel")
    V = q.shape[0]
    Ps = P + 0.1 * torch.arange(V, dtype=torch.float64).reshape(V, 1, 1) * torch.eye(N)
    Gs = G.expand(V, M, N).clone()
    hs = h + 0.01 * torch.arange(V, dtype=torch.float64).reshape(V, 1)
    got = vmap(f, in_dims=(0, 1, 0, 0))(Ps, q.transpose(0, 1), Gs, hs)  # vmap dim not first
    want = torch.stack([f(Ps[k], q[k], Gs[k], hs[k]) for k in range(V)])
    assert rel_err(got, want) < TOL_BATCHED
    # vmap(jacrev) and vmap(jacfwd): one Jacobian per vmapped problem
    J_rev = vmap(jacrev(f, argnums=1))(Ps, q, Gs, hs)
    J_fwd = vmap(jacfwd(f, argnums=1))(Ps, q, Gs, hs)
    for k in range(V):
        J_k = jacrev(f, argnums=1)(Ps[k], q[k], Gs[k], hs[k])
        assert rel_err(J_rev[k], J_k) < TOL_BATCHED
        assert rel_err(J_fwd[k], J_k) < TOL_BATCHED


def _check_jacobians(f, inputs, tol_fd, eps=1e-5):
    """jacrev and jacfwd of ``f`` (one output) against the VJP/JVP of the batched layer and
    central differences, for every input at once."""
    argnums = tuple(range(len(inputs)))
    J_rev = jacrev(f, argnums=argnums)(*inputs)
    J_fwd = jacfwd(f, argnums=argnums)(*inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]
    x = f(*leaves)
    for k in range(x.numel()):  # VJP rows
        rows = torch.autograd.grad(x.flatten()[k], leaves, retain_graph=True, allow_unused=True)
        for a, row in enumerate(rows):
            row = torch.zeros_like(leaves[a]) if row is None else row
            assert rel_err(J_rev[a].reshape(x.numel(), -1)[k], row.flatten()) < TOL_BATCHED
    for a, t in enumerate(inputs):  # JVP columns and central differences
        cols_fwd = J_fwd[a].reshape(x.numel(), -1)
        cols_rev = J_rev[a].reshape(x.numel(), -1)
        for j in range(t.numel()):
            e = torch.zeros(t.numel(), dtype=t.dtype).reshape(t.shape)
            e.view(-1)[j] = 1.0
            tangents = tuple(e if i == a else torch.zeros_like(u) for i, u in enumerate(inputs))
            _, col = torch.func.jvp(f, tuple(inputs), tangents)
            assert rel_err(cols_fwd[:, j], col.flatten()) < TOL_BATCHED
            up = [u + eps * e if i == a else u for i, u in enumerate(inputs)]
            dn = [u - eps * e if i == a else u for i, u in enumerate(inputs)]
            fd = (f(*up) - f(*dn)).flatten() / (2 * eps)
            scale = max(float(cols_rev.norm()), 1.0)  # columns can be (exactly) zero
            assert float((cols_rev[:, j] - fd).norm()) < tol_fd * scale
            assert float((cols_fwd[:, j] - fd).norm()) < tol_fd * scale


@pytest.mark.parametrize("kkt", ["dense", "sparse"])
def test_qp_jacobian_matches_vjp_jvp_and_finite_differences(kkt):
    P, q, G, h = _qp_data()
    layer = _qp("layer", "clarabel", kkt)

    def f(S, q, G, h):
        # P = S + Sᵀ: the layer's derivative in P is that of its symmetric part, so perturb
        # P symmetrically (backends read one triangle of P)
        return layer(S + S.mT, q, G, h)

    # q batched (two problems), P, G, h shared: a full (2, n) x (every input) Jacobian
    _check_jacobians(f, (P / 2, q[0], G, h), TOL_FD)


def test_native_qp_jacobian_matches_vjp_jvp_and_finite_differences():
    P, q, G, h = _qp_data()
    layer = _qp("layer", "native")
    # in q only: the native solver is slower per call on these tiny problems than Clarabel
    _check_jacobians(lambda q: layer(P, q, G, h), (q[0],), TOL_FD)


def test_socp_jacobian_matches_vjp_jvp_and_finite_differences():
    x = cp.Variable(N)
    a, t = cp.Parameter(N), cp.Parameter(nonneg=True)
    # cp.SOC, not cp.norm(x) <= t: the latter adds a slack that is not unique when inactive
    prob = cp.Problem(cp.Minimize(a @ x + cp.sum_squares(x)), [cp.SOC(t, x)])
    layer = CvxpyLayer(prob, [a, t], [x], solver="clarabel", solver_args=SOLVERS["clarabel"])
    a_val = torch.tensor([[2.0, -1.0, 0.5], [0.2, 0.1, -0.3]], dtype=torch.float64)
    t_val = torch.tensor(0.7, dtype=torch.float64)  # active for the first item only
    _check_jacobians(lambda a, t: layer(a, t)[0], (a_val, t_val), TOL_FD_CURVED, eps=1e-6)


def test_least_squares_jacobian_through_eliminated_auxiliaries():
    # sum_squares(Fx − g) gets CVXPY's auxiliaries t = Fx − g, which the derivative eliminates
    # from J (a dense rank-one update per row of F); jacrev/jacfwd run through that path.
    gen = torch.Generator().manual_seed(3)
    F = torch.randn(5, N, generator=gen, dtype=torch.float64).numpy()
    x, g = cp.Variable(N), cp.Parameter(5)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(F @ x - g)), [x >= -0.2, cp.sum(x) == 0.5])
    layer = CvxpyLayer(prob, [g], [x], solver="clarabel", solver_args=SOLVERS["clarabel"])
    g_val = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    _check_jacobians(lambda g: layer(g)[0], (g_val,), TOL_FD)


class _Net(torch.nn.Module):
    """A linear map of the features to the cost of a QP, and the QP's solution."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, N, dtype=torch.float64)
        self.qp = QPLayer(solver_args={"tol": 1e-10})
        self.P, _, self.G, self.h = _qp_data()

    def forward(self, features):
        return self.qp(self.P, torch.tanh(self.lin(features)), self.G, self.h)


# dynamo reads .grad of the non-leaf tensors it meets while tracing; its warning, not ours
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("backend", ["aot_eager"])  # inductor works too, ~20 s to compile
def test_torch_compile_of_a_model_with_a_layer_matches_eager(backend):
    torch.manual_seed(0)
    model = _Net()
    features = torch.randn(6, 4, dtype=torch.float64)

    def step(net):
        model.zero_grad()
        x = net(features)
        x.pow(2).sum().backward()
        return x.detach(), [p.grad.clone() for p in model.parameters()]

    x_eager, g_eager = step(model)
    torch._dynamo.reset()
    x_comp, g_comp = step(torch.compile(model, backend=backend))
    assert rel_err(x_comp, x_eager) < TOL_BATCHED
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < TOL_BATCHED
