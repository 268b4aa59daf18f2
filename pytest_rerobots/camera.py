"""A picture of the robot when a test fails: the camera add-on, seen from the plugin.

Where an instance's deployment lists ``cam`` in its ``supported_addons``, :class:`Camera`
applies the add-on (``POST /addon/cam/:id``) once the instance is READY, on a thread of its
own: activation takes time on the real service, and the test does not wait for it. After a
failed or errored test (or after every test, ``--rerobots-camera always``), it takes one
snapshot per camera of each robot the test used and saves it as a JPEG under the artifacts
directory, named after the test. The whole of it is bounded by :data:`SNAPSHOT_WAIT`
seconds per test: a camera that does not answer costs one line saying so, never an error,
and the robot is still ended at teardown as always.

Pure Python (no pytest): the plugin wires it to its hooks and attaches the pictures to the
reports (:mod:`.plugin_report`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AddonUnavailable, ConfigurationError, RerobotsError
from .settings import CAMERA_MODES, DEFAULT_ARTIFACTS

if TYPE_CHECKING:
    from .client import RerobotsClient
    from .instance import Instance

__all__ = ["CAMERA_MODES", "DEFAULT_ARTIFACTS", "SNAPSHOT_WAIT", "Camera", "Pictures",
           "check_directory", "picture_name"]

log = logging.getLogger("pytest_rerobots.camera")

#: Seconds one test's snapshots may take, all robots and cameras together.
SNAPSHOT_WAIT = 5.0
#: Cameras tried per robot: the server takes ids 0 to 3; the next is asked for only while
#: the one before gave a picture.
MAX_CAMERAS = 4
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def picture_name(nodeid: str, inst: Instance, camera: int, when: str) -> str:
    """The file name of one picture: the test's node id made safe for a file name, the
    phase when it was not the test itself, the robot's type and id, and the camera."""
    test = _UNSAFE.sub("_", nodeid.replace("::", "__")).strip("._")[:120] or "test"
    phase = "" if when == "call" else f"-{when}"
    robot = _UNSAFE.sub("_", f"{inst.wtype or 'robot'}-{(inst.id or 'none')[:8]}")
    return f"{test}{phase}--{robot}-cam{camera}.jpg"


