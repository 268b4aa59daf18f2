"""docs/architecture.md names every module of the package, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pytest_rerobots"
PAGE = (ROOT / "docs" / "architecture.md").read_text()


def _modules() -> set[str]:
    return {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")}


def test_every_module_is_named_with_its_idea():
    named = set(re.findall(r"^\| `([\w/]+\.py)` \|", PAGE, flags=re.M))
    assert _modules() - named == set(), "modules missing from docs/architecture.md"
    assert named - _modules() == set(), "docs/architecture.md names modules that are gone"
