"""Hostile text through the real plugin (issue 19, item 4): robot output with terminal
escapes and workflow commands, printed by real commands on the simulator's robots, and
API strings with escapes, Markdown and HTML, served by the simulator from a catalog of
this test's own. What the terminal, the step summary, the JUnit XML and the runner of a
GitHub Actions job (tests/test_escapes.py's model of it) get of them."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST
from test_escapes import Runner

from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]

#: What a terminal acts on, or is confused by: C0 controls but LF and tab, DEL, C1
#: controls, bidirectional overrides.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

# printf on the robot: an OSC that retitles the window, a CSI that clears the screen, an
# OSC 8 link, a C1 CSI (U+009B, as UTF-8) and a right-to-left override (U+202E).
HOSTILE_PRINTF = (r"printf 'title \033]0;pwned\007 clear \033[2J link "
                  r"\033]8;;https://evil.example\033\\click\033]8;;\033\\ csi \302\2336n "
                  r"bidi \342\200\256dlrow\n'")
SHOWN = ("title \\x1b]0;pwned\\x07 clear \\x1b[2J link \\x1b]8;;https://evil.example"
         "\\x1b\\click\\x1b]8;;\\x1b\\ csi \\x9b6n bidi \\u202edlrow")

# Ordinary output: UTF-8 text, a tab, a serial console's CRLF line ends.
ORDINARY_PRINTF = r"printf 'temp\303\251rature \342\234\223\tcol\r\nline two\r\n'"

TERMINAL = f"""
import pytest

HOSTILE = {HOSTILE_PRINTF!r}

@pytest.mark.rerobots("basic_kobuki")
def test_fails(rerobots_instance):
    rerobots_instance.run({ORDINARY_PRINTF!r})
    rerobots_instance.run(HOSTILE + "; exit 3", check=True)

@pytest.mark.rerobots("basic_kobuki")
def test_times_out(rerobots_instance):
    rerobots_instance.run(HOSTILE + "; exec sleep 30", timeout=0.5)

@pytest.mark.rerobots("basic_kobuki")
def test_expects(rerobots_instance):
    rerobots_instance.spawn(HOSTILE + "; exec sleep 30").expect("never printed", timeout=1)
"""


def test_terminal_escapes_in_transcripts_and_failure_reports_are_shown_not_sent(
        pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(TERMINAL)
    result = pytester.runpytest("--junitxml=out.xml")
    result.assert_outcomes(failed=3)
    out = result.stdout.str()
    raw = RAW_CONTROL.findall(out)
    assert not raw, f"{len(raw)} raw control characters reached the terminal: {set(raw)}"
    # What the robot printed is still there to read, as escapes: in each transcript
    # (its stdout lines) and in each failure's message (E lines).
    assert len(re.findall(rf"^    {re.escape(SHOWN)}$", out, re.M)) == 3, out
    assert len(re.findall(rf"^E +{re.escape(SHOWN)}$", out, re.M)) == 3, out
    for error in ("CommandFailed", "CommandTimeout", "ExpectTimeout"):
        assert f"{error}: " in out
    # Ordinary output is as it was: UTF-8, a tab, CRLF as a line break, nothing left out.
    assert "  stdout:\n    température ✓\tcol\n    line two\n" in out

    # JUnit XML: well formed (parsed), no raw control character, the same escapes.
    xml = (pytester.path / "out.xml").read_text(encoding="utf-8")
    assert not RAW_CONTROL.search(xml)
    tree = ET.parse(pytester.path / "out.xml")  # noqa: S314 (the XML this test wrote)
    cases = {c.get("name"): c for c in tree.iter("testcase")}
    system_out = "".join(e.text or "" for e in cases["test_fails"].iter("system-out"))
    assert SHOWN in system_out and "température ✓\tcol" in system_out


# The robot prints the commands; the command line holds none of them (octal escapes: the
# test's own text is not what is under test here).
WORKFLOW = r"""
import pytest

COMMANDS = ("printf '\\072\\072add-mask\\072\\072leak\\n  \\072\\072error title=pwned"
            "\\072\\072robot says\\nok \\043\\043[warning]legacy\\n'")

@pytest.mark.rerobots("basic_kobuki")
def test_fails(rerobots_instance):
    rerobots_instance.run(COMMANDS)
    rerobots_instance.run(COMMANDS + "; exit 1", check=True)
