"""Run cvxpylayers' and qpth's own tests on diffopt, next to the libraries themselves.

The test files are fetched into a temporary directory (never into this repository): cvxpylayers'
PyTorch tests (``tests/test_torch.py``, ``tests/test_dual_variables.py``,
``tests/test_readme_examples.py``) and qpth's ``test.py``. Their source distributions on PyPI
(cvxpylayers 1.2.0, qpth 0.0.18) ship no tests, so they come from the repositories: a git URL
(cloned, depth 1), a local clone or bare mirror (read with ``git show REV:PATH``), or a plain
directory holding the files.

Each suite runs twice with pytest, in a subprocess, with the temporary directory as its root (so
diffopt's own pytest settings do not apply):

- **reference**: the files as they are, on the installed library (skipped if it is not
  importable);
- **diffopt**: only the import of the layer rewritten, ``from cvxpylayers.torch import
  CvxpyLayer`` -> ``from diffopt import CvxpyLayer`` and ``qpth.qp.QPFunction`` ->
  ``diffopt.QPLayer``. cvxpylayers' quad-form tests are skipped unless the commercial ``moreau``
  package is installed; diffopt does not need it (``solver="MOREAU"`` selects its default), so
  in the diffopt run that availability check reads True (``--no-moreau-tests`` keeps it).

qpth's tests also call qpth's internals and its CVXPY reference solver, and numdifftools; when
those are not importable they are installed with ``pip install --no-deps --target`` into the
temporary directory. The script prints each run's counts and every test that does not pass on
diffopt with the first lines of its error.

Usage::

    python benchmarks/parity.py
    python benchmarks/parity.py --cvxpylayers /path/to/cvxpylayers --qpth /path/to/qpth
    python benchmarks/parity.py --only qpth --keep /tmp/parity   # keep the files and reports

Sources also come from the environment variables ``DIFFOPT_PARITY_CVXPYLAYERS`` and
``DIFFOPT_PARITY_QPTH``. A source that cannot be obtained is reported and skipped (exit 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CVXPYLAYERS_URL = "https://github.com/cvxpy/cvxpylayers"
QPTH_URL = "https://github.com/locuslab/qpth"
CVXPYLAYERS_FILES = ("tests/test_torch.py", "tests/test_dual_variables.py",
                     "tests/test_readme_examples.py")
QPTH_FILES = ("test.py",)

# The rewrites of the diffopt runs: (old, new, whether the file must contain old).
CVXPYLAYERS_IMPORT = ("from cvxpylayers.torch import CvxpyLayer", "from diffopt import CvxpyLayer",
                      True)
MOREAU_CHECK = ('_moreau_available = importlib.util.find_spec("moreau") is not None',
                "_moreau_available = True  # diffopt: solver='MOREAU' selects its default", False)
QPTH_IMPORT = ("qpth.qp.QPFunction(", "__import__('diffopt').QPLayer(", True)


@dataclass
class Outcome:
    """Per-test results of one pytest run, read from its JUnit XML report."""

    passed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # test id -> first lines of the error
    skipped: dict[str, str] = field(default_factory=dict)

    def counts(self) -> str:
        return (f"{len(self.passed)} passed, {len(self.failed)} failed, "
                f"{len(self.skipped)} skipped")


def fetch(source: str, files: tuple[str, ...], dest: Path, rev: str) -> str:
    """Copy ``files`` from ``source`` into ``dest`` (flat); return a description of the source."""
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    if "://" in source or source.startswith("git@"):
        clone = dest / "_clone"
        subprocess.run(["git", "clone", "-q", "--depth", "1", source, str(clone)], check=True,
                       capture_output=True, text=True, timeout=300)
        src = clone
    if src.is_dir() and (src / files[0]).is_file():  # a work tree or a plain directory
        for f in files:
            shutil.copy(src / f, dest / Path(f).name)
        commit = _git(src, "rev-parse", "--short", "HEAD") if (src / ".git").exists() else None
        return f"{source}" + (f" @ {commit}" if commit else "")
    commit = _git(src, "rev-parse", "--short", rev)  # a bare mirror: read the blobs
    for f in files:
        (dest / Path(f).name).write_text(_git(src, "show", f"{rev}:{f}", strip=False))
    return f"{source} @ {commit}"


def _git(repo: Path, *args: str, strip: bool = True) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                         text=True).stdout
    return out.strip() if strip else out


def rewrite(path: Path, rules) -> None:
    text = path.read_text()
    for old, new, required in rules:
        if required and old not in text:
            raise RuntimeError(f"{path.name}: expected {old!r} to rewrite; the file changed")
        text = text.replace(old, new)
    path.write_text(text)


def ensure_importable(modules: dict[str, str], site: Path) -> list[str]:
    """Install (``--no-deps``, into ``site``) the packages of ``modules`` that do not import;
    return the ones that still cannot be had."""
    missing = [pkg for mod, pkg in modules.items() if importlib.util.find_spec(mod) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(site), *missing], capture_output=True, text=True, timeout=600)
    found = set(os.listdir(site)) if site.is_dir() else set()
    return [pkg for mod, pkg in modules.items()
            if importlib.util.find_spec(mod) is None and mod not in found]


def run_pytest(directory: Path, files: list[str], report: Path, site: Path,
               timeout: int) -> Outcome:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
           str(directory), f"--junitxml={report}", "-o", "junit_family=xunit1", *files]
    subprocess.run(cmd, cwd=directory, env=env, capture_output=True, text=True, timeout=timeout)
    return read_report(report)


def read_report(report: Path) -> Outcome:
    out = Outcome()
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('file') or case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        skip = case.find("skipped")
        if problem is not None:
            lines = [ln.strip() for ln in (problem.get("message") or problem.text or "")
                     .splitlines() if ln.strip()]
            # three lines: enough for pytest.raises' expected regex and actual message
            out.failed[name] = " | ".join(lines[:3])[:400] or "(no message)"
        elif skip is not None:
            out.skipped[name] = (skip.get("message") or "").strip()
        else:
            out.passed.append(name)
    return out


def suite(name: str, source: str, rev: str, files: tuple[str, ...], rules, reference_module: str,
          work: Path, site: Path, timeout: int) -> None:
    print(f"== {name} ==")
    ref_dir, dop_dir = work / name / "reference", work / name / "diffopt"
    try:
        where = fetch(source, files, ref_dir, rev)
    except (subprocess.SubprocessError, OSError) as err:
        print(f"  skipped: could not obtain the tests from {source} ({err})")
        return
    print(f"  tests: {', '.join(files)} from {where}")
    local = [Path(f).name for f in files]
    if name == "qpth":  # a test_ name, as pytest's default pattern wants
        (ref_dir / "test.py").rename(ref_dir / "test_qpth.py")
        local = ["test_qpth.py"]
    shutil.copytree(ref_dir, dop_dir, ignore=shutil.ignore_patterns("_clone"))
    for f in local:
        rewrite(dop_dir / f, rules)
    results = {}
    if importlib.util.find_spec(reference_module) is not None or (site / reference_module).exists():
        results[reference_module] = run_pytest(ref_dir, local, work / f"{name}-ref.xml", site,
                                               timeout)
    else:
        print(f"  {reference_module} is not importable: no reference run")
    results["diffopt"] = run_pytest(dop_dir, local, work / f"{name}-diffopt.xml", site, timeout)
    for who, outcome in results.items():
        print(f"  {who:12s} {outcome.counts()}")
    for who, outcome in results.items():
        if outcome.failed:
            print(f"  not passing on {who}:")
            for test, why in sorted(outcome.failed.items()):
                print(f"    {test}: {why}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cvxpylayers", default=os.environ.get("DIFFOPT_PARITY_CVXPYLAYERS",
                                                                 CVXPYLAYERS_URL),
                        help="git URL, clone, bare mirror or directory of cvxpylayers")
    parser.add_argument("--qpth", default=os.environ.get("DIFFOPT_PARITY_QPTH", QPTH_URL),
                        help="git URL, clone, bare mirror or directory of qpth")
    parser.add_argument("--rev", default="HEAD", help="revision read from a bare mirror")
    parser.add_argument("--only", choices=("cvxpylayers", "qpth"))
    parser.add_argument("--no-moreau-tests", action="store_true",
                        help="keep cvxpylayers' quad-form tests skipped without moreau")
    parser.add_argument("--keep", type=Path, help="work here and keep the files and reports")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="diffopt-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    try:
        if args.only in (None, "cvxpylayers"):
            rules = [CVXPYLAYERS_IMPORT] + ([] if args.no_moreau_tests else [MOREAU_CHECK])
            suite("cvxpylayers", args.cvxpylayers, args.rev, CVXPYLAYERS_FILES, rules,
                  "cvxpylayers", work, site, args.timeout)
        if args.only in (None, "qpth"):
            missing = ensure_importable({"qpth": "qpth", "numdifftools": "numdifftools"}, site)
            if missing:
                print(f"== qpth ==\n  skipped: cannot install {missing} (qpth's tests need them)")
            else:
                suite("qpth", args.qpth, args.rev, QPTH_FILES, [QPTH_IMPORT], "qpth", work,
                      site, args.timeout)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
