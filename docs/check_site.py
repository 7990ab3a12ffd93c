"""Check a built HTML site as a reader without a network would see it.

Usage (from the repository root, after the Sphinx build)::

    python docs/check_site.py docs/_build/html

Checks that:

* no page loads a script or stylesheet from another host (maths is rendered by the bundled
  MathJax, not a CDN), and every page with maths loads a MathJax script that is in the site;
* every internal link, image, script and stylesheet points at a file of the site, and every
  ``#anchor`` of an internal link exists in its target page;
* every gallery page (``auto_examples/*.html``) shows at least one figure of its own, and its
  thumbnail in the gallery index is not the placeholder;
* no example output block holds progress-bar frames.

Prints one line per problem and exits with status 1 if there is any; prints nothing
when the site is fine.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# tqdm's frames: "40%|████      | 4/10 [00:01<00:02, 3.1it/s]"
PROGRESS = re.compile(r"\d+%\|.*\||\d+(?:\.\d+)?(?:it|s)/(?:s|it)\]")
PLACEHOLDER = "no_image"


class Page(HTMLParser):
    """The anchors, references, math and example output of one HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str]] = []          # (tag, url)
        self.images: list[str] = []
        self.has_math = False
        self.outputs: list[str] = []                   # text of the example output blocks
        self._out_depth = 0                             # > 0 inside an output block
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("id", "name"):
            if a.get(key):
                self.ids.add(a[key])
        cls = (a.get("class") or "").split()
        if "math" in cls:
            self.has_math = True
        if tag == "a" and a.get("href"):
            self.refs.append((tag, a["href"]))
        elif tag in ("img", "script") and a.get("src"):
            self.refs.append((tag, a["src"]))
            if tag == "img":
                self.images.append(a["src"])
        elif tag == "link" and a.get("href") and a.get("rel") in ("stylesheet", "icon"):
            self.refs.append((tag, a["href"]))
        if tag in ("br", "img", "meta", "link", "input", "hr"):
            return
        self._depth += 1
        if self._out_depth == 0 and "sphx-glr-script-out" in cls:
            self._out_depth = self._depth
            self.outputs.append("")

    def handle_endtag(self, tag):
        if tag in ("br", "img", "meta", "link", "input", "hr"):
            return
        if self._out_depth and self._depth == self._out_depth:
            self._out_depth = 0
        self._depth -= 1

    def handle_data(self, data):
        if self._out_depth:
            self.outputs[-1] += data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def check(root: Path) -> list[str]:
    """All problems found in the site under ``root``, one line each (empty when it is fine)."""
    root = root.resolve()
    pages = {p: parse(p) for p in sorted(root.rglob("*.html")) if "_static" not in p.parts}
    if not pages:
        return [f"{root}: no HTML pages (is this the build folder?)"]
    problems = []
    for path, page in pages.items():
        rel = path.relative_to(root)
        mathjax_here = False
        for tag, url in page.refs:
            parts = urlsplit(url)
            if parts.scheme in ("mailto", "javascript", "data"):
                continue
            if parts.scheme or parts.netloc:
                if tag in ("script", "link"):
                    problems.append(f"{rel}: loads {url} from the network")
                continue                                   # outbound links are not checked
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                problems.append(f"{rel}: {tag} points at a missing file: {url}")
                continue
            if tag == "script" and "mathjax" in parts.path.lower():
                mathjax_here = True
            if tag == "a" and parts.fragment and target.suffix == ".html":
                target_page = pages.get(target) or parse(target)
                if unquote(parts.fragment) not in target_page.ids:
                    problems.append(f"{rel}: dead anchor {url}")
        if page.has_math and not mathjax_here:
            problems.append(f"{rel}: has maths but loads no MathJax script of the site")
        for i, text in enumerate(page.outputs):
            frames = [line for line in text.splitlines() if PROGRESS.search(line)]
            if frames:
                problems.append(f"{rel}: output block {i + 1} holds {len(frames)} progress-bar "
                                f"frame(s), e.g. {frames[0].strip()[:80]!r}")
    gallery = root / "auto_examples"
    examples = [p for p in pages if p.parent == gallery and p.name != "index.html"]
    if not examples:
        problems.append("auto_examples/: no gallery pages")
    for path in examples:
        own = [s for s in pages[path].images if f"sphx_glr_{path.stem}_" in s]
        if not own:
            problems.append(f"auto_examples/{path.name}: no figure (no image "
                            f"sphx_glr_{path.stem}_*)")
    index = pages.get(gallery / "index.html")
    if index is not None and any(PLACEHOLDER in s for s in index.images):
        problems.append("auto_examples/index.html: a thumbnail is the placeholder image")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    problems = check(Path(argv[0]))
    for line in problems:
        print(line)
    if problems:                                 # silent when fine, as CI's other steps
        print(f"{len(problems)} problem(s) in {argv[0]}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
