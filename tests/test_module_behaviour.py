"""Models that contain layers behave like torch modules: serialization, copies, threads, faults.

Each test compares outputs and gradients after the operation with those before it (float64,
same solver settings, so they agree to round-off).
"""

from __future__ import annotations

import copy
import io
import signal
import threading
import time

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch import nn

from diffopt import CvxpyLayer, QPLayer, SolverError, Status
from diffopt.solvers import clarabel as clarabel_mod
from diffopt.solvers.base import parallel_map

F64 = torch.float64
TOL = 1e-10  # same solves before and after: round-off only


class Model(nn.Module):
    """A linear map feeding a CVXPY projection layer and a QP layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 3).double()
        x = cp.Variable(3)
        z = cp.Parameter(3)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z)), [cp.sum(x) == 1, x >= 0])
        self.proj = CvxpyLayer(prob, [z], [x], solver="clarabel", solver_args={"tol": 1e-10})
        self.qp = QPLayer(solver_args={"tol": 1e-10})
        self.register_buffer("G", torch.eye(3, dtype=F64))

    def forward(self, u):
        (p,) = self.proj(self.lin(u))
        return self.qp(torch.eye(3, dtype=F64), -p, self.G, 0.3 * torch.ones(3, dtype=F64))


def _run(model, u):
    """Outputs and the gradients of a fixed loss with respect to the input and the weights."""
    u = u.clone().requires_grad_()
    out = model(u)
    loss = (out * torch.arange(1.0, 4.0, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, [u, *model.parameters()])
    return out.detach(), grads


def _same(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.allclose(out_a, out_b, atol=TOL, rtol=0)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, atol=TOL, rtol=0)


def _input():
    return torch.tensor([[0.2, -0.1, 0.5], [1.0, 0.3, -0.4]], dtype=F64)


def test_torch_save_load_whole_model():
    model = Model()
    before = _run(model, _input())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # a whole module is a pickle, not weights
    _same(before, _run(loaded, _input()))
    assert loaded.proj.info.status == [Status.OPTIMAL] * 2


def test_state_dict_round_trip():
    model = Model()
    with torch.no_grad():
        model.lin.weight.add_(0.1)
    before = _run(model, _input())
    fresh = Model()
    fresh.load_state_dict(model.state_dict())
    _same(before, _run(fresh, _input()))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # weights only: loads with the safe default
    buf.seek(0)
    again = Model()
    again.load_state_dict(torch.load(buf))
    _same(before, _run(again, _input()))


def test_deepcopy():
    model = Model()
    before = _run(model, _input())
    clone = copy.deepcopy(model)
    _same(before, _run(clone, _input()))
    with torch.no_grad():  # the copy owns its parameters
        clone.lin.bias.add_(1.0)
    _same(before, _run(model, _input()))


@pytest.mark.parametrize("which", ["proj", "qp"])
def test_layer_called_from_two_threads(which):
    """Two threads calling one layer at once get the answers of sequential calls, and each
    thread's ``layer.info`` describes its own most recent call."""
    model = Model()
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(k + 1, 3, generator=gen, dtype=F64) for k in range(6)]
    layer = getattr(model, which)

    def call(u):
        if which == "proj":
            return layer(u)[0]
        return layer(torch.eye(3, dtype=F64), u, model.G, 0.3 * torch.ones(3, dtype=F64))

    def run(u):
        u = u.clone().requires_grad_()
        out = call(u)
        (g,) = torch.autograd.grad(out.pow(2).sum(), u)
        return out.detach(), g, len(layer.info.status)

    expected = [run(u) for u in inputs]
    results: dict = {}
    errors: list = []
    start = threading.Barrier(2)

    def worker(t):
        try:
            start.wait()
            for rep in range(4):
                for k in range(t, len(inputs), 2):
                    results[(t, rep, k)] = run(inputs[k])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in threads)
    assert len(results) == 2 * 4 * 3
    for (_, _, k), (out, g, count) in results.items():
        assert torch.allclose(out, expected[k][0], atol=TOL, rtol=0)
        assert torch.allclose(g, expected[k][1], atol=TOL, rtol=0)
        assert count == k + 1  # the info of this thread's call (batch of k + 1), not the other's


