"""benchmarks/README.md's main tables are the ones benchmarks/plot_readme.py prints from the
committed numbers (benchmarks/readme_results.json), and the figure drawn from them."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def pr():
    spec = importlib.util.spec_from_file_location("plot_readme", BENCH / "plot_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_are_the_printed_ones(pr):
    readme = (BENCH / "README.md").read_text(encoding="utf-8")
    results = pr.load()
    for table in (pr.layers_table(results["layers"]), pr.native_table(results["native"])):
        assert table in readme, f"README lacks the table printed from the data:\n{table}"


def test_marks_follow_the_targets(pr):
    section = copy.deepcopy(pr.load()["native"])
    row = section["rows"][0]
    assert "7.7 FAIL" in pr.native_table(section)
    row["x_cvxpylayers"] = 25.0
    row["grad_err"] = 3e-6
    table = pr.native_table(section)
    assert "25.0 PASS" in table and "3.0e-6 FAIL" in table


def test_markdown_and_figure_from_the_command_line(pr, tmp_path, capsys):
    path = tmp_path / "out" / "bench.svg"
    pr.main(["--markdown", "--figure", str(path)])
    printed = capsys.readouterr().out
    assert printed.count("| family |") == 2
    svg = path.read_text(encoding="utf-8")
    assert svg.startswith("<?xml") and "<svg" in svg
    for row in pr.load()["native"]["rows"][:3]:  # the bars' notes carry the measured times
        assert f"{row['diffopt_ms']:.1f} ms" in svg


def test_nothing_to_do_is_an_error(pr, capsys):
    with pytest.raises(SystemExit):
        pr.main([])
    assert "pass --figure PATH, --markdown or both" in capsys.readouterr().err
