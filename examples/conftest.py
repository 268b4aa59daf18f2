"""Fixtures of the example firmware suite: a firmware image built for the test run, and the
robot-side tools that flash it and read the robot's state.

What a real ``basic_kobuki`` has: a Linux host wired to the robot, reached over SSH as
root, with a shell, coreutils (``sha256sum``) and SFTP. What it does not have is this
suite's tools: ``bin/flash-fw FILE`` (flash an image, print ``version X``) and
``bin/robot-status`` (print ``battery=... fw=... base=...``). The simulator's built-in
catalog puts pretend versions of both on every host, so on the simulator they are there
already. A real suite brings its own; here ``--robot-tools DIR`` names a directory of
them, which the ``robot_tools`` fixture uploads to each robot's ``bin/`` before a test
uses them. With neither the simulator nor ``--robot-tools``, the tests that need the
tools are skipped, and say why.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_rerobots import CommandResult, Instance
from pytest_rerobots.plugin import load_settings

TOOLS = ("flash-fw", "robot-status")

NO_TOOLS = (
    "needs this suite's robot tools (bin/flash-fw, bin/robot-status): a real robot has "
    "none; pass --robot-tools DIR with yours, or run on the simulator (--rerobots-sim), "
    "whose catalog has pretend ones"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--robot-tools", metavar="DIR", default=None,
        help="this suite's robot tools (flash-fw, robot-status), uploaded to each robot's "
             "bin/; without it the tests that need them run only on the simulator",
    )
    parser.addoption(
        "--show-a-failure", action="store_true", default=False,
        help="also run the test marked demo_failure, which fails on purpose: its robot's "
             "camera picture (the LED red) lands in the artifacts directory",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "demo_failure: fails on purpose, to show a failed test's camera picture; "
                   "deselected unless --show-a-failure")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("show_a_failure"):
        return
    demo = [item for item in items if item.get_closest_marker("demo_failure")]
    if demo:
        config.hook.pytest_deselected(items=demo)
        items[:] = [item for item in items if item not in demo]


@dataclass(frozen=True)
class Firmware:
    path: Path
    version: str
    sha256: str


@pytest.fixture(scope="session")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> Firmware:
    """A firmware image as the build would produce it: a version header, then the payload."""
    version = "2.7.1"
    path = tmp_path_factory.mktemp("build") / "kobuki-fw.bin"
    path.write_bytes(f"VERSION={version}\n".encode() + os.urandom(256 * 1024))
    return Firmware(path, version, hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture(scope="session")
def robot_tools(pytestconfig: pytest.Config) -> Callable[[Instance], None]:
    """``robot_tools(robot)`` makes sure the robot has ``bin/flash-fw`` and
    ``bin/robot-status``: uploaded from ``--robot-tools DIR`` (once per robot), or the
    simulator's pretend ones under ``--rerobots-sim``. Skips the test otherwise."""
    local = pytestconfig.getoption("robot_tools")
    if local is None:
        if load_settings(pytestconfig).sim:
            return lambda robot: None  # the simulator's catalog put them in bin/
        pytest.skip(NO_TOOLS)
    files = [Path(local) / name for name in TOOLS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.fail(f"--robot-tools: no {', '.join(missing)}", pytrace=False)
    installed: set[str | None] = set()

    def install(robot: Instance) -> None:
        if robot.id in installed:
            return
        robot.run("mkdir -p bin", check=True)
        for f in files:
            robot.put(str(f), f"bin/{f.name}")
        robot.run("chmod +x " + " ".join(shlex.quote(f"bin/{f.name}") for f in files),
                  check=True)
        installed.add(robot.id)

    return install


@pytest.fixture
def flash(robot_tools: Callable[[Instance], None], firmware: Firmware
          ) -> Callable[[Instance], CommandResult]:
    """``flash(robot)``: this suite's flashing step. It puts the firmware image on the
    robot and runs the flasher on it; a non-zero exit fails the test with its output."""

    def flash(robot: Instance) -> CommandResult:
        robot_tools(robot)
        robot.put(str(firmware.path), "fw.bin")
        return robot.run("bin/flash-fw fw.bin", timeout=60, check=True)

    return flash
