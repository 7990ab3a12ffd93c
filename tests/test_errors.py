"""Every malformed input gets a clear error: what was expected, what was received, what to do."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from diffopt import CvxpyLayer, InputError, ProblemError, SolverError


@pytest.fixture
def simple():
    x = cp.Variable(3)
    z = cp.Parameter(3)
    w = cp.Parameter(nonneg=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x - z) + w * cp.sum(x)), [x >= 0])
    return prob, z, w, x


def test_not_dcp_names_expression():
    x = cp.Variable(2)
    z = cp.Parameter(2)
    prob = cp.Problem(cp.Maximize(cp.sum_squares(x - z)), [x >= 0, x <= 1])
    with pytest.raises(ProblemError, match="not DCP.*power|not DCP.*quad_over_lin|not DCP"):
        CvxpyLayer(prob, [z], [x])


def test_not_dpp_names_offending_product():
    x = cp.Variable(2)
    a, b = cp.Parameter(2), cp.Parameter(pos=True)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x) + (a * b) @ x), [x >= 0])
    with pytest.raises(ProblemError, match=r"not DPP: `.*param.*@|not DPP: `.*\*"):
        CvxpyLayer(prob, [a, b], [x])


def test_problem_without_parameters():
    x = cp.Variable(2)
    prob = cp.Problem(cp.Minimize(cp.sum_squares(x)), [x >= 1])
    with pytest.raises(ProblemError, match="no cvxpy.Parameter"):
        CvxpyLayer(prob, [], [x])


def test_not_a_problem():
    with pytest.raises(ProblemError, match="expected a cvxpy.Problem, received str"):
        CvxpyLayer("min x", [], [])


def test_parameter_list_must_match(simple):
    prob, z, w, x = simple
    with pytest.raises(ProblemError, match=r"missing \['param"):
        CvxpyLayer(prob, [z], [x])
    other = cp.Parameter(2, name="other")
    with pytest.raises(ProblemError, match=r"not in the problem \['other'\]"):
        CvxpyLayer(prob, [z, w, other], [x])
    with pytest.raises(ProblemError, match="same cvxpy.Parameter twice"):
        CvxpyLayer(prob, [z, z, w], [x])
    with pytest.raises(ProblemError, match="list of cvxpy.Parameter"):
        CvxpyLayer(prob, [z, "w"], [x])


def test_variables_must_belong_to_problem(simple):
    prob, z, w, x = simple
    with pytest.raises(ProblemError, match="neither a variable of the problem"):
        CvxpyLayer(prob, [z, w], [cp.Variable(3)])
    with pytest.raises(ProblemError, match="non-empty list"):
        CvxpyLayer(prob, [z, w], [])


def test_unknown_solver_and_unsupported_cones(simple):
    prob, z, w, x = simple
    with pytest.raises(ValueError, match="unknown solver 'gurobi'"):
        CvxpyLayer(prob, [z, w], [x], solver="gurobi")
    with pytest.raises(ProblemError, match="'ecos' does not accept a quadratic objective"):
        CvxpyLayer(prob, [z, w], [x], solver="ecos")


def test_wrong_number_of_tensors(simple):
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(InputError, match="expected 2 tensors .* received 1"):
        layer(torch.zeros(3))


def test_non_tensor_and_integer_inputs(simple):
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(InputError, match="expected a torch.Tensor, received ndarray.*as_tensor"):
        layer(np.zeros(3), torch.tensor(1.0))
    with pytest.raises(InputError, match="floating-point tensor, received dtype torch.int64"):
        layer(torch.zeros(3, dtype=torch.int64), torch.tensor(1.0))


def test_wrong_shape(simple):
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(InputError, match=r"expected shape \(3,\) or \(batch, \*\(3,\)\), received \(4,\)"):
        layer(torch.zeros(4), torch.tensor(1.0))


def test_inconsistent_batch_and_empty_batch(simple):
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(InputError, match=r"Inconsistent batch sizes \[2, 5\]"):
        layer(torch.zeros(2, 3), torch.ones(5))
    with pytest.raises(InputError, match="batch size 0"):
        layer(torch.zeros(0, 3), torch.tensor(1.0))


def test_mixed_devices(simple):
    """Tensors on two devices (the meta device stands in for a GPU on CPU-only machines)."""
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(InputError, match=r"one device, received param\d+ on cpu, param\d+ on meta"):
        layer(torch.zeros(3), torch.tensor(1.0, device="meta"))


def test_nan_and_inf(simple):
    """NaN or Inf fails the items it reaches (status NOT_FINITE), see also test_numeric.py."""
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(SolverError, match=r"items \[0\] NOT_FINITE: the item's data .* NaN or Inf"):
        layer(torch.tensor([0.0, float("nan"), 1.0]), torch.tensor(1.0))
    with pytest.raises(SolverError, match="NOT_FINITE"):
        layer(torch.zeros(3), torch.tensor(float("inf")))


def test_sign_attributes(simple):
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(InputError, match="declared nonneg=True but received negative values"):
        layer(torch.zeros(3), torch.tensor(-0.5))
    xv = cp.Variable(1)
    p = cp.Parameter(pos=True)
    layer2 = CvxpyLayer(cp.Problem(cp.Minimize(p * cp.sum_squares(xv) + xv[0])), [p], [xv])
    with pytest.raises(InputError, match="declared pos=True but received values <= 0"):
        layer2(torch.tensor(0.0))


def test_psd_and_nsd_parameters_are_checked_on_their_symmetric_part():
    Pp = cp.Parameter((2, 2), PSD=True)
    Y = cp.Variable((2, 2), PSD=True)
    layer = CvxpyLayer(cp.Problem(cp.Minimize(cp.trace(Pp @ Y)), [cp.trace(Y) == 1]), [Pp], [Y])
    with pytest.raises(InputError, match="declared PSD but received a matrix with eigenvalue"):
        layer(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    # the symmetric part [[1, 2], [2, 1]] has eigenvalue -1 (the lower triangle alone would not)
    with pytest.raises(InputError, match=r"eigenvalue -1 < 0 \(of its symmetric part\)"):
        layer(torch.tensor([[1.0, 4.0], [0.0, 1.0]]))
    layer(torch.tensor([[1.0, 0.5], [-0.5, 1.0]]))  # not symmetric, symmetric part PSD
    Nn = cp.Parameter((2, 2), NSD=True)
    layer = CvxpyLayer(cp.Problem(cp.Maximize(cp.trace(Nn @ Y)), [cp.trace(Y) == 1]), [Nn], [Y])
    with pytest.raises(InputError, match="declared NSD but received a matrix with eigenvalue 1 >"):
        layer(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_bad_failure_policy(simple):
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(InputError, match="on_failure must be 'raise' or 'nan', received 'skip'"):
        layer(torch.zeros(3), torch.tensor(1.0), solver_args={"on_failure": "skip"})


def test_unknown_backend_option(simple):
    prob, z, w, x = simple
    layer = CvxpyLayer(prob, [z, w], [x])
    with pytest.raises(ValueError, match=r"unknown .*option.*tolerance"):
        layer(torch.zeros(3), torch.tensor(1.0), solver_args={"tolerance": 1e-3})


def test_gp_is_refused(simple):
    prob, z, w, x = simple
    with pytest.raises(ProblemError, match="gp=True"):
        CvxpyLayer(prob, [z, w], [x], gp=True)
