"""The house rules a reader relies on, checked: imports run one way, each module stays one readable job, no issue
numbers or committed caches.

A module over :data:`MAX_LINES` lines must say at its top why it is one job all the same (a line starting
``Long because``): length alone is no fault, an unexplained one usually means two jobs grew together.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("router", "deployments")
MAX_LINES = 300


def _modules(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def _imported(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_deployments_never_import_router_or_tests() -> None:
    """``router/`` uses ``deployments/``; the reverse would make the two one tangle, and the engine image would
    need the router's code."""
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in _modules("deployments")
                 for name in _imported(path) if name.split(".")[0] in ("router", "tests")]
    assert not offenders


def test_the_product_never_imports_tests() -> None:
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in _modules(*PACKAGES)
                 for name in _imported(path) if name.split(".")[0] == "tests"]
    assert not offenders


@pytest.mark.parametrize("path", _modules(*PACKAGES), ids=lambda path: str(path.relative_to(ROOT)))
def test_a_long_module_says_why_it_is_one_job(path: Path) -> None:
    lines = path.read_text().splitlines()
    if len(lines) > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "Long because" in docstring, (
            f"{path.relative_to(ROOT)} has {len(lines)} lines: split it, or say at its top why it is one job "
            "(a docstring paragraph starting 'Long because')")


def test_no_issue_numbers_in_code() -> None:
    """Comments say why; which issue asked for a change is history, kept in git and docs/."""
    pattern = re.compile(r"\bissues? #?\d+", re.IGNORECASE)
    files = _modules(*PACKAGES, "tests") + [ROOT / "pyproject.toml", ROOT / "Makefile"]
    offenders = [f"{path.relative_to(ROOT)}:{number}" for path in files
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def test_no_tool_cache_is_committed() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    caches = [name for name in tracked.splitlines()
              if re.search(r"(^|/)(\.schemathesis|\.hypothesis|\.pytest_cache|__pycache__|\.ruff_cache)/", name)]
    assert not caches
