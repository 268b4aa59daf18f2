"""The example suite as it runs on a real robot: without ``--rerobots-sim``, against a
simulator standing in for the real API. Only what every basic_kobuki has is used, unless
``--robot-tools`` brings the suite's own tools."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Stand-ins for a suite's own tools, with the contract the example tests rely on.
FLASH_FW = """#!/bin/sh
set -eu
[ -f "$1" ] || { echo "flash-fw: $1: no such file" >&2; exit 2; }
version=$(sed -n 's/^VERSION=//p' "$1" | head -n 1)
mkdir -p state && echo "$version" > state/fw_version
echo "flashed by the suite's own tool, version $version"
"""
ROBOT_STATUS = """#!/bin/sh
echo "battery=80 fw=$(cat state/fw_version 2>/dev/null || echo none) base=ok"
"""


def run_examples(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLES), "-p", "no:cacheprovider", "-rs",
         f"--rerobots-ledger={tmp_path / 'ledger.jsonl'}", *args],
        cwd=EXAMPLES.parent, env=dict(os.environ), capture_output=True, text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "LEAKED" not in out, out
    return out


def test_on_a_robot_without_the_suites_tools_only_what_it_has_runs(
        sim_env: Simulator, tmp_path: Path):
    out = run_examples(tmp_path)
    assert "1 passed, 6 skipped" in out, out
    assert out.count("needs this suite's robot tools") == 5, out


def test_robot_tools_are_uploaded_and_used(sim_env: Simulator, tmp_path: Path):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "flash-fw").write_text(FLASH_FW)
    (tools / "robot-status").write_text(ROBOT_STATUS)
    out = run_examples(tmp_path, f"--robot-tools={tools}")
    assert "6 passed, 1 skipped" in out, out


def test_robot_tools_replace_what_the_robot_had(
        pytester: pytest.Pytester, sim_env: Simulator, tmp_path: Path):
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "flash-fw").write_text(FLASH_FW)
    (tools / "robot-status").write_text(ROBOT_STATUS)
    pytester.makeconftest((EXAMPLES / "conftest.py").read_text())
    pytester.makepyfile("""
        def test_the_tools_on_the_robot_are_the_suites(rerobots_instance, robot_tools):
            robot_tools(rerobots_instance)
            robot_tools(rerobots_instance)  # once per robot is enough
            script = rerobots_instance.run("cat bin/flash-fw", check=True).stdout
            assert "the suite's own tool" in script
            assert rerobots_instance.run("test -x bin/robot-status").exit_status == 0
    """)
    result = pytester.runpytest("--rerobots-wtype=basic_kobuki", f"--robot-tools={tools}")
    result.assert_outcomes(passed=1)


def test_robot_tools_must_hold_both_tools(pytester: pytest.Pytester, sim_env: Simulator,
                                          tmp_path: Path):
    pytester.makeconftest((EXAMPLES / "conftest.py").read_text())
    pytester.makepyfile("def test_flash(rerobots_instance, flash): pass")
    result = pytester.runpytest("--rerobots-wtype=basic_kobuki", f"--robot-tools={tmp_path}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--robot-tools: no *flash-fw, *robot-status*"])
