"""A picture of the robot when a test fails: the plugin's camera against the simulator."""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from pytest_rerobots.camera import Camera, picture_name
from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]

SUITE = """
def test_flash_turns_the_led_green(rerobots_instance):
    rerobots_instance.run("bin/flash-fw missing.bin")
    assert "led=green" in rerobots_instance.run("cat state/led").stdout

def test_passes(rerobots_instance):
    assert rerobots_instance.run("true").exit_status == 0
"""


def jpegs(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jpg")) if directory.is_dir() else []


def test_a_failing_test_leaves_a_picture_named_after_it(pytester: pytest.Pytester,
                                                        sim_env: Simulator):
    pytester.makepyfile(test_robot=SUITE)
    result = pytester.runpytest("--rerobots-wtype=basic_kobuki", "--junitxml=junit.xml", "-q")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    pictures = jpegs(pytester.path / "rerobots-artifacts")
    assert len(pictures) == 1, out
    picture = pictures[0]
    assert picture.name.startswith("test_robot.py__test_flash_turns_the_led_green--basic_kobuki-")
    assert picture.name.endswith("-cam0.jpg")
    data = picture.read_bytes()
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9" and len(data) > 5000
    pil = pytest.importorskip("PIL.Image")
    image = pil.open(picture)
    assert image.size == (480, 360)
    r, g, b = image.convert("RGB").getpixel((240, 120))  # the LED: red after a failed flash
    assert r > 180 and g < 90 and b < 90
    assert f"rerobots: camera picture: {picture}" in out
    assert "rerobots: 1 camera picture(s) saved under" in out
    junit = ET.parse(pytester.path / "junit.xml")  # noqa: S314 (the XML this test wrote)
    case = next(c for c in junit.iter("testcase")
                if c.get("name") == "test_flash_turns_the_led_green")
    outs = "\n".join(node.text or "" for node in case.iter("system-out"))
    assert f"[[ATTACHMENT|{picture}]]" in outs
    assert "LEAKED" not in out


def test_passing_tests_leave_none_and_off_leaves_none(pytester: pytest.Pytester,
                                                      sim_env: Simulator):
    pytester.makepyfile(test_robot=SUITE)
    passed = pytester.runpytest("--rerobots-wtype=basic_kobuki", "-q", "-k", "passes")
    passed.assert_outcomes(passed=1)
    assert jpegs(pytester.path / "rerobots-artifacts") == []
    off = pytester.runpytest("--rerobots-wtype=basic_kobuki", "-q", "--rerobots-camera=off")
    off.assert_outcomes(passed=1, failed=1)
    assert jpegs(pytester.path / "rerobots-artifacts") == []
    assert "camera picture" not in off.stdout.str()


def test_always_and_a_named_directory(pytester: pytest.Pytester, sim_env: Simulator,
                                      monkeypatch: pytest.MonkeyPatch):
    pytester.makepyfile(test_robot=SUITE)
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("REROBOTS_CAMERA", "always")
    result = pytester.runpytest("--rerobots-wtype=basic_kobuki", "-q", "-k", "passes",
                                "--rerobots-artifacts=out/pics")
    result.assert_outcomes(passed=1)
    pictures = jpegs(pytester.path / "out" / "pics")
    assert [p.name.split("--")[0] for p in pictures] == ["test_robot.py__test_passes"]
    text = summary.read_text()
    assert "### rerobots: camera pictures" in text and pictures[0].name in text


def test_bad_camera_mode_and_directory_are_errors_before_renting(pytester: pytest.Pytester,
                                                                 sim_env: Simulator):
    pytester.makepyfile(test_robot=SUITE)
    bad = pytester.runpytest("--rerobots-wtype=basic_kobuki", "--rerobots-camera=sometimes")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--rerobots-camera (from command line): "
                              "'sometimes' is not one of on-failure, always, off*"])
    (pytester.path / "afile").write_text("")
    blocked = pytester.runpytest("--rerobots-wtype=basic_kobuki",
                                 "--rerobots-artifacts=afile/pics")
    assert blocked.ret == pytest.ExitCode.USAGE_ERROR
    blocked.stderr.fnmatch_lines(["*--rerobots-artifacts: 'afile' is not a directory*"])
    assert sim_env.request_count("new") == 0


# -- the camera alone ---------------------------------------------------------------------


class _Inst:
    def __init__(self, ident: str) -> None:
        self.id = ident
        self.wtype = "basic_kobuki"
        self.deployment = "d"
        self.label = f"basic_kobuki {ident[:8]}"
        self.details: dict[str, Any] = {"wdinfo": {"supported_addons": ["cam"]}}


class _SlowClient:
    """A camera that is applied at once but never answers a snapshot."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def apply_camera(self, ident: str) -> None:
        pass

    def camera_snapshot(self, ident: str, number: int) -> Any:
        self.release.wait(10)
        raise ConfigurationError("released")


def test_a_camera_that_does_not_answer_costs_one_line(tmp_path: Path):
    camera = Camera("on-failure", tmp_path / "pics", wait=0.3)
    client = _SlowClient()
    inst = _Inst("3f2a1b2c-0000-4000-8000-000000000000")
    camera.activate(client, inst)  # type: ignore[arg-type]
    started = time.monotonic()
    pictures = camera.snapshot(client, [inst], "t.py::test_x", "call")  # type: ignore[arg-type,list-item]
    client.release.set()
    assert time.monotonic() - started < 2
    assert pictures.saved == []
    assert pictures.notes == ["rerobots: camera of basic_kobuki 3f2a1b2c: no picture within "
                              "0.3 s; no picture"]
    assert not (tmp_path / "pics").exists()


def test_a_robot_without_the_camera_is_not_asked(tmp_path: Path):
    camera = Camera("always", tmp_path)
    inst = _Inst("3f2a1b2c-0000-4000-8000-000000000000")
    inst.details = {"wdinfo": {"supported_addons": ["py"]}}
    camera.activate(_SlowClient(), inst)  # type: ignore[arg-type]
    deadline = time.monotonic() + 2
    while camera.has_camera(inst):  # type: ignore[arg-type]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert camera.snapshot(None, [inst], "t", "call").notes == []  # type: ignore[arg-type,list-item]
    with pytest.raises(ConfigurationError, match="'sometimes' is not one of"):
        Camera("sometimes", tmp_path)


def test_picture_names_are_safe_file_names():
    inst = _Inst("3f2a1b2c-0000-4000-8000-000000000000")
    name = picture_name("tests/test_a.py::test_b[x/y ../z]", inst, 1, "setup")  # type: ignore[arg-type]
    assert name == "tests_test_a.py__test_b_x_y_.._z-setup--basic_kobuki-3f2a1b2c-cam1.jpg"
    assert "/" not in name
