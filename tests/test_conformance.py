"""Conformance suite: every backend against closed-form solutions and their exact gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffopt import CvxpyLayer
from diffopt.solvers import get_backend
from problems import CASES, SOLVER_ARGS, TOL, rel_err

BACKENDS = ["native", "clarabel", "scs", "ecos"]


def _params():
    for case in CASES:
        for name in BACKENDS:
            be = get_backend(name)
            if case.cones <= be.cones and (be.quadratic_objective or not case.quadratic):
                yield pytest.param(case, name, id=f"{case.name}-{name}")


@pytest.mark.parametrize("case,solver", list(_params()))
def test_solution_and_vjp_match_closed_form(case, solver):
    prob, params, variables = case.build()
    layer = CvxpyLayer(prob, params, variables, solver=solver, solver_args=SOLVER_ARGS[solver])
    rng = np.random.default_rng(0)
    values = [v.requires_grad_() for v in case.sample(rng, 4)]
    outs = layer(*values)
    refs = case.reference(*values)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape
        assert rel_err(out.detach(), ref.detach()) < TOL[solver]
    # VJP with a random upstream gradient, against autograd through the closed form
    ups = [torch.as_tensor(rng.standard_normal(tuple(o.shape))) for o in outs]
    got = torch.autograd.grad(outs, values, ups)
    want = torch.autograd.grad(refs, values, ups)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 10 * TOL[solver]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_jvp_matches_closed_form(case):
    prob, params, variables = case.build()
    layer = CvxpyLayer(prob, params, variables, solver_args=SOLVER_ARGS["clarabel"])
    rng = np.random.default_rng(1)
    values = case.sample(rng, 3)
    tangents = case.sample(rng, 3)  # same structure as the values (symmetric where needed)
    _, got = torch.func.jvp(lambda *v: layer(*v), tuple(values), tuple(tangents))
    _, want = torch.func.jvp(lambda *v: case.reference(*v), tuple(values), tuple(tangents))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 10 * TOL["clarabel"]
