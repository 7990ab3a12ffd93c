"""Every example's ``--help`` says what each option is for and shows its default.

Read from the source (no example is run), so that it takes milliseconds.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").rglob("*.py"))


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == name]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_help_texts_and_defaults(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parsers = calls(tree, "ArgumentParser")
    for parser in parsers:
        keywords = {k.arg: k.value for k in parser.keywords}
        formatter = keywords.get("formatter_class")
        assert isinstance(formatter, ast.Attribute) \
            and formatter.attr == "ArgumentDefaultsHelpFormatter", \
            f"{path.name}:{parser.lineno}: --help does not show the defaults"
    for arg in calls(tree, "add_argument"):
        flags = [a.value for a in arg.args if isinstance(a, ast.Constant)]
        assert any(k.arg == "help" for k in arg.keywords), \
            f"{path.name}:{arg.lineno}: option {flags} has no help text"
    if not parsers:
        assert not calls(tree, "add_argument")