def check_directory(path: Path) -> None:
    """:class:`ConfigurationError` unless pictures can be written under ``path``: it is a
    writable directory, or the nearest directory that exists above it is one (it is made
    when the first picture is saved)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise ConfigurationError(f"--rerobots-artifacts: {str(probe)!r} is not a directory")
    if probe == path and not path.is_dir():
        raise ConfigurationError(f"--rerobots-artifacts: {str(path)!r} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"--rerobots-artifacts: cannot write pictures under {str(path)!r} "
            f"({str(probe)!r} is not writable)")


@dataclass
class Pictures:
    """What one test's snapshots gave: the files saved and a line for each robot or
    camera that gave none."""

    saved: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Activation:
    thread: threading.Thread
    state: str = "applying"  # applying -> applied | unsupported | failed
    detail: str = ""


class Camera:
    """The camera add-on of one run's instances: applied in the background once each
    instance is READY, snapshots on demand within :data:`SNAPSHOT_WAIT` seconds."""

    def __init__(self, mode: str, directory: Path, *, wait: float = SNAPSHOT_WAIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in CAMERA_MODES:
            raise ConfigurationError(
                f"--rerobots-camera: {mode!r} is not one of {', '.join(CAMERA_MODES)}")
        self.mode = mode
        self.directory = directory
        self.wait = wait
        self.clock = clock
        self._lock = threading.Lock()
        self._activations: dict[str, _Activation] = {}

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def wanted(self, failed: bool) -> bool:
        """Whether a test's end (``failed``: it failed or errored) calls for pictures."""
        return self.mode == "always" or (self.mode == "on-failure" and failed)

    # -- activation -------------------------------------------------------------------

    def activate(self, client: RerobotsClient, inst: Instance) -> None:
        """Apply the camera add-on to a READY ``inst`` if its deployment supports it, on a
        thread of its own (once per instance; the caller does not wait)."""
        ident = inst.id
        if not self.on or ident is None:
            return
        with self._lock:
            if ident in self._activations:
                return
            activation = _Activation(threading.Thread(
                target=self._apply, args=(client, inst, ident), daemon=True,
                name=f"rerobots-camera-{ident[:8]}"))
            self._activations[ident] = activation
        activation.thread.start()

    def _apply(self, client: RerobotsClient, inst: Instance, ident: str) -> None:
        activation = self._activations[ident]
        try:
            addons = _supported_addons(client, inst)
            if "cam" not in addons:
                activation.state = "unsupported"
                return
            client.apply_camera(ident)
            activation.state = "applied"
        except AddonUnavailable as exc:  # "this instance does not support the `cam` add-on"
            activation.state, activation.detail = "unsupported", exc.message
        except RerobotsError as exc:
            activation.state, activation.detail = "failed", str(exc)
            log.info("camera of %s: %s", ident, exc)

    def has_camera(self, inst: Instance) -> bool:
        """Whether a snapshot of ``inst`` is worth asking for (applied, or being applied)."""
        activation = self._activations.get(inst.id or "")
        return activation is not None and activation.state in ("applying", "applied")

    # -- snapshots --------------------------------------------------------------------

    def snapshot(self, client: RerobotsClient, instances: Sequence[Instance], nodeid: str,
                 when: str) -> Pictures:
        """Pictures of every camera of ``instances`` (those with the add-on), saved as
        JPEG files named after the test, within :attr:`wait` seconds in all."""
        pictures = Pictures()
        robots = [(str(inst.id), inst) for inst in instances if self.has_camera(inst)]
        if not robots:
            return pictures
        started = self.clock()
        deadline = started + self.wait
        taken: list[tuple[Instance, int, bytes]] = []
        missing: dict[str, str] = {ident: "no answer" for ident, _ in robots}

        def work() -> None:
            for ident, inst in robots:
                try:
                    shots = self._shots(client, ident, deadline)
                except RerobotsError as exc:
                    missing[ident] = _short(exc)
                    continue
                with self._lock:
                    taken.extend((inst, number, data) for number, data in shots)
                    missing.pop(ident, None)

        worker = threading.Thread(target=work, daemon=True, name="rerobots-snapshot")
        worker.start()
        worker.join(max(0.0, deadline - self.clock()))
        with self._lock:
            got = list(taken)
            late = dict(missing)
        for inst, number, data in got:
            path = self.directory / picture_name(nodeid, inst, number, when)
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            except OSError as exc:
                pictures.notes.append(f"rerobots: camera: cannot save {path}: "
                                      f"{exc.strerror or exc}")
                continue
            pictures.saved.append(path)
        for ident, why in late.items():
            label = next(inst.label for key, inst in robots if key == ident)
            if worker.is_alive() and why == "no answer":
                why = f"no picture within {self.wait:g} s"
            pictures.notes.append(f"rerobots: camera of {label}: {why}; no picture")
        pictures.seconds = self.clock() - started
        return pictures

    def _shots(self, client: RerobotsClient, ident: str, deadline: float
               ) -> list[tuple[int, bytes]]:
        """The pictures of each camera of instance ``ident``: camera 0, then the next while
        the one before gave one. Waits (until ``deadline``) for the add-on to be active."""
        activation = self._activations[ident]
        activation.thread.join(max(0.0, deadline - self.clock()))
        if activation.state != "applied":
            raise AddonUnavailable(activation.detail or f"add-on {activation.state}")
        shots: list[tuple[int, bytes]] = []
        for number in range(MAX_CAMERAS):
            while True:
                try:
                    shot = client.camera_snapshot(ident, number)
                except AddonUnavailable as exc:
                    if "not streaming yet" in exc.message and self.clock() < deadline:
                        time.sleep(0.2)  # still starting: it turns active on its own
                        continue
                    if number > 0:
                        return shots  # that camera does not exist
                    raise
                shots.append((number, shot.data))
                break
        return shots


def _supported_addons(client: RerobotsClient, inst: Instance) -> list[str]:
    """The add-ons of ``inst``'s deployment: from the ``wdinfo`` of its GET /instance, or
    else GET /deployment/:id."""
    info = inst.details.get("wdinfo") if isinstance(inst.details, dict) else None
    if not isinstance(info, dict) and inst.deployment:
        info = client.deployment(inst.deployment)
    addons = info.get("supported_addons") if isinstance(info, dict) else None
    return [str(a) for a in addons] if isinstance(addons, list) else []


def _short(exc: RerobotsError) -> str:
    text = str(exc)
    return text if len(text) <= 160 else text[:157] + "..."
