"""docs/check_site.py finds each fault it is for (on small hand-made sites), and README shows the
commands that CI runs.

The real site is built and checked by ``.ci/run`` (the build needs the ``docs`` extra and takes
about a minute); these tests check the checker and the README, in well under a second.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

spec = importlib.util.spec_from_file_location("check_site", ROOT / "docs" / "check_site.py")
check_site = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_site)

MATHJAX = '<script defer src="_static/mathjax/tex-chtml.js"></script>'
OUT = '<div class="sphx-glr-script-out highlight-none"><pre>{}</pre></div>'


def site(tmp_path: Path, pages: dict[str, str]) -> Path:
    """A site whose gallery page shows its figure; ``pages`` adds or replaces pages."""
    files = {
        "_static/mathjax/tex-chtml.js": "",
        "_images/sphx_glr_plot_a_001.png": "",
        "_images/sphx_glr_plot_a_thumb.png": "",
        "index.html": f'<html><head>{MATHJAX}</head><body><h1 id="top">diffopt</h1>'
                      '<span class="math notranslate">\\(x \\ge 0\\)</span>'
                      '<a href="api.html#diffopt.CvxpyLayer">layer</a>'
                      '<a href="https://example.org/">out</a></body></html>',
        "api.html": '<html><body><dt id="diffopt.CvxpyLayer">CvxpyLayer</dt>'
                    '<a href="index.html#top">up</a></body></html>',
        "auto_examples/index.html":
            '<html><body><img src="../_images/sphx_glr_plot_a_thumb.png"/></body></html>',
        "auto_examples/plot_a.html": '<html><body><img src="../_images/sphx_glr_plot_a_001.png"/>'
                                     + OUT.format("loss 0.1\ndone") + '</body></html>',
    }
    files.update(pages)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_a_good_site_passes(tmp_path):
    assert check_site.check(site(tmp_path, {})) == []
    assert check_site.main([str(tmp_path)]) == 0


@pytest.mark.parametrize("pages, expected", [
    ({"index.html": '<html><head><script src="https://cdn.example/mathjax/tex-chtml.js"></script>'
                    '</head><body><span class="math">\\(x\\)</span></body></html>'},
     r"index\.html: loads https://cdn\.example/.* from the network"),
    ({"index.html": '<html><body><span class="math">\\(x\\)</span></body></html>'},
     r"index\.html: has maths but loads no MathJax script"),
    ({"api.html": '<html><body><a href="index.html#nowhere">up</a></body></html>'},
     r"api\.html: dead anchor index\.html#nowhere"),
    ({"api.html": '<html><body><a href="missing.html">x</a></body></html>'},
     r"api\.html: a points at a missing file: missing\.html"),
    ({"auto_examples/plot_a.html": '<html><body><p>no figure</p></body></html>'},
     r"auto_examples/plot_a\.html: no figure"),
    ({"auto_examples/index.html": '<html><body><img src="../_static/no_image.png"/></body></html>',
      "_static/no_image.png": ""},
     r"a thumbnail is the placeholder"),
    ({"auto_examples/plot_a.html":
      '<html><body><img src="../_images/sphx_glr_plot_a_001.png"/>' + OUT.format(
          "learning:  40%|████      | 4/10 [00:01&lt;00:02,  3.10it/s]\nloss 0.1")
      + '</body></html>'},
     r"auto_examples/plot_a\.html: output block 1 holds 1 progress-bar frame"),
])
def test_each_fault_is_reported(tmp_path, pages, expected):
    problems = check_site.check(site(tmp_path, pages))
    assert any(re.search(expected, line) for line in problems), problems
    assert check_site.main([str(tmp_path)]) == 1


def commands(script: str) -> list[list[str]]:
    """The commands of a shell text, split at ``&&``, ``||``, ``;``, ``|`` and line ends, each as
    its words up to its first redirection."""
    out = []
    for line in script.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        redirected = False
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "{", "}"):
                if words:
                    out.append(words)
                words, redirected = [], False
            elif token.startswith((">", "<")):
                if words and words[-1].isdigit():      # the 2 of 2>file
                    words.pop()
                redirected = True
            elif not redirected:
                words.append(token)
    return out


def readme_code(text: str) -> str:
    """README's fenced bash blocks and inline code spans, one per line."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    return "\n".join(blocks + spans)


def normalized(words: list[str]) -> list[str]:
    """A command without what only changes how much it prints or where a build goes."""
    if words[:1] == ["quiet"]:                   # .ci/run's wrapper: output on failure only
        words = words[1:]
    if words[:3] == ["python", "-m", "pip"]:
        words = words[2:]
    words = [w for w in words if w != "-q"]
    if words[:3] == ["python", "-m", "sphinx"]:
        words = words[:-1]                       # the output folder
    if words[:2] == ["python", "docs/check_site.py"]:
        words = words[:2]
    return words


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = {tuple(normalized(c)) for c in commands((ROOT / ".ci" / "run").read_text())}
    shown = [c for c in commands(readme_code(readme)) if c[0] in ("pip", "python")]
    wanted = [
        'pip install -e ".[examples]"', 'pip install -e ".[test]"', "python -m pytest -q",
        'pip install -e ".[docs]"', "python -m sphinx -W --keep-going -b html docs OUT",
        "python docs/check_site.py OUT",
        "python examples/shortest_path.py --json results/shortest_path.json "
        "--plot results/shortest_path.png",
    ]
    for command in wanted:
        words = shlex.split(command)
        assert any(normalized(c) == normalized(words) for c in shown), \
            f"README no longer shows {command!r}"
        assert tuple(normalized(words)) in ci, f".ci/run does not run README's {command!r}"
