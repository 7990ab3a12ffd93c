"""Parallel solves of the per-item backends: threads, processes and the serial loop agree.

One process pool of two workers is started for the whole module (about 2-4 s: each worker
imports diffopt and torch) and reused by every test, as it is in user code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cvxpy as cp
import numpy as np
import pytest
import torch

import diffopt
from diffopt import Status
from diffopt.solvers import base
from diffopt.solvers.clarabel import ClarabelBackend

MODES = [dict(n_jobs=1), dict(n_jobs=2, parallel="threads"),
         dict(n_jobs=2, parallel="processes")]


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


@pytest.mark.parametrize("mode", MODES[1:], ids=["threads", "processes"])
def test_worker_errors_propagate(mode):
    layer = socp_layer("clarabel")
    p = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="unknown Clarabel option 'no_such_setting'"):
        layer(p, solver_args={"no_such_setting": 1, **mode})


@pytest.mark.parametrize("mode", MODES, ids=["serial", "threads", "processes"])
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


def test_auto_for_a_gil_bound_backend(monkeypatch):
    """A backend that holds the GIL: cheap batches stay serial, costly ones go to processes."""
    monkeypatch.setattr(ClarabelBackend, "releases_gil", False)
    layer = socp_layer("clarabel")
    p = torch.tensor(np.random.default_rng(2).standard_normal((5, 6)))
    calls = []
    real = base._solve_processes

    def spy(backend, data, options, n_jobs, n_threads):
        calls.append(data.size)
        return real(backend, data, options, n_jobs, n_threads)

    monkeypatch.setattr(base, "_solve_processes", spy)
    (x_serial,) = layer(p, solver_args={"n_jobs": 2})  # ~1 ms per item: no pool
    assert calls == []
    monkeypatch.setattr(ClarabelBackend, "auto_min_seconds", 0.0)
    (x_auto,) = layer(p, solver_args={"n_jobs": 2})
    assert calls == [4]  # the first item is solved here, to time it; the rest in the workers
    assert torch.equal(x_auto, x_serial)


def test_auto_uses_threads_for_solvers_that_release_the_gil(monkeypatch):
    monkeypatch.setattr(base, "_solve_processes", None)  # would fail if called
    layer = socp_layer("clarabel")
    p = torch.tensor(np.random.default_rng(3).standard_normal((5, 6)))
    (x,) = layer(p, solver_args={"n_jobs": 2})
    (ref,) = layer(p, solver_args={"n_jobs": 1})
    assert torch.equal(x, ref)


def test_option_validation():
    layer = socp_layer("clarabel")
    with pytest.raises(ValueError, match="parallel must be"):
        layer(torch.zeros(2, 6), solver_args={"parallel": "gpu"})
    with pytest.raises(ValueError, match="n_jobs must be a positive integer"):
        layer(torch.zeros(2, 6), solver_args={"n_jobs": -1})


@pytest.mark.slow  # a fresh interpreter and pool: ~5-10 s
def test_processes_from_an_unguarded_script(tmp_path):
    """Workers do not re-run the caller's script: no ``if __name__ == "__main__"`` needed."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent("""
        import cvxpy as cp, torch, diffopt
        print("script body ran")
        x, p = cp.Variable(3), cp.Parameter(3)
        prob = cp.Problem(cp.Minimize(cp.sum_squares(x - p)), [cp.norm(x, 2) <= 1])
        layer = diffopt.CvxpyLayer(prob, parameters=[p], variables=[x], solver="clarabel")
        (out,) = layer(torch.ones(4, 3), solver_args={"n_jobs": 2, "parallel": "processes"})
        print("ok", round(float(out[0, 0]), 6))
    """))
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["script", "body", "ran", "ok", str(round(3 ** -0.5, 6))]
