"""The code blocks of the documentation run and print what the pages say they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.rst"))


@pytest.mark.parametrize("page", PAGES)
def test_page_examples(page: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "check_examples.py"),
                           str(ROOT / "docs" / page)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
