"""Parallel solves of the per-item backends: the thread pool and the serial loop agree."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

import diffopt
from diffopt import Status

MODES = [dict(n_jobs=1), dict(n_jobs=2)]


def socp_layer(solver: str):
    """A small SOCP: nearest point to p in a ball intersected with a box, p parametric."""
    n = 6
    x, p = cp.Variable(n), cp.Parameter(n)
    prob = cp.Problem(cp.Minimize(-p @ x + 0.1 * cp.norm(x, 2)),
                      [cp.norm(x, 2) <= 1, x >= -0.5, cp.sum(x) == 0.3])
    return diffopt.CvxpyLayer(prob, parameters=[p], variables=[x], solver=solver)


def box_qp_layer():
    """min ‖x − p‖²  s.t.  lo ≤ x ≤ 1: infeasible for an item with lo > 1."""
    x, p, lo = cp.Variable(4), cp.Parameter(4), cp.Parameter(4)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [x >= lo, x <= 1])
    return diffopt.CvxpyLayer(prob, parameters=[p, lo], variables=[x], solver="clarabel")


@pytest.mark.parametrize("solver", ["clarabel", "scs", "ecos"])
def test_same_answers_for_every_worker_setup(solver):
    pytest.importorskip(solver)
    layer = socp_layer(solver)
    p = torch.tensor(np.random.default_rng(0).standard_normal((7, 6)), requires_grad=True)
    args = {"tol": 1e-7} if solver == "scs" else {}
    outs, grads = [], []
    for mode in MODES:
        (x,) = layer(p, solver_args={**args, **mode})
        (g,) = torch.autograd.grad((x * torch.arange(6.0)).sum(), p)
        assert all(st is Status.OPTIMAL for st in layer.info.status)
        outs.append(x.detach())
        grads.append(g)
    for x, g in zip(outs[1:], grads[1:]):
        assert torch.equal(x, outs[0])  # bitwise: same solver, same data, one BLAS thread or not
        torch.testing.assert_close(g, grads[0], rtol=0, atol=1e-12)


def test_worker_errors_propagate():
    layer = socp_layer("clarabel")
    p = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="unknown Clarabel option 'no_such_setting'"):
        layer(p, solver_args={"no_such_setting": 1, "n_jobs": 2})


@pytest.mark.parametrize("mode", MODES, ids=["serial", "threads"])
def test_failing_item_in_the_middle_keeps_its_status(mode):
    layer = box_qp_layer()
    B = 7
    p = torch.tensor(np.random.default_rng(1).standard_normal((B, 4)))
    lo = torch.full((B, 4), -1.0, dtype=torch.float64)
    lo[3, 2] = 2.0  # item 3 infeasible (2 ≤ x₂ ≤ 1)
    (x,) = layer(p, lo, solver_args={"on_failure": "nan", **mode})
    expected = [Status.OPTIMAL] * B
    expected[3] = Status.INFEASIBLE
    assert layer.info.status == expected
    assert torch.isnan(x[3]).all() and not torch.isnan(x[torch.arange(B) != 3]).any()
    torch.testing.assert_close(x[0], p[0].clamp(-1.0, 1.0), rtol=0, atol=1e-7)
    with pytest.raises(diffopt.SolverError, match=r"items \[3\] INFEASIBLE"):
        layer(p, lo, solver_args=mode)


def test_option_validation():
    layer = socp_layer("clarabel")
    with pytest.raises(ValueError, match="n_jobs must be a positive integer"):
        layer(torch.zeros(2, 6), solver_args={"n_jobs": -1})


def _solve_in_child(queue):
    layer = socp_layer("clarabel")
    (x,) = layer(torch.ones(4, 6, dtype=torch.float64), solver_args={"n_jobs": 2})
    queue.put(x.numpy())


def test_pool_works_in_a_forked_child():
    # The parent's pool threads do not exist in a forked child; a pool kept across the fork
    # would queue the child's items forever.
    import multiprocessing as mp

    layer = socp_layer("clarabel")
    (x,) = layer(torch.ones(4, 6, dtype=torch.float64), solver_args={"n_jobs": 2})
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_solve_in_child, args=(queue,))
    child.start()
    try:
        got = queue.get(timeout=60)
        child.join(timeout=60)
    finally:
        child.kill()  # a no-op once it has exited
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, x.numpy())


def test_parallel_map_nested_and_errors():
    from diffopt.solvers.base import parallel_map

    assert parallel_map(lambda i: parallel_map(lambda j: 10 * i + j, 3, 2), 4, 2) == \
        [[10 * i + j for j in range(3)] for i in range(4)]
    import time

    done = []

    def fails_at_5(i):
        done.append(i)
        time.sleep(1e-3)  # like a solve: releases the GIL, so neither thread races through
        return 1 / (i - 5)

    with pytest.raises(ZeroDivisionError):
        parallel_map(fails_at_5, 1000, 2)
    assert 5 in done and len(done) < 100  # the threads stopped taking items


def test_small_derivative_of_a_threaded_solve_runs_on_one_torch_thread(monkeypatch):
    # See PerItemBackend.one_thread_derivative: torch's idle OpenMP workers spin after a
    # multi-threaded op and would take a core from the next forward's solver threads.
    from diffopt.diff import kkt
    from diffopt.solvers import base

    threads = []
    build = kkt.KKTDifferentiator.__init__

    def spy(self, *args, **kwargs):
        threads.append(torch.get_num_threads())
        build(self, *args, **kwargs)

    monkeypatch.setattr(kkt.KKTDifferentiator, "__init__", spy)
    layer = socp_layer("clarabel")
    p = torch.tensor(np.random.default_rng(1).standard_normal((5, 6)), requires_grad=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    grads = []
    try:
        for n_jobs, limit in ((2, base.ONE_THREAD_DERIVATIVE), (1, base.ONE_THREAD_DERIVATIVE),
                              (2, 0)):
            monkeypatch.setattr(base, "ONE_THREAD_DERIVATIVE", limit)
            (x,) = layer(p, solver_args={"n_jobs": n_jobs, "refine": False})  # its own test
            (g,) = torch.autograd.grad(x.square().sum(), p)
            grads.append(g)
            assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    # threaded and small; serial forward; threaded but above the limit
    assert threads == [1, 2, 2]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-9, atol=1e-12)
