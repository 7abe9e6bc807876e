"""The capability matrix and strategy pages name tests: each one named must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        names.update(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.MULTILINE))
    return names


def test_every_test_named_in_the_docs_exists() -> None:
    defined = _defined_tests()
    pages = [ROOT / "docs" / "capability-matrix.md", *(ROOT / "docs" / "strategies").glob("*.md")]
    missing = {
        f"{page.name}: {name}"
        for page in pages
        for name in re.findall(r"`(test_\w+)`", page.read_text())
        if name not in defined
    }
    assert not missing, sorted(missing)
