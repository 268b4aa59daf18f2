"""The simulator's add-ons: the camera (``cam``), with the real server's shapes and states.

What the server does (``apiw/rerobots_apiw/addons/cam.py`` of the service's source):

- ``POST /addon/cam/:id`` (optional body ``{"user": ...}``, default ``root``) applies it:
  404 ``instance not found``; 503 ``this instance does not support the `cam` add-on``
  when the deployment's ``supported_addons`` lacks ``cam``; applying it again is a 200
  (the switch ``addon_repeat_error`` gives instead the 503 ``add-on `cam` already applied
  to instance <id>`` of the other add-ons). It is ``starting`` until the instance is READY
  and the camera is streaming (here: ``cam_delay`` seconds of ``[timings]``), then
  ``active``.
- ``GET /addon/cam/:id``: ``{"status": ..., "remote_user": ...}``, or 404 ``add-on `cam`
  not active on this instance``.
- ``GET /addon/cam/:id/:camera/img``: camera ids 0 to 3 (else 400 ``not valid camera
  identifier``); 404 when not applied; 503 ``the add-on `cam` on this instance is not
  streaming yet`` while starting; ``{"success": true, "format": "JPEG", "coding":
  "base64", "data": ...}``, or ``{"success": false, "message": "no image available; try
  again soon."}`` for a camera the robot does not have (the simulated robots have one,
  camera 0).
- ``DELETE /addon/cam/:id``: 404 when not applied; else 200, and it is ``stopping`` for
  ``cam_delay`` seconds, then gone.

An instance that ends loses its add-ons (the server's source does not say; see
docs/simulator-differences.md).

The picture is drawn (with Pillow, the ``sim`` extra) from the robot's state: its type, the
firmware version in ``state/fw_version`` and the LED colour in ``state/led`` of the robot's
home, which the catalog's ``bin/flash-fw`` writes (green after a flash, red after a failed
one). Two snapshots of a robot in different states differ. Without Pillow the picture is
the blank JPEG the server's own mock sends.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import ENDED_STATUSES, READY, Refusal

if TYPE_CHECKING:
    from .world import World

__all__ = ["CameraAddon", "RobotView", "draw_snapshot"]

CAM = "cam"
#: The cameras each simulated robot has (the server accepts ids 0 to 3).
CAMERAS = 1
NOT_ACTIVE = "add-on `cam` not active on this instance"
NOT_STREAMING = "the add-on `cam` on this instance is not streaming yet"
NOT_SUPPORTED = "this instance does not support the `cam` add-on"
NO_IMAGE = "no image available; try again soon."
#: The picture the server's mock sends (a blank 480x360 JPEG): the fallback without Pillow.
MOCK_JPEG = (
    "/9j/4AAQSkZJRgABAQIAJQAlAAD/2wBDAAMCAgICAgMCAgIDAwMDBAYEBAQEBAgGBgUGCQgKCgkICQkK"
    + "DA8MCgsOCwkJDRENDg8QEBEQCgwSExIQEw8QEBD/wAALCAFoAeABAREA/8QAFQABAQ"
    + "A" * 20
    + "j/xAAUEAE"
    + "A" * 21
    + "/9oACAEBAAA/AK1"
    + "A" * 899
    + "B//9k="
)
LED_COLOURS = {
    "green": (40, 200, 70),
    "red": (230, 40, 40),
    "amber": (240, 170, 20),
    "off": (70, 70, 70),
}
# The most a status file is read: a version or a colour name.
_STATE_MAX = 64


@dataclass
class _CamState:
    user: str
    applied_at: float
    remote_user: str
    #: When the instance was first seen READY with the add-on applied.
    ready_at: float | None = None
    #: When DELETE came; it is gone ``cam_delay`` later.
    removed_at: float | None = None


@dataclass(frozen=True)
class RobotView:
    """What a camera sees of one robot."""

    instance_id: str
    wtype: str
    camera: int
    fw_version: str
    led: str
    taken_at: float


class CameraAddon:
    """The camera add-on of every instance of ``world``, kept beside the world (its state
    changes under the world's lock, as the world's own)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._states: dict[str, _CamState] = {}

    # -- state, under the world's lock ------------------------------------------------

    def _status(self, inst_id: str, inst_status: str, now: float) -> str | None:
        """The add-on's status on that instance now (None: not applied), moving it on."""
        state = self._states.get(inst_id)
        if state is None:
            return None
        delay = float(self.world.timings.cam_delay)
        if inst_status in ENDED_STATUSES:
            del self._states[inst_id]
            return None
        if state.removed_at is not None:
            if now >= state.removed_at + delay:
                del self._states[inst_id]
                return None
            return "stopping"
        if inst_status == READY and state.ready_at is None:
            state.ready_at = max(now, state.applied_at)
        if state.ready_at is not None and now >= state.ready_at + delay:
            return "active"
        return "starting"

    def apply(self, user: str, instance_id: str, body: dict[str, Any]) -> None:
        """``POST /addon/cam/:id``."""
        remote_user = body.get("user", "root")
        if not isinstance(remote_user, str):
            remote_user = "root"
        world = self.world
        with world.lock:
            inst = world.find(user, instance_id)
            if CAM not in inst.deployment.spec.supported_addons:
                raise Refusal(503, NOT_SUPPORTED)
            now = world.clock()
            if self._status(inst.id, inst.status, now) is not None:
                if world.switches.addon_repeat_error:
                    raise Refusal(503, f"add-on `cam` already applied to instance {inst.id}")
                return
            self._states[inst.id] = _CamState(user, now, remote_user)
            self._status(inst.id, inst.status, now)

    def status(self, user: str, instance_id: str) -> dict[str, Any]:
        """``GET /addon/cam/:id``."""
        world = self.world
        with world.lock:
            inst = world.find(user, instance_id)
            status = self._status(inst.id, inst.status, world.clock())
            if status is None:
                raise Refusal(404, NOT_ACTIVE)
            return {"status": status, "remote_user": self._states[inst.id].remote_user}

    def remove(self, user: str, instance_id: str) -> None:
        """``DELETE /addon/cam/:id``."""
        world = self.world
        with world.lock:
            inst = world.find(user, instance_id)
            now = world.clock()
            if self._status(inst.id, inst.status, now) is None:
                raise Refusal(404, NOT_ACTIVE)
            state = self._states[inst.id]
            if state.removed_at is None:
                state.removed_at = now
            self._status(inst.id, inst.status, now)

    def snapshot(self, user: str, instance_id: str, camera: str) -> dict[str, Any]:
        """``GET /addon/cam/:id/:camera/img``: the robot's picture now."""
        try:
            number = int(camera)
        except ValueError:
            number = -1
        if not 0 <= number <= 3:
            raise Refusal(400, "not valid camera identifier")
        world = self.world
        with world.lock:
            inst = world.find(user, instance_id)
            now = world.clock()
            status = self._status(inst.id, inst.status, now)
            if status is None:
                raise Refusal(404, NOT_ACTIVE)
            if status != "active":
                raise Refusal(503, NOT_STREAMING)
            home = inst.host.directory if inst.host is not None else None
            wtype = inst.wtype
        if number >= CAMERAS:
            return {"success": False, "message": NO_IMAGE}
        view = RobotView(
            instance_id=instance_id, wtype=wtype, camera=number,
            fw_version=read_state(home, "fw_version") or "none",
            led=(read_state(home, "led") or "off").lower(),
            taken_at=now,
        )
        return {"success": True, "format": "JPEG", "coding": "base64",
                "data": base64.b64encode(draw_snapshot(view)).decode("ascii")}