def test_backend_raising_for_one_item(monkeypatch):
    """A per-item backend that raises on one item: the others keep their answers and statuses
    (``on_failure="nan"``), and the error names the item and the backend's exception."""
    original = clarabel_mod.ClarabelBackend.solve_one

    def flaky(self, P, c, A, b, dims, options):
        if abs(c[0] - 7.0) < 1e-12:
            raise RuntimeError("solver crashed on this item")
        return original(self, P, c, A, b, dims, options)

    monkeypatch.setattr(clarabel_mod.ClarabelBackend, "solve_one", flaky)
    x = cp.Variable(2)
    c = cp.Parameter(2)
    prob = cp.Problem(cp.Minimize(c @ x + cp.sum_squares(x)), [x >= -1])
    layer = CvxpyLayer(prob, [c], [x], solver="clarabel")
    cs = torch.tensor([[1.0, 0.0], [7.0, 0.0], [0.0, 2.0]], dtype=F64, requires_grad=True)
    for n_jobs in (1, 2):
        (sol,) = layer(cs, solver_args={"on_failure": "nan", "n_jobs": n_jobs})
        assert layer.info.status == [Status.OPTIMAL, Status.NUMERICAL_ERROR, Status.OPTIMAL]
        assert "solver crashed on this item" in layer.info.errors[1]
        assert torch.isnan(sol[1]).all()
        ref = torch.clamp(-cs.detach() / 2, min=-1.0)
        assert torch.allclose(sol[[0, 2]], ref[[0, 2]], atol=1e-7)
        (g,) = torch.autograd.grad(sol[[0, 2]].sum(), cs)
        assert torch.isfinite(g).all() and (g[1] == 0).all()
        with pytest.raises(SolverError, match=r"items \[1\].*RuntimeError: solver crashed"):
            layer(cs, solver_args={"n_jobs": n_jobs})


def test_backend_raising_for_every_item_propagates(monkeypatch):
    """The same exception on every item (a bad option, a broken install) is raised as is."""
    def broken(self, *args):
        raise ValueError("unknown Clarabel option 'bogus'")

    monkeypatch.setattr(clarabel_mod.ClarabelBackend, "solve_one", broken)
    layer = QPLayer(solver="clarabel")
    with pytest.raises(ValueError, match="unknown Clarabel option"):
        layer(torch.eye(2, dtype=F64), torch.ones(3, 2, dtype=F64))


def _ctrl_c() -> None:
    """A real SIGINT to the main thread (it interrupts a blocking wait, as Ctrl-C does)."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _pool_threads() -> int:
    return sum(t.name.startswith("diffopt") for t in threading.enumerate())


def test_ctrl_c_still_interrupts_after_ecos_solves_on_threads():
    """ECOS installs its own SIGINT handler per solve; solves on two threads restored each
    other's, and Ctrl-C then no longer raised KeyboardInterrupt (20 of 20 batches, before)."""
    x, z = cp.Variable(20), cp.Parameter(20)
    prob = cp.Problem(cp.Minimize(cp.norm(x - z)), [cp.norm(x) <= 1, x >= -0.5])
    layer = CvxpyLayer(prob, [z], [x], solver="ecos")
    for _ in range(3):
        layer(torch.randn(64, 20, dtype=F64), solver_args={"n_jobs": 2})
        with pytest.raises(KeyboardInterrupt):
            _ctrl_c()
            time.sleep(0.5)


def test_keyboard_interrupt_during_parallel_map():
    """Ctrl-C (KeyboardInterrupt in the main thread) while the pool solves: raised at once,
    the workers take no further item, and no thread is left behind or started anew."""
    calls = []

    def slow(i):
        calls.append(i)
        if i == 1:
            _ctrl_c()
        time.sleep(0.05)
        return i

    parallel_map(lambda i: time.sleep(0.01), 4, n_jobs=2)  # both threads of the pool started
    threads = _pool_threads()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        parallel_map(slow, 200, n_jobs=2)
    assert time.perf_counter() - t0 < 2.0
    time.sleep(0.3)  # the workers finish the item in hand
    done = len(calls)
    time.sleep(0.3)
    assert len(calls) == done < 20  # stopped, not draining the 200 items
    assert _pool_threads() == threads
    assert parallel_map(lambda i: 2 * i, 5, n_jobs=2) == [0, 2, 4, 6, 8]  # pool still usable


def test_keyboard_interrupt_during_layer_call(monkeypatch):
    """The same through a layer: the call raises KeyboardInterrupt, the next call works."""
    original = clarabel_mod.ClarabelBackend.solve_one
    seen = []

    def interrupting(self, P, c, A, b, dims, options):
        seen.append(1)
        if len(seen) == 2:
            _ctrl_c()
            time.sleep(0.05)
        return original(self, P, c, A, b, dims, options)

    monkeypatch.setattr(clarabel_mod.ClarabelBackend, "solve_one", interrupting)
    layer = QPLayer(solver="clarabel", solver_args={"n_jobs": 2})
    q = torch.randn(64, 2, dtype=F64)
    with pytest.raises(KeyboardInterrupt):
        layer(torch.eye(2, dtype=F64), q)
    time.sleep(0.2)
    monkeypatch.setattr(clarabel_mod.ClarabelBackend, "solve_one", original)
    x = layer(torch.eye(2, dtype=F64), q)
    assert torch.allclose(x, -q, atol=1e-8)
    assert np.all([st is Status.OPTIMAL for st in layer.info.status])
