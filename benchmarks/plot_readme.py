"""benchmarks/README.md's two main timing tables, as figures and as the tables themselves.

The measured numbers live in ``benchmarks/readme_results.json`` (with the command, commit, date
and machine of each run); this script draws them and prints README's Markdown tables from them,
so the figure and the tables cannot drift apart (``tests/test_benchmarks_readme.py`` checks that
README holds exactly the printed tables). The docs build draws the figure for the "Benchmarks"
page from the same file.

    python benchmarks/plot_readme.py --figure results/benchmarks.svg   # or .png
    python benchmarks/plot_readme.py --markdown                        # README's tables

Nothing here runs a benchmark: to update the numbers, rerun the commands in the JSON file and
edit it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().with_name("readme_results.json")
#: issue 3's targets for the native path's batched families (latency rows carry none)
TARGETS = {"x_cvxpylayers": 20.0, "x_moreau": 1.0, "grad_err": 1e-6, "bwd_over_fwd": 0.25}


def load(path: str | os.PathLike = RESULTS) -> dict:
    """The measured results: ``{"layers": {...}, "native": {...}}``, each with its ``rows``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _exp(value: float) -> str:
    """1.4e-7 as README's native table writes it (no zero-padded exponent)."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def layers_table(section: dict) -> str:
    """The Markdown table of ``bench_layers.py``'s run."""
    lines = ["| family | diffopt ms | cvxpylayers ms | fwd x | bwd x | total x (≥ 3) | "
             "grad err diffopt | grad err cvxpylayers | ref-check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        lines.append(f"| {r['family']} | {r['diffopt_ms']:.1f} | {r['cvxpylayers_ms']:.1f} | "
                     f"{r['fwd_x']:.2f} | {r['bwd_x']:.2f} | **{r['total_x']:.2f}** | "
                     f"{r['grad_err_diffopt']:.1e} | {r['grad_err_cvxpylayers']:.1e} | "
                     f"{r['ref_check']:.1e} |")
    return "\n".join(lines)


def native_table(section: dict) -> str:
    """The Markdown table of ``bench_native.py``'s run; PASS/FAIL against :data:`TARGETS` for
    the batched rows (those with a forward/backward split), QPLayer's ratio to Moreau in
    brackets."""
    lines = ["| family | diffopt (fwd / bwd) | QPLayer | cvxpylayers | Moreau (fwd / bwd) | "
             "x cpl (≥20) | x Moreau (>1) | grad err (≤1e-6) | bwd/fwd (≤¼) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        cells = [r["family"]]
        if "diffopt_fwd_ms" in r:
            t = TARGETS
            cells += [
                f"{r['diffopt_ms']:.1f} ({r['diffopt_fwd_ms']:.1f} / {r['diffopt_bwd_ms']:.1f})",
                f"{r['qplayer_ms']:.1f}", f"{r['cvxpylayers_ms']:.1f}",
                f"{r['moreau_ms']:.1f} ({r['moreau_fwd_ms']:.1f} / {r['moreau_bwd_ms']:.1f})",
                f"{r['x_cvxpylayers']:.1f} {_mark(r['x_cvxpylayers'] >= t['x_cvxpylayers'])}",
                f"{r['x_moreau']:.2f} {_mark(r['x_moreau'] > t['x_moreau'])} "
                f"({r['qplayer_x_moreau']:.2f})",
                f"{_exp(r['grad_err'])} {_mark(r['grad_err'] <= t['grad_err'])}",
                f"{r['bwd_over_fwd']:.2f} {_mark(r['bwd_over_fwd'] <= t['bwd_over_fwd'])}"]
        else:  # batch-1 latency: totals only, no targets
            cells += [f"{r['diffopt_ms']:.1f}", f"{r['qplayer_ms']:.1f}",
                      f"{r['cvxpylayers_ms']:.1f}", f"{r['moreau_ms']:.1f}",
                      f"{r['x_cvxpylayers']:.1f}", f"{r['x_moreau']:.2f}", _exp(r["grad_err"]),
                      f"{r['bwd_over_fwd']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bars(ax, section: dict, series: list[tuple[str, str, str]], ratio: str,
          title: str) -> None:
    """Horizontal grouped bars of total ms per family (log scale, families top to bottom); the
    diffopt bars carry their time, the cvxpylayers bars the measured ratio ``ratio``."""
    import numpy as np

    rows = section["rows"]
    y = np.arange(len(rows))[::-1]
    height = 0.8 / len(series)
    for i, (key, label, color) in enumerate(series):
        pos = y + ((len(series) - 1) / 2 - i) * height
        values = [r[key] for r in rows]
        ax.barh(pos, values, height, label=label, color=color)
        notes = {"diffopt_ms": [f"{v:.1f} ms" for v in values],
                 "cvxpylayers_ms": [f"{r[ratio]:.1f}× diffopt's" for r in rows]}.get(key, ())
        for p, v, note in zip(pos, values, notes):
            ax.text(v * 1.08, p, note, va="center", fontsize=7)
    ax.set_yticks(y, [r["family"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("forward + backward, ms per batch (log scale) — shorter is faster")
    ax.set_title(f"{title}\n{section['script']} at {section['commit']}, {section['date']}",
                 fontsize=9)
    ax.grid(axis="x", which="both", color="0.9", zorder=0)
    ax.set_axisbelow(True)
    ax.margins(x=0.25)  # room for the notes right of the longest bars
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=len(series))


def figure(results: dict):
    """Both tables' total times as bars, one panel per benchmark, the first above the
    second. Returns the figure."""
    import matplotlib.pyplot as plt

    # one above the other, so that each keeps its size at the docs' page width
    fig, (left, right) = plt.subplots(2, 1, figsize=(8.0, 11.0), height_ratios=(6, 9))
    _bars(left, results["layers"],
          [("diffopt_ms", "diffopt CvxpyLayer", "C0"),
           ("cvxpylayers_ms", "cvxpylayers", "C1")], "total_x",
          "CvxpyLayer against cvxpylayers (2 threads)")
    _bars(right, results["native"],
          [("diffopt_ms", "diffopt CvxpyLayer", "C0"), ("qplayer_ms", "diffopt QPLayer", "C2"),
           ("cvxpylayers_ms", "cvxpylayers", "C1"), ("moreau_ms", "Moreau", "C3")],
          "x_cvxpylayers", "Native LP/QP solver (1 thread; lat*: batch of 1)")
    fig.suptitle("benchmarks/README.md's timing tables\n(float64, 2-core x86_64 VM, median of 5 "
                 "runs)", fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS), help="the JSON file of measured numbers")
    ap.add_argument("--figure", help="write the figure to this file (.svg, .png, ...; folders "
                                     "are created)")
    ap.add_argument("--markdown", action="store_true", help="print README's two tables")
    args = ap.parse_args(argv)
    if not (args.figure or args.markdown):
        ap.error("nothing to do: pass --figure PATH, --markdown or both")
    results = load(args.results)
    if args.markdown:
        print(layers_table(results["layers"]), end="\n\n")
        print(native_table(results["native"]))
    if args.figure:
        write_figure(results, args.figure)


def write_figure(results: dict, path: str | os.PathLike) -> None:
    """Draw :func:`figure` into ``path`` (its format from the suffix; folders are created)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # no creation date in an SVG, so an unchanged figure is an unchanged file
    fig.savefig(path, dpi=120, metadata={"Date": None} if str(path).endswith(".svg") else None)
    plt.close(fig)


if __name__ == "__main__":
    main()
