"""Differential fuzzing (issue 18): every family against independent per-item CVXPY solves.

The seeded subset here runs in the default suite and asserts the targets: no silent wrong answer,
no crash, no false failure (see ``fuzz.py`` for the classes and tolerances). The ``slow`` run is
the same with ten times the cases. ``python benchmarks/fuzz_report.py`` prints the table for any
number of cases, and reproduces one case by its seed.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

import fuzz


def _assert_targets(records):
    unsupported = [r for r in records if r.outcome == "unsupported"]
    if unsupported:
        pytest.skip(f"unsupported: {unsupported[0].detail}")
    bad = [r for r in records if r.outcome in fuzz.BAD]
    assert not bad, "\n" + fuzz.summary(records)


@pytest.mark.parametrize("family", list(fuzz.FAMILIES))
def test_fuzz_targets(family):
    """Two cases (float64, float32) of six items, every backend, two gradient checks each."""
    _assert_targets(fuzz.run([family], cases=2, batch=6, grad=2))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(fuzz.FAMILIES))
def test_fuzz_targets_large(family):
    _assert_targets(fuzz.run([family], cases=20, batch=8, grad=3, seed=1))


# The harness itself: its references, kinds and checks must be right for its verdicts to count.


def test_items_are_deterministic():
    a = fuzz.run_case("qp", 7, batch=4, dtype=torch.float64, grad=1, backends=("clarabel",))
    b = fuzz.run_case("qp", 7, batch=4, dtype=torch.float64, grad=1, backends=("clarabel",))
    assert [r.line() for r in a] == [r.line() for r in b]


@pytest.mark.parametrize("family", ["lp", "qp", "qplayer", "socp", "sdp_projection", "exp"])
def test_drawn_kinds_match_the_reference(family):
    """An item drawn infeasible (unbounded) is so for the reference, after rounding too."""
    for seed, dtype in ((0, torch.float64), (1, torch.float32)):
        struct = fuzz.FAMILIES[family](np.random.default_rng(seed))
        for it in fuzz.draw_items(struct, seed, 8, dtype):
            ref = fuzz.reference(struct, it.ref_values)
            assert ref.status == {"feasible": "optimal"}.get(it.kind, it.kind), (seed, it.kind)


@pytest.mark.parametrize("family", ["lp", "qp", "portfolio", "mixed"])
def test_scaled_reference_scales_the_answer(family):
    """The covariance the harness relies on: data scaled by (s_b, s_c) give x = s_b x_unit."""
    struct = fuzz.FAMILIES[family](np.random.default_rng(3))
    it = fuzz.draw_items(struct, 3, 1, torch.float64)[0]
    unit = fuzz.reference(struct, it.unit)
    s_b, s_c = 10.0, (0.1 if "c" in struct.scaled else 1.0)
    scaled = {k: v * fuzz._factor(struct.params[k], s_b, s_c) for k, v in it.unit.items()}
    ref = fuzz.reference(struct, scaled)
    assert unit.status == ref.status
    for xu, xs in zip(unit.x or [], ref.x or []):
        tol = fuzz.TOL[torch.float64].value  # the reference's own accuracy is within it
        np.testing.assert_allclose(xs / s_b, xu, rtol=0, atol=tol * max(1.0, np.abs(xu).max()))


def test_check_answer_flags_a_wrong_answer():
    struct = fuzz.FAMILIES["soc_projection"](np.random.default_rng(0))
    it = fuzz.draw_items(struct, 0, 1, torch.float64)[0]
    ref = fuzz.reference(struct, it.ref_values)
    assert fuzz._check_answer(struct, it.ref_values, ref, ref.x, 1e-5, 1e-6) is None
    off = [x + 1e-3 for x in ref.x]
    assert "rel x err" in fuzz._check_answer(struct, it.ref_values, ref, off, 1e-5, 1e-6)


def test_finite_differences_match_a_closed_form():
    """The gradient reference on x = argmin ‖x − z‖² = z: d⟨w, x⟩ along δ is ⟨w, δ⟩."""

    def build(P):
        x = cp.Variable(3)
        return cp.Problem(cp.Minimize(cp.sum_squares(x - P("z")))), [x]

    struct = fuzz.Structure({"z": fuzz.Param((3,), b=1)}, build,
                            lambda r, kind: {"z": r.standard_normal(3)})
    it = fuzz.draw_items(struct, 0, 1, torch.float64)[0]
    ref = fuzz.reference(struct, it.ref_values)
    fd = fuzz._finite_difference(struct, it, ref, np.random.default_rng(1))
    assert abs(fd.central - float(fd.w[0] @ fd.delta["z"])) < 1e-6
    assert fd.gap < 1e-6 and fd.spread < 1e-6
