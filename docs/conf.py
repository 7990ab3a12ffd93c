"""Sphinx configuration for the diffopt documentation.

Build (from the repository root, warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import filecmp
import importlib
import os
import re
import shutil
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
    # MathJax copied into _static/mathjax, so maths renders without a network (no CDN)
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

# No network access at build time: no intersphinx.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "gallery_src", "auto_examples/*.ipynb",
                    "auto_examples/*.py"]
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


# -- Example gallery (sphinx-gallery) ----------------------------------------------------------
# The fast examples, ``examples/plot_*.py``, are executed at every build and their figures rendered
# in ``auto_examples/`` (generated, not committed). sphinx-gallery wants a header file next to the
# scripts; it lives in ``docs/gallery_src/GALLERY_HEADER.rst``, and the scripts are copied there
# from ``examples/`` (the copies are ignored by git, see ``docs/.gitignore``).
_here = os.path.dirname(os.path.abspath(__file__))
_examples = os.path.join(_here, "..", "examples")
_gallery_src = os.path.join(_here, "gallery_src")
_scripts = sorted(f for f in os.listdir(_examples) if f.startswith("plot_") and f.endswith(".py"))
# modules the scripts import (copied too; sphinx-gallery puts their folder on sys.path)
_modules = ["shortest_path.py"]
for _old in os.listdir(_gallery_src):
    if _old.endswith(".py") and _old not in _scripts + _modules:
        os.remove(os.path.join(_gallery_src, _old))
for _name in _scripts + _modules:
    _src, _dst = os.path.join(_examples, _name), os.path.join(_gallery_src, _name)
    if not (os.path.exists(_dst) and filecmp.cmp(_src, _dst, shallow=False)):
        shutil.copy2(_src, _dst)

sphinx_gallery_conf = {
    "examples_dirs": "gallery_src",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # execute the plot_*.py scripts
    "ignore_pattern": r"__init__\.py|^shortest_path\.py$",  # a module, not a gallery page
    "download_all_examples": False,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "abort_on_example_error": True,  # a failing example fails the build
    "show_memory": False,
    "min_reported_time": 0,
    # its page loads jQuery and DataTables from CDNs: nothing may need a network
    "write_computation_times": False,
    "remove_config_comments": True,
}


# -- Benchmarks figure -------------------------------------------------------------------------
# Drawn at every build from the numbers benchmarks/README.md's tables are printed from, into the
# ignored _static/generated/ (benchmarks.rst shows it).
sys.path.insert(0, os.path.join(_here, "..", "benchmarks"))
import plot_readme  # noqa: E402

plot_readme.write_figure(plot_readme.load(),
                         os.path.join(_here, "_static", "generated", "benchmarks.svg"))
sys.path.pop(0)


# -- Public names ------------------------------------------------------------------------------
# Docstrings refer to classes by their defining module (``diffopt.solve.SolveInfo``,
# ``diffopt.diff.smoothing.Exact``, or ``Exact`` inside that module), while the API reference
# documents them under their public, top-level names (``diffopt.SolveInfo``, ``diffopt.Exact``).
# Resolve such references to the public name when the defining-module target is not documented.
def _resolve_public_name(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    name = target.rsplit(".", 1)[-1]
    import diffopt.bilevel

    for public, module in ((f"diffopt.{name}", diffopt), (f"diffopt.bilevel.{name}", diffopt.bilevel)):
        if public != target and name in getattr(module, "__all__", ()):
            py = env.get_domain("py")
            return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], public,
                                   node, contnode)
    return None


# -- "[docs]" links of the highlighted source ---------------------------------------------------
# viewcode builds each "[docs]" back-link of a module's source page from the module name under
# which that module's *first* documented object appeared: with ``diffopt.SolveInfo`` documented
# before ``diffopt.solve.cone_solve``, every link of solve.py points at ``api.html#diffopt.<name>``,
# which exists only for the re-exported names. Point each dead one at its object's real anchor.
_BACKLINK = re.compile(r'(<div class="viewcode-block" id="([^"]+)">\n<a class="viewcode-back" '
                       r'href=")([^"#]*)#([^"]*)(")')


def _lookup(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _fix_viewcode_backlinks(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    objects = app.env.get_domain("py").objects
    anchors = {(entry.docname, entry.node_id) for entry in objects.values()}
    out = app.outdir
    for page in (out / "_modules").rglob("*.html"):
        module = ".".join(page.relative_to(out / "_modules").with_suffix("").parts)
        html = page.read_text(encoding="utf-8")

        def fix(m, module=module, page=page):
            name, href, anchor = m.group(2), m.group(3), m.group(4)
            docname = os.path.relpath(os.path.normpath(page.parent / href), out)[:-len(".html")]
            if (docname, anchor) in anchors:
                return m.group(0)
            target = _lookup(f"{module}.{name}")
            for key in [f"{module}.{name}"] + [k for k in objects if k.endswith("." + name)]:
                entry = objects.get(key)
                if entry is not None and target is not None and _lookup(key) is target:
                    url = os.path.relpath(out / f"{entry.docname}.html", page.parent)
                    return f"{m.group(1)}{url}#{entry.node_id}{m.group(5)}"
            return m.group(0)                    # left for docs/check_site.py to report

        fixed = _BACKLINK.sub(fix, html)
        if fixed != html:
            page.write_text(fixed, encoding="utf-8")


def setup(app):
    app.connect("missing-reference", _resolve_public_name)
    app.connect("build-finished", _fix_viewcode_backlinks)
