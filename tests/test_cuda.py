"""The CUDA path: tensors on the GPU in, on the GPU out, same answers and gradients as the CPU.

Runs only where a CUDA device is present (the CPU-only CI skips this module).
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import LPGD, CvxpyLayer, LogBarrier, Perturbed, QPLayer, QuadraticSmoothing
from problems import rel_err, soc_case, sparsemax_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _both(fn, *tensors):
    """Run ``fn`` on CPU and CUDA copies of ``tensors``; return outputs and input gradients."""
    res = []
    for dev in ("cpu", "cuda"):
        ts = [t.detach().to(dev).requires_grad_() for t in tensors]
        out = fn(*ts)
        gen = torch.Generator().manual_seed(0)  # a generic upstream gradient, same on both
        up = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(dev)
        g = torch.autograd.grad(out, ts, up)
        assert out.device.type == dev and all(x.device.type == dev for x in g)
        res.append((out.detach().cpu(), [x.cpu() for x in g]))
    return res


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_qplayer_native_on_cuda_matches_cpu(dtype, tol):
    rng = np.random.default_rng(0)
    B, n, m, p = 16, 12, 8, 3
    L = torch.as_tensor(rng.standard_normal((n, n)))
    P = (L @ L.T + torch.eye(n, dtype=torch.float64)).to(dtype)
    q = torch.as_tensor(rng.standard_normal((B, n)), dtype=dtype)
    G = torch.as_tensor(rng.standard_normal((m, n)), dtype=dtype)
    h = torch.ones(m, dtype=dtype)
    A = torch.as_tensor(rng.standard_normal((p, n)), dtype=dtype)
    b = torch.zeros(p, dtype=dtype)
    layer = QPLayer()
    (cpu_x, cpu_g), (gpu_x, gpu_g) = _both(lambda *t: layer(*t), P, q, G, h, A, b)
    assert gpu_x.dtype == dtype
    assert rel_err(gpu_x.double(), cpu_x.double()) < tol
    for a, c in zip(gpu_g, cpu_g):
        assert rel_err(a.double(), c.double()) < 10 * tol


@pytest.mark.parametrize("case", [sparsemax_case(5), soc_case(4)], ids=lambda c: c.name)
def test_cvxpylayer_cuda_inputs_native_and_conic(case):
    """LP/QP go to the native solver on the GPU; SOC goes to Clarabel on the CPU and back."""
    prob, params, variables = case.build()
    layer = CvxpyLayer(prob, params, variables)
    z = case.sample(np.random.default_rng(1), 8)[0]
    (cpu_x, cpu_g), (gpu_x, gpu_g) = _both(lambda t: layer(t)[0], z)
    assert rel_err(gpu_x, cpu_x) < 1e-6
    assert rel_err(gpu_g[0], cpu_g[0]) < 1e-5
    assert rel_err(gpu_x, case.reference(z)[0]) < 1e-6


def test_cvxpylayer_module_to_cuda_moves_buffers():
    prob, params, variables = sparsemax_case(4).build()
    layer = CvxpyLayer(prob, params, variables).cuda()
    assert all(b.device.type == "cuda" for b in layer.buffers())
    (x,) = layer(torch.randn(3, 4, dtype=torch.float64, device="cuda"))
    assert x.device.type == "cuda"


@pytest.mark.parametrize("mode", [QuadraticSmoothing(1.0), LogBarrier(0.1),
                                  Perturbed(0.5, 64, seed=0), LPGD(1.0)],
                         ids=lambda m: type(m).__name__)
def test_gradient_modes_on_cuda(mode):
    x = cp.Variable(4)
    c = cp.Parameter(4)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(c @ x), [cp.sum(x) == 1, x >= 0]), [c], [x])
    cost = torch.tensor([[0.0, 0.3, 0.6, 0.2]], dtype=torch.float64)
    target = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    grads = []
    for dev in ("cpu", "cuda"):
        cc = cost.detach().to(dev).requires_grad_()
        (sol,) = layer(cc, gradient=mode)
        ((sol - target.to(dev)) ** 2).sum().backward()
        grads.append(cc.grad.cpu())
    if isinstance(mode, Perturbed):
        # CPU and CUDA draw different random streams, so the two Monte-Carlo estimates differ;
        # with 8 samples one CUDA draw hit only vertices of equal loss (an exactly zero, valid
        # estimate), hence 64 samples and a scale check.
        assert torch.isfinite(grads[1]).all() and grads[1].abs().max() > 1e-3
    else:
        assert rel_err(grads[1], grads[0]) < 1e-5
