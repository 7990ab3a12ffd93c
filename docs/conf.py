"""Sphinx configuration for the diffopt documentation.

Build (from the repository root, warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

# Import diffopt from this checkout, so the docs build without installing the package.
sys.path.insert(0, os.path.abspath(".."))

import diffopt  # noqa: E402

project = "diffopt"
author = "the diffopt developers"
copyright = "the diffopt developers"
release = diffopt.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# No network access at build time: no intersphinx.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
root_doc = "index"
language = "en"

# -- autodoc / napoleon ------------------------------------------------------------------------
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
}
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
# "Attributes:" sections as one compact field list (as for Args), not one block per attribute.
napoleon_use_ivar = True
nitpicky = False

# -- HTML --------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"diffopt {release}"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": True,
}
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# MathJax is loaded from its CDN by the reader's browser; nothing is fetched at build time.
# For offline reading, point it at a local copy, e.g.
#   -D mathjax_path=file:///usr/share/javascript/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML
