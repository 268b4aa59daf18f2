"""The camera add-on: the client against the simulator, the simulator's states and pictures,
and the client's requests against the shapes of the real server's routes."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from pytest_rerobots import AddonNotActive, AddonUnavailable, InstanceNotFound, NotFound
from pytest_rerobots.client import RerobotsClient, classify
from pytest_rerobots.errors import APIError, ServerError
from pytest_rerobots.sim import Simulator
from pytest_rerobots.sim.addons import RobotView, draw_snapshot, read_state

FAST = dict(ready_delay=0.05, terminate_delay=0.05, not_found_window=0.0, cam_delay=0.1)
KOBUKI = "b34d1ee4-2a7b-445a-824a-ba4a30759f7f"
UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(ssh_backend="none", **FAST) as simulator:
        yield simulator


@pytest.fixture
def api(sim: Simulator) -> Iterator[RerobotsClient]:
    with RerobotsClient(sim.token, sim.url, ignore_env=True, sleep=lambda s: None) as client:
        yield client


def ready(api: RerobotsClient, target: str = KOBUKI) -> str:
    ident = api.new_instance(target).id
    deadline = time.monotonic() + 5
    while api.instance(ident)["status"] != "READY":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return ident


def until(api: RerobotsClient, ident: str, status: str) -> None:
    deadline = time.monotonic() + 5
    while api.camera_status(ident) != status:
        assert time.monotonic() < deadline, f"camera never {status}"
        time.sleep(0.02)


# -- the client against the simulator -------------------------------------------------------


def test_apply_status_snapshot_remove(api: RerobotsClient, sim: Simulator):
    ident = ready(api)
    with pytest.raises(AddonNotActive, match="add-on `cam` not active on this instance"):
        api.camera_status(ident)
    api.apply_camera(ident)
    assert api.addon_status("cam", ident) == {"status": "starting", "remote_user": "root"}
    with pytest.raises(AddonUnavailable, match="not streaming yet") as starting:
        api.camera_snapshot(ident)
    assert starting.value.status == 503
    until(api, ident, "active")
    shot = api.camera_snapshot(ident)
    assert shot.format == "JPEG" and shot.data[:2] == b"\xff\xd8" and len(shot.data) > 1000
    assert "bytes" in repr(shot) and shot.data.hex()[:20] not in repr(shot)
    # The robot has one camera: camera 1 answers success false, which is AddonUnavailable.
    with pytest.raises(AddonUnavailable, match="no image available"):
        api.camera_snapshot(ident, 1)
    api.apply_camera(ident)  # again: the server's camera answers 200
    assert api.remove_camera(ident) is True
    assert api.camera_status(ident) == "stopping"
    deadline = time.monotonic() + 5
    while True:
        try:
            api.camera_status(ident)
        except AddonNotActive:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert api.remove_camera(ident) is False
    api.terminate(ident)


def test_repeat_is_503_under_the_switch_and_taken_as_applied(api: RerobotsClient,
                                                             sim: Simulator):
    sim.world.configure(addon_repeat_error=True)
    ident = ready(api)
    api.apply_camera(ident)
    raw = requests.post(f"{sim.url}/addon/cam/{ident}", timeout=5,
                        headers={"Authorization": f"Bearer {sim.token}"})
    assert raw.status_code == 503
    assert raw.json() == {"error_message": f"add-on `cam` already applied to instance {ident}"}
    api.apply_camera(ident)  # the client takes it as done
    api.terminate(ident)


def test_camera_applied_during_init_starts_after_ready(sim: Simulator):
    sim.world.configure(ready_delay=0.4)
    with RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
        ident = api.new_instance(KOBUKI).id
        api.apply_camera(ident)
        assert api.camera_status(ident) == "starting"
        until(api, ident, "active")
        assert api.instance(ident)["status"] == "READY"
        api.terminate(ident)
        # An ended instance has no add-ons.
        with pytest.raises(AddonNotActive):
            api.camera_status(ident)


def test_errors_of_the_camera(api: RerobotsClient, sim: Simulator, tmp_path: Path):
    with pytest.raises(InstanceNotFound):
        api.apply_camera(UNKNOWN)
    with pytest.raises(ValueError, match="camera must be 0 to 3"):
        api.camera_snapshot(UNKNOWN, 4)
    with pytest.raises(ValueError, match="unknown add-on"):
        api.apply_addon("nope", UNKNOWN)
    ident = ready(api)
    with pytest.raises(AddonNotActive) as missing:
        api.camera_snapshot(ident)
    assert isinstance(missing.value, NotFound) and missing.value.status == 404
    raw = requests.get(f"{sim.url}/addon/cam/{ident}/7/img", timeout=5,
                       headers={"Authorization": f"Bearer {sim.token}"})
    assert (raw.status_code, raw.json()) == (400, {"error_message": "not valid camera identifier"})
    anonymous = requests.get(f"{sim.url}/addon/cam/{ident}", timeout=5)
    assert anonymous.json() == {"error_message": "wrong authorization token"}
    api.terminate(ident)


def test_a_type_without_the_camera_is_503(tmp_path: Path):
    catalog = tmp_path / "nocam.toml"
    catalog.write_text(
        '[types.plain_arm]\nsupported_addons = ["py"]\n'
        '[[deployments]]\nid = "0b5c2a34-7d7e-4c57-9f39-6d2c1e0a9b11"\ntype = "plain_arm"\n'
        'region = "us:cali"\n')
    with Simulator(str(catalog), ssh_backend="none", **FAST) as sim, \
            RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
        ident = ready(api, "plain_arm")
        with pytest.raises(AddonUnavailable, match="does not support the `cam` add-on"):
            api.apply_camera(ident)
        api.terminate(ident)


@pytest.mark.parametrize(("status", "message", "expected"), [
    (404, "add-on `cam` not active on this instance", AddonNotActive),
    (503, "this instance does not support the `cam` add-on", AddonUnavailable),
    (503, "the add-on `cam` on this instance is not streaming yet", AddonUnavailable),
    (503, "add-on `vnc` already applied to instance x", AddonUnavailable),
    (503, "something else", ServerError),
    (404, "instance not found", InstanceNotFound),
])
def test_classify_add_on_answers(status: int, message: str, expected: type[APIError]):
    assert classify(status, {"error_message": message}, empty=False) is expected


# -- the simulator's picture ------------------------------------------------------------------


def test_snapshots_of_different_states_differ(tmp_path: Path):
    pil = pytest.importorskip("PIL.Image")
    base = dict(instance_id="3f2a" * 9, wtype="basic_kobuki", camera=0, taken_at=1.7e9)
    green = draw_snapshot(RobotView(fw_version="2.7.1", led="green", **base))
    red = draw_snapshot(RobotView(fw_version="2.7.1", led="red", **base))
    assert green != red
    image = pil.open(io.BytesIO(red))
    assert image.format == "JPEG" and image.size == (480, 360)
    # The LED is drawn red at the top of the robot's body.
    r, g, b = image.convert("RGB").getpixel((240, 120))
    assert r > 180 and g < 90 and b < 90, (r, g, b)


def test_state_files_are_read_safely(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "led").write_text("red\nmore\n")
    (state / "fw_version").symlink_to("/etc/passwd")
    (state / "big").write_text("x" * 10_000)
    assert read_state(tmp_path, "led") == "red"
    assert read_state(tmp_path, "fw_version") is None  # a link is not followed
    assert read_state(tmp_path, "missing") is None
    assert read_state(None, "led") is None
    assert read_state(tmp_path, "big") == "x" * 32


def test_a_robot_picture_shows_its_firmware_and_led():
    """Over SSH on a real simulated robot: a failed flash turns the LED red, and the
    picture changes with it."""
    pytest.importorskip("PIL")
    with Simulator(**FAST) as sim, \
            RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
        ident = ready(api)
        api.apply_camera(ident)
        until(api, ident, "active")
        home = sim.world.instances[ident].host.directory  # type: ignore[union-attr]
        before = api.camera_snapshot(ident).data
        (home / "fw.bin").write_text("VERSION=3.0.0\n")
        import subprocess
        subprocess.run(["sh", str(home / "bin/flash-fw"), str(home / "fw.bin")], check=True,
                       capture_output=True)
        assert read_state(home, "led") == "green"
        flashed = api.camera_snapshot(ident).data
        subprocess.run(["sh", str(home / "bin/flash-fw"), str(home / "missing.bin")],
                       capture_output=True)
        assert read_state(home, "led") == "red"
        failed = api.camera_snapshot(ident).data
        assert len({before, flashed, failed}) == 3
        api.terminate(ident)


# -- the client's requests, against the real server's routes ------------------------------------

# From the service's source (apiw/rerobots_apiw/factory.py and addons/cam.py): the routes of
# the camera add-on, each with its method and path pattern, and the answers it gives.
SERVER_ROUTES = {
    ("POST", "/addon/cam/{inid}"): "apply_addon_cam",
    ("GET", "/addon/cam/{inid}"): "status_addon_cam",
    ("GET", "/addon/cam/{inid}/{cameraid:[0-9]+}/img"): "addon_cam_snapshot",
    ("DELETE", "/addon/cam/{inid}"): "remove_addon_cam",
}
RECORDED = {
    "apply_addon_cam": (200, ""),
    "status_addon_cam": (200, {"status": "active", "remote_user": "root"}),
    "addon_cam_snapshot": (200, {"success": True, "format": "JPEG", "coding": "base64",
                                 "data": base64.b64encode(b"\xff\xd8\xff\xe0JFIF").decode()}),
    "remove_addon_cam": (200, ""),
}


class RecordingSession(requests.Session):
    """Answers from the recorded shapes, and records every request the client sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str, Any]] = []

    def request(self, method: str, url: str, **kw: Any) -> requests.Response:  # type: ignore[override]
        path = url.split("example.test", 1)[1]
        self.sent.append((method, path, kw.get("json")))
        handler = match_route(method, path)
        status, body = RECORDED[handler]
        response = requests.Response()
        response.status_code = status
        response._content = (json.dumps(body) if body != "" else "").encode()
        response.headers["Content-Type"] = "application/json"
        return response


def match_route(method: str, path: str) -> str:
    import re
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    for (m, pattern), handler in SERVER_ROUTES.items():
        regex = pattern.replace("{inid}", f"({uuid})").replace("{cameraid:[0-9]+}", "([0-9]+)")
        if m == method and re.fullmatch(regex, path):
            return handler
    raise AssertionError(f"the server has no route {method} {path}")


def test_the_client_sends_what_the_server_routes_expect():
    session = RecordingSession()
    ident = "5e9de205-2208-4022-8bd6-b104b740c270"
    with RerobotsClient("t", "https://example.test", ignore_env=True, session=session) as api:
        api.apply_camera(ident)
        assert api.camera_status(ident) == "active"
        shot = api.camera_snapshot(ident, 2)
        assert shot.data.startswith(b"\xff\xd8") and shot.camera == 2
        assert api.remove_camera(ident) is True
    assert [(m, p) for m, p, _ in session.sent] == [
        ("POST", f"/addon/cam/{ident}"),
        ("GET", f"/addon/cam/{ident}"),
        ("GET", f"/addon/cam/{ident}/2/img"),
        ("DELETE", f"/addon/cam/{ident}"),
    ]
    # The server reads an optional JSON body (only "user"): the client sends none.
    assert session.sent[0][2] is None
