"""Smoke tests of the layer gallery examples: each ``main([...])`` with tiny settings.

The default-suite tests take a few seconds each; the ``slow`` ones run every example at its
defaults and check the numbers the example is about (run with ``pytest -m slow``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gallery_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(*values) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def test_differentiable_simulation(tmp_path):
    out = load("differentiable_simulation").main(
        ["--steps", "40", "--iters", "3", "--targets", "3.8", "--plot", str(tmp_path / "s.png")])
    assert finite(out["loss_before"], out["loss_after"], *sum(out["v0_learned"], []))
    assert out["loss_after"] < out["loss_before"]
    assert (tmp_path / "s.png").stat().st_size > 0


def test_optnet_polytope(tmp_path):
    out = load("optnet_polytope").main(
        ["--steps", "40", "--train", "256", "--test", "128", "--batch", "64", "--plot", "",
         "--json", str(tmp_path / "p.json")])
    assert finite(out["mse_before"], out["mse_after"], out["iou_after"])
    assert out["mse_after"] < 0.5 * out["mse_before"]
    assert out["iou_after"] > out["iou_before"]
    assert (tmp_path / "p.json").exists()


def test_portfolio_socp(tmp_path):
    out = load("portfolio_socp").main(
        ["--assets", "6", "--train", "64", "--test", "100", "--epochs", "2", "--seeds", "0",
         "--plot", str(tmp_path / "f.png")])
    for m in ("two-stage", "decision-focused", "equal-weight", "oracle"):
        assert finite(out[m]["return_mean"], out[m]["regret_mean"], out[m]["risk_mean"])
    assert abs(out["oracle"]["regret_mean"]) < 1e-12
    # every learned portfolio satisfies the risk budget the oracle meets with equality
    assert out["decision-focused"]["risk_mean"] <= out["oracle"]["risk_mean"] * (1 + 1e-5)
    assert out["decision-focused"]["regret_mean"] >= -1e-6
    # decision-focused training improves on the first epoch
    curve = out["decision-focused"]["curves"][0]
    assert curve[-1] < curve[0] or len(curve) == 1


def test_plot_sdp_maxcut():
    out = load("plot_sdp_maxcut").main(
        ["--nodes", "6", "--train", "16", "--test", "16", "--batch", "8", "--steps", "10",
         "--plot", ""])
    assert finite(out["loss_before"], out["loss_after"], out["acc_after"])
    assert out["loss_after"] < out["loss_before"]
    assert 0.5 <= out["acc_after"] <= 1.0


def test_mpc_learned_cost():
    out = load("mpc_learned_cost").main(
        ["--steps", "8", "--iters", "8", "--train", "4", "--test", "4", "--plot", ""])
    assert finite(out["test_loss_before"], out["test_loss_after"], *out["weights_learned"])
    assert out["test_loss_after"] < out["test_loss_before"]


# -- the examples at their defaults, checking what each one demonstrates -------------------------
@pytest.mark.slow
def test_differentiable_simulation_defaults(tmp_path):
    out = load("differentiable_simulation").main(["--plot", str(tmp_path / "s.png")])
    assert out["loss_after"] < 0.01 * out["loss_before"]


@pytest.mark.slow
def test_optnet_polytope_defaults(tmp_path):
    out = load("optnet_polytope").main(["--plot", str(tmp_path / "p.png")])
    assert out["mse_after"] < 1e-4 and out["iou_after"] > 0.97


@pytest.mark.slow
def test_portfolio_socp_defaults(tmp_path):
    out = load("portfolio_socp").main(["--plot", str(tmp_path / "f.png")])
    assert out["decision-focused"]["regret_mean"] < out["two-stage"]["regret_mean"]
    assert out["two-stage"]["regret_mean"] < out["equal-weight"]["regret_mean"]


@pytest.mark.slow
def test_plot_sdp_maxcut_defaults(tmp_path):
    out = load("plot_sdp_maxcut").main(["--plot", str(tmp_path / "m.png")])
    assert out["acc_after"] > 0.95 > out["acc_before"]


@pytest.mark.slow
def test_mpc_learned_cost_defaults(tmp_path):
    out = load("mpc_learned_cost").main(["--plot", str(tmp_path / "c.png")])
    assert out["test_loss_after"] < 0.01 * out["test_loss_before"]


def test_shortest_path_main_job(tmp_path):
    """README's main job with tiny settings: table, JSON and figure; --validation scores on
    held-out training points, not on the test set."""
    import json

    sp = load("shortest_path")
    common = ["--degrees", "2", "--epochs", "2", "--train", "96", "--test", "64",
              "--methods", "two-stage-ls", "spo+", "log-barrier"]
    out = tmp_path / "results"                 # not there yet: the script creates it
    table = sp.main([*common, "--json", str(out / "r.json"), "--plot", str(out / "r.png")])
    written = json.loads((out / "r.json").read_text())
    # the command-line options and nothing else (no per-loop "deg")
    assert set(written["args"]) == {
        "degrees", "methods", "seeds", "epochs", "train", "test", "validation", "noise", "batch",
        "lr", "gamma", "mu", "tau", "sigma", "samples", "max_iters", "threads", "json", "plot"}
    saved = written["normalized_regret_percent"]
    for method in ("two-stage-ls", "spo+", "log-barrier"):
        mean = table[method][2]["mean"]
        assert finite(mean) and 0.0 <= mean < 100.0
        assert saved[method]["2"]["mean"] == mean
    assert (out / "r.png").stat().st_size > 0
    # each method trains with its own learning rate, unless --lr sets one for all
    assert saved["spo+"]["2"]["lr"] == sp.LEARNING_RATES["spo+"]
    assert saved["log-barrier"]["2"]["lr"] == sp.LEARNING_RATES["log-barrier"]
    assert saved["two-stage-ls"]["2"]["lr"] is None
    one_lr = sp.main([*common, "--lr", "0.2"])
    assert one_lr["spo+"][2]["lr"] == one_lr["log-barrier"][2]["lr"] == 0.2
    assert one_lr["spo+"][2]["mean"] != table["spo+"][2]["mean"]
    held_out = sp.main([*common, "--validation", "32"])
    assert held_out["two-stage-ls"][2]["mean"] != table["two-stage-ls"][2]["mean"]
    with pytest.raises(SystemExit):
        sp.main([*common, "--validation", "96"])


def test_bilevel_custom_solver(tmp_path):
    out = load("bilevel_custom_solver").main(
        ["--outer-steps", "3", "--rows", "3", "--cols", "3", "--json", str(tmp_path / "b.json")])
    tracking, springs = out["tracking"], out["springs"]
    # the implicit hypergradient through the CvxpyLayer projection and through the simulation
    assert tracking["fd_rel_error"] < 1e-6 and tracking["whole_layer_rel_error"] < 1e-6
    assert springs["fd_rel_error"] < 1e-6
    assert tracking["active_assets"] < tracking["assets"]  # a corner of the simplex is active
    assert tracking["val_loss_after"] < tracking["val_loss_before"]
    assert springs["loss_after"] < springs["loss_before"]
    assert (tmp_path / "b.json").exists()
