"""Every ``Examples:`` section in diffopt's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import diffopt

MODULES = sorted(m.name for m in pkgutil.walk_packages(diffopt.__path__, "diffopt."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def _public_names():
    import inspect

    import diffopt.bilevel as bilevel

    for mod in (diffopt, bilevel):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not isinstance(obj, str) and not inspect.ismodule(obj):
                yield f"{mod.__name__}.{name}", obj


@pytest.mark.parametrize("name,obj", list(_public_names()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_public_name_has_a_runnable_example(name: str, obj) -> None:
    import inspect

    assert ">>>" in (inspect.getdoc(obj) or ""), f"{name} has no Examples section"