"""


@pytest.mark.parametrize("tb", ["auto", "native"])
@pytest.mark.parametrize("ci", [False, True], ids=["", "CI"])
def test_robot_workflow_commands_do_not_reach_the_actions_runner(
        pytester: pytest.Pytester, sim_env: Simulator, monkeypatch: pytest.MonkeyPatch,
        tb: str, ci: bool):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    if ci:  # as on GitHub's runners: pytest then repeats each message whole in its summary
        monkeypatch.setenv("CI", "true")
    pytester.makepyfile(WORKFLOW)
    result = pytester.runpytest(f"--tb={tb}")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "::add-mask::leak" in out and "##[warning]legacy" in out  # still shown
    runner = Runner().feed(out + "\n::notice::after the run\n")
    assert runner.acted == [("notice", "after the run")], runner.acted
    # Fences around the transcript, the failure message's output and the summary table,
    # each with its own token (with CI set, the short summary repeats the message's fence).
    tokens = re.findall(r"(?:::stop-commands::|##\[stop-commands\])([0-9a-f]{32})", out)
    assert len(set(tokens)) == 3 and len(tokens) == (4 if ci else 3), out


def test_without_github_actions_no_fence(pytester: pytest.Pytester, sim_env: Simulator,
                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    pytester.makepyfile(WORKFLOW)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    assert "stop-commands" not in result.stdout.str()


# -- API strings -----------------------------------------------------------------

REGION = ("eu\x1b[2J\x1b]0;pwned\x07|![img](https://evil.example/x.png) <img src=x> "
          "[link](https://evil.example) **bold**\n::add-mask::leak ##[error]pwned")
REGION_SHOWN = ("eu\\x1b[2J\\x1b]0;pwned\\x07|![img](https://evil.example/x.png) <img src=x> "
                "[link](https://evil.example) **bold**\\n::add-mask::leak ##[error]pwned")


def _toml(text: str) -> str:
    """``text`` as a TOML basic string."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}"
                         for c in text) + '"'


@pytest.fixture
def hostile_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.toml"
    path.write_text(f"[types.lab_bot]\n\n[[deployments]]\ntype = \"lab_bot\"\n"
                    f"region = {_toml(REGION)}\n", encoding="utf-8")
    return path


@pytest.fixture
def hostile_sim(hostile_catalog: Path, monkeypatch: pytest.MonkeyPatch
                ) -> Iterator[Simulator]:
    """A simulator whose lab_bot deployment is in the region above, the plugin pointed
    at it as at the real API (as conftest's sim_env)."""
    with Simulator(hostile_catalog, **FAST) as sim:
        monkeypatch.setenv("REROBOTS_API_URL", sim.url)
        monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)
        yield sim
        assert sim.live_instances() == []


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_api_strings_in_the_summary_table_and_the_step_summary(
        pytester: pytest.Pytester, hostile_sim: Simulator, monkeypatch: pytest.MonkeyPatch):
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("lab_bot")
        def test_x(rerobots_instance):
            assert rerobots_instance.region.startswith("eu")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert not RAW_CONTROL.search(out)
    row = [line for line in result.stdout.lines if " lab_bot " in line]
    assert len(row) == 1 and REGION_SHOWN in row[0], out  # one line, readable
    assert Runner().feed(out).acted == []

    text = summary.read_text(encoding="utf-8")
    assert not RAW_CONTROL.search(text)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 3, text  # headers, rule, one row: no line break in a cell
    assert all(_unescaped_pipes(line) == 9 for line in table), table  # 8 columns each
    cell = table[2].split(" | ")[3]
    assert "![" not in cell and "<img" not in cell and "](" not in cell and "**" not in cell
    assert "&lt;img src=x&gt;" in cell and "\\!\\[img\\]\\(https\\://evil.example" in cell
    assert cell.startswith("eu\\\\x1b\\[2J")  # the escape shown as text


def test_api_strings_in_the_listing(pytester: pytest.Pytester, hostile_catalog: Path,
                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    pytester.makepyfile("def test_never_runs(): raise AssertionError")
    result = pytester.runpytest("--rerobots-list", "--rerobots-sim",
                                f"--rerobots-sim-config={hostile_catalog}")
    assert result.ret == 0
    out = result.stdout.str()
    assert not RAW_CONTROL.search(out)
    # One line (the type cut short, to leave the region whole), readable.
    rows = [line for line in result.stdout.lines if REGION_SHOWN in line]
    assert len(rows) == 1 and rows[0].startswith("lab~ "), out
    runner = Runner().feed(out + "\n::notice::after\n")
    assert runner.acted == [("notice", "after")]
