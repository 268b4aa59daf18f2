"""The README, the package's front page: short, the two commands as promised, and links that
work on the package index (absolute, into pages of the site that exist)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SITE = "https://rerobots.github.io/pytest-rerobots/"
COMMANDS = (
    "pip install -e '.[sim]' && pytest examples --rerobots-sim   "
    "# the example firmware suite, on the embedded simulator\n"
    "pip install -e '.[test]' && pytest                          # the project's own tests\n"
)
LINK = re.compile(r"\]\(([^)\s]+)\)|<(https?://[^>]+)>")


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc gives a heading."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def _anchors(page: Path) -> set[str]:
    out = set()
    for line in page.read_text().splitlines():
        match = re.match(r"^#+\s+(.*?)\s*(\{#([\w-]+)\})?$", line)
        if match:
            out.add(match.group(3) or _slug(match.group(1)))
    return out


def test_the_first_code_fence_holds_exactly_the_two_commands():
    first = re.search(r"^```[^\n]*\n(.*?)^```", README, re.S | re.M)
    assert first and first.group(1) == COMMANDS


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_every_link_is_absolute():
    links = [a or b for a, b in LINK.findall(README)]
    assert links
    relative = [link for link in links if not link.startswith(("https://", "http://"))]
    assert not relative, f"the package index cannot follow relative links: {relative}"


def test_links_into_the_site_name_pages_and_anchors_that_exist():
    links = [a or b for a, b in LINK.findall(README)]
    into_site = [link for link in links if link.startswith(SITE)]
    assert len(into_site) >= 5
    for link in into_site:
        path, _, anchor = link[len(SITE):].partition("#")
        page = ROOT / "docs" / (f"{path.strip('/')}.md" if path.strip("/") else "index.md")
        assert page.exists(), f"{link}: no {page.relative_to(ROOT)}"
        if anchor:
            assert anchor in _anchors(page), f"{link}: no such heading"


def test_links_into_the_repository_name_files_that_exist():
    repo = "https://github.com/rerobots/pytest-rerobots/"
    for a, b in LINK.findall(README):
        link = a or b
        match = re.match(rf"{re.escape(repo)}(?:blob|tree)/main/(.+)", link)
        if match:
            assert (ROOT / match.group(1)).exists(), link


def test_the_github_actions_page_includes_the_workflow_file_not_a_copy():
    page = (ROOT / "docs" / "github-actions.md").read_text()
    assert '```yaml\n--8<-- "examples/github/robot-tests.yml"\n```' in page
    assert "runs-on:" not in page


def test_the_api_page_documents_every_public_name():
    import pytest_rerobots

    page = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: pytest_rerobots\.(\w+)$", page, flags=re.M))
    assert set(pytest_rerobots.__all__) - {"__version__"} - documented == set()