def read_state(home: Path | None, name: str) -> str | None:
    """The first line of ``state/<name>`` in a robot's home, or None. The robot's own
    commands write there, so neither the directory nor the file may be a link, and only a
    few bytes of a regular file are read."""
    if home is None:
        return None
    try:
        state = home / "state"
        if not stat.S_ISDIR(os.lstat(state).st_mode):
            return None
        fd = os.open(state / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, _STATE_MAX)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = raw.decode("utf-8", "replace").splitlines()
    line = text[0].strip() if text else ""
    return "".join(c for c in line if c.isprintable())[:32] or None


def draw_snapshot(view: RobotView) -> bytes:
    """A JPEG of the robot as ``view`` has it: its body from above, the LED in its colour,
    and a caption with the firmware version, the LED, the camera and the time."""
    try:
        from PIL import Image, ImageDraw  # the 'sim' extra; imported when a picture is taken
    except ImportError:
        return base64.b64decode(MOCK_JPEG)
    width, height = 480, 360
    image = Image.new("RGB", (width, height), (205, 200, 190))
    draw = ImageDraw.Draw(image)
    # The floor: a grid, as a lab's tiles.
    for x in range(0, width, 40):
        draw.line([(x, 0), (x, height)], fill=(190, 185, 175))
    for y in range(0, height, 40):
        draw.line([(0, y), (width, y)], fill=(190, 185, 175))
    cx, cy, r = width // 2, height // 2 - 10, 110
    if "kobuki" in view.wtype:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(45, 45, 50), outline=(20, 20, 20),
                     width=4)
        draw.arc([cx - r + 6, cy - r + 6, cx + r - 6, cy + r - 6], 200, 340,
                 fill=(110, 110, 115), width=10)  # the bumper
    else:
        draw.rounded_rectangle([cx - r, cy - r, cx + r, cy + r], radius=30,
                               fill=(235, 235, 240), outline=(60, 60, 70), width=4)
    colour = LED_COLOURS.get(view.led, LED_COLOURS["off"])
    led_r = 22
    draw.ellipse([cx - led_r, cy - r + 30, cx + led_r, cy - r + 30 + 2 * led_r], fill=colour,
                 outline=(255, 255, 255), width=3)
    draw.rectangle([0, height - 64, width, height], fill=(20, 20, 24))
    when = dt.datetime.fromtimestamp(view.taken_at, dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")
    draw.text((10, height - 58), f"{view.wtype}  {view.instance_id[:8]}  camera {view.camera}",
              fill=(230, 230, 230))
    draw.text((10, height - 40), f"firmware {view.fw_version}   LED {view.led}",
              fill=colour if view.led != "off" else (230, 230, 230))
    draw.text((10, height - 22), f"simulated camera  {when}", fill=(160, 160, 160))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
