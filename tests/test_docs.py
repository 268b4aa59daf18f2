"""The code examples of the README and the documentation run, against the simulator.

Every ```python block carries a marker on the line before it (an HTML comment, which no
renderer shows):

- ``<!-- example: pytest -->``: a pytest test file. All of them are written into one
  directory, beside a firmware image ``build/fw.bin`` (``VERSION=2.7.1``), and run in one
  session with ``--rerobots-sim --rerobots-wtype=basic_kobuki``; each block's tests must
  pass.
- ``<!-- example: script -->``: a script, run with ``python`` in such a directory, with
  ``REROBOTS_API_URL`` and ``REROBOTS_API_TOKEN`` naming a simulator; it must exit 0.
- ``<!-- example: not run: REASON -->``: shown, not run (it needs a real robot's host).

A python block without a marker fails, so none is added without a decision.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"^<!-- example: (pytest|script|not run: (?P<reason>.+?)) -->$")
FENCE = re.compile(r"^(`{3,})(\S*)")
FIRMWARE = b"VERSION=2.7.1\n" + bytes(range(256)) * 64


@dataclass(frozen=True)
class Block:
    source: str  # relative to the repository
    line: int  # of the opening fence
    lang: str
    marker: str | None  # "pytest", "script", "not run: ..."
    code: str

    @property
    def ident(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def module(self) -> str:
        stem = re.sub(r"\W", "_", self.source.removesuffix(".md")).lower()
        return f"test_{stem}_L{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, each with the marker above it, if any."""
    lines = path.read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        ticks, lang = fence.groups()
        start = i
        above = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(above)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(ticks):
            body.append(lines[i])
            i += 1
        i += 1
        out.append(Block(str(path.relative_to(ROOT)), start + 1, lang,
                         marker.group(1) if marker else None, "\n".join(body) + "\n"))
    return out


ALL = [block for source in SOURCES for block in blocks(source)]
PYTHON = [block for block in ALL if block.lang == "python"]
BY_KIND = {kind: [b for b in PYTHON if b.marker and b.marker.startswith(kind)]
           for kind in ("pytest", "script", "not run")}


def test_every_python_block_says_whether_it_runs():
    unmarked = [b.ident for b in PYTHON if b.marker is None]
    assert not unmarked, (
        "each ```python block needs <!-- example: pytest|script|not run: REASON --> above it: "
        + ", ".join(unmarked))
    # ... and each marker sits above a python block.
    for source in SOURCES:
        lines = source.read_text().splitlines()
        for n, line in enumerate(lines):
            if MARKER.match(line.strip()):
                following = next(x for x in lines[n + 1:] if x.strip())
                assert following.startswith("```python"), (
                    f"{source.name}:{n + 1}: a marker above no python block")


def test_the_docs_have_runnable_examples():
    # The count the collector found; a parse that finds nothing must not pass quietly.
    assert len(BY_KIND["pytest"]) >= 6 and len(BY_KIND["script"]) >= 3, BY_KIND


def _workdir(path: Path) -> Path:
    (path / "build").mkdir(parents=True)
    (path / "build" / "fw.bin").write_bytes(FIRMWARE)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REROBOTS_") and k != "PYTEST_ADDOPTS"}
    env.update(extra)
    return env


@dataclass
class SessionResult:
    output: str
    cases: dict[str, list[tuple[str, str]]]  # module -> [(test name, outcome)]


@pytest.fixture(scope="module")
def pytest_examples(tmp_path_factory: pytest.TempPathFactory) -> SessionResult:
    """Every pytest example, in one session on the embedded simulator."""
    work = _workdir(tmp_path_factory.mktemp("examples"))
    (work / "pytest.ini").write_text("[pytest]\n")
    for block in BY_KIND["pytest"]:
        (work / f"{block.module}.py").write_text(block.code)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rerobots-sim",
         "--rerobots-wtype=basic_kobuki", "--junitxml=junit.xml", "-q", "-rA", "."],
        cwd=work, env=_env(), capture_output=True, text=True, timeout=240,
    )
    cases: dict[str, list[tuple[str, str]]] = {}
    junit = work / "junit.xml"
    if junit.exists():
        # The XML is the one the session above just wrote.
        for case in ET.parse(junit).iter("testcase"):  # noqa: S314
            outcome = next((child.tag for child in case
                            if child.tag in ("failure", "error", "skipped")), "passed")
            module = case.get("classname", "").split(".")[0]
            cases.setdefault(module, []).append((case.get("name", ""), outcome))
    return SessionResult(proc.stdout + proc.stderr, cases)


@pytest.mark.parametrize("block", BY_KIND["pytest"], ids=lambda b: b.ident)
def test_pytest_example(block: Block, pytest_examples: SessionResult):
    cases = pytest_examples.cases.get(block.module)
    assert cases, f"no test of {block.ident} ran:\n{pytest_examples.output}"
    bad = [(name, outcome) for name, outcome in cases if outcome != "passed"]
    assert not bad, f"{block.ident}: {bad}\n{pytest_examples.output}"


@pytest.fixture(scope="module")
def simulator():
    from pytest_rerobots.sim import Simulator

    with Simulator() as sim:
        yield sim


@pytest.mark.parametrize("block", BY_KIND["script"], ids=lambda b: b.ident)
def test_script_example(block: Block, simulator, tmp_path: Path):
    work = _workdir(tmp_path)
    (work / "example.py").write_text(block.code)
    proc = subprocess.run(
        [sys.executable, "example.py"], cwd=work, capture_output=True, text=True, timeout=120,
        env=_env(REROBOTS_API_URL=simulator.url, REROBOTS_API_TOKEN=simulator.token),
    )
    assert proc.returncode == 0, f"{block.ident}:\n{proc.stdout}{proc.stderr}"
    assert simulator.live_instances() == [], f"{block.ident} left an instance running"


def test_blocks_not_run_say_why():
    for block in BY_KIND["not run"]:
        reason = block.marker.split(":", 1)[1].strip()  # type: ignore[union-attr]
        assert len(reason) > 10, f"{block.ident}: say why it is not run"
