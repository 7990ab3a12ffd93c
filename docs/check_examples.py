"""Run the code blocks of the docs and compare what they print with the ``text`` blocks.

Usage (from the repository root)::

    python docs/check_examples.py docs/quickstart.rst docs/index.rst

In each file, the ``.. code-block:: python`` blocks run in order in one namespace. A python block
followed directly by a ``.. code-block:: text`` block must print that text (compared word by
word, so that long lines may be wrapped in the docs). Exits with
status 1 on the first mismatch or exception.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import textwrap

BLOCK = re.compile(r"^\.\. code-block:: (\w+)\n\n((?:(?: {4}.*)?\n)+)", re.MULTILINE)


def blocks(text: str):
    for match in BLOCK.finditer(text):
        yield match.group(1), textwrap.dedent(match.group(2)).strip("\n") + "\n", match.start()


def check(path: str) -> bool:
    text = open(path, encoding="utf-8").read()
    found = list(blocks(text))
    namespace: dict = {"__name__": "__docs__"}
    ok = True
    for k, (lang, code, pos) in enumerate(found):
        if lang != "python":
            continue
        line = text.count("\n", 0, pos) + 1
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{path}:{line}", "exec"), namespace)
        if k + 1 < len(found) and found[k + 1][0] == "text":
            want = found[k + 1][1].rstrip()
            got = out.getvalue().rstrip()
            # Long messages are wrapped by hand in the docs: compare whitespace-normalized.
            if want.split() != got.split():
                print(f"{path}:{line}: output differs\n--- expected\n{want}\n--- got\n{got}")
                ok = False
    print(f"{path}: {'ok' if ok else 'FAILED'}")
    return ok


if __name__ == "__main__":
    results = [check(p) for p in sys.argv[1:]]
    sys.exit(0 if all(results) else 1)
