"""The simulated serial console serves every reader, not only the first (issue 22, item 10).

The console prints its prompt on a newline, as a real one does on Enter; a reader that
comes after another (the prompt it left waiting was consumed) sends a newline first. The
docs' example and the example suite's console test do, so each runs twice on one robot.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "writing-tests.md"
EXAMPLES = ROOT / "examples"
CONSOLE = "exec 3<>/dev/ttyUSB0; cat <&3 & exec cat >&3"


def docs_console_example() -> str:
    """The docs' ``test_console`` example (the pytest block of "Live processes")."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    found = [b for b in blocks if "def test_console(" in b]
    assert len(found) == 1, "the docs' console example is gone"
    return found[0]


def test_the_docs_console_example_works_for_a_second_reader(pytester: pytest.Pytester):
    example = docs_console_example()
    # Two tests of that example, one after the other, on the session's one robot.
    pytester.makepyfile(test_console=example + "\n\ntest_console_again = test_console\n")
    pytester.makeini("[pytest]\nrerobots_wtype = basic_kobuki\n")
    (pytester.path / "build").mkdir()
    (pytester.path / "build" / "fw.bin").write_bytes(b"VERSION=2.7.1\nfirmware\n")
    result = pytester.runpytest_subprocess("--rerobots-sim", "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)


def test_the_example_suite_s_console_test_works_twice_on_one_robot(pytester: pytest.Pytester):
    for entry in EXAMPLES.iterdir():
        if entry.is_file():
            shutil.copy(entry, pytester.path / entry.name)
    suite = pytester.path / "test_firmware.py"
    suite.write_text(suite.read_text() + "\n\ntest_console_again = "
                     "test_console_boots_the_flashed_firmware\n")
    result = pytester.runpytest_subprocess("--rerobots-sim", "-p", "no:cacheprovider", "-q",
                                           "-k", "console")
    result.assert_outcomes(passed=2)


def test_the_console_prints_its_prompt_on_a_newline(pytester: pytest.Pytester):
    """What the docs promise, on the console itself: each reader gets a prompt by sending
    a newline, whoever read before."""
    pytester.makepyfile(f"""
        import pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki")
        @pytest.mark.parametrize("reader", range(3))
        def test_reader(rerobots_instance, reader):
            console = rerobots_instance.spawn({CONSOLE!r})
            console.sendline("")
            console.expect("kobuki> ", timeout=10)
            console.sendline("status")
            console.expect("battery=97 base=ok", timeout=10)
            console.close()
    """)
    result = pytester.runpytest_subprocess("--rerobots-sim", "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=3)
