"""The add-on endpoints of the API (``/addon/<name>/:id``), the camera's above all.

``AddonEndpoints`` is a mixin of :class:`pytest_rerobots.client.RerobotsClient`: its
methods send through the client's ``_request`` and check answers with its ``_expect``,
so they are retried, paced and mapped to errors as every other endpoint is. The names
stay importable from :mod:`pytest_rerobots.client`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import AddonNotActive, AddonUnavailable, MalformedResponse
from .wire import check_id, error_message

__all__ = ["ADDONS", "CAMERA_IDS", "AddonEndpoints", "CameraSnapshot"]

#: The add-ons the server routes (``/addon/<name>/:id``; its ``factory.py``).
ADDONS = frozenset({"cam", "vnc", "wstcp", "mistyproxy", "vscode", "py", "java", "drive",
                    "cmd", "cmdsh"})
#: Camera ids the server accepts in ``/addon/cam/:id/:camera/img``.
CAMERA_IDS = range(4)


@dataclass(frozen=True)
class CameraSnapshot:
    """One picture from an instance's camera add-on: ``data`` is the image's bytes
    (``format`` names it; the server sends JPEG)."""

    instance_id: str
    camera: int
    format: str
    data: bytes

    def __repr__(self) -> str:
        return (f"CameraSnapshot(instance_id={self.instance_id!r}, camera={self.camera}, "
                f"format={self.format!r}, {len(self.data)} bytes)")


class AddonEndpoints:
    """The add-on endpoints, mixed into ``RerobotsClient``."""

    if TYPE_CHECKING:
        # What the host class provides (RerobotsClient): declared for the type checker
        # only, so that at run time the host's own methods are the ones found.
        def _request(
            self,
            method: str,
            path: str,
            *,
            params: Mapping[str, Any] | None = None,
            body: Any = None,
            idempotent: bool = True,
            pace: bool = True,
        ) -> Any: ...

        @staticmethod
        def _expect(payload: Any, key: str, kind: type, what: str) -> Any: ...

    @staticmethod
    def _addon_path(addon: str, instance_id: str) -> str:
        if addon not in ADDONS:
            raise ValueError(f"unknown add-on {addon!r}; the API has {', '.join(sorted(ADDONS))}")
        return f"/addon/{addon}/{check_id(instance_id, 'a path')}"

    def apply_addon(self, addon: str, instance_id: str,
                    body: Mapping[str, Any] | None = None) -> None:
        """``POST /addon/<addon>/:id``: apply an add-on (e.g. ``"cam"``) to an instance.

        Activation takes time on the real service: :meth:`addon_status` says ``starting``
        until it is ``active``. Applying one already applied is not an error (the server's
        camera answers 200; other add-ons 503 "already applied", which is taken as done).
        A deployment without the add-on is :class:`AddonUnavailable`.
        """
        path = self._addon_path(addon, instance_id)
        try:
            self._request("POST", path, body=dict(body) if body else None)
        except AddonUnavailable as exc:
            if "already applied" not in exc.message:
                raise

    def addon_status(self, addon: str, instance_id: str) -> dict[str, Any]:
        """``GET /addon/<addon>/:id``: ``{"status": "starting|active|stopping", ...}`` (the
        camera adds ``remote_user``); :class:`AddonNotActive` when it is not applied."""
        path = self._addon_path(addon, instance_id)
        payload = self._request("GET", path)
        self._expect(payload, "status", str, f"GET /addon/{addon}")
        return dict(payload)

    def remove_addon(self, addon: str, instance_id: str) -> bool:
        """``DELETE /addon/<addon>/:id``: remove an add-on. False if it was not applied."""
        try:
            self._request("DELETE", self._addon_path(addon, instance_id))
        except AddonNotActive:
            return False
        return True

    def apply_camera(self, instance_id: str) -> None:
        """``POST /addon/cam/:id``: turn on the instance's cameras (see :meth:`apply_addon`)."""
        self.apply_addon("cam", instance_id)

    def camera_status(self, instance_id: str) -> str:
        """``GET /addon/cam/:id``'s status: ``starting``, ``active`` or ``stopping``;
        :class:`AddonNotActive` when the camera add-on is not applied."""
        return str(self.addon_status("cam", instance_id)["status"])

    def remove_camera(self, instance_id: str) -> bool:
        """``DELETE /addon/cam/:id``; False if the camera add-on was not applied."""
        return self.remove_addon("cam", instance_id)

    def camera_snapshot(self, instance_id: str, camera: int = 0) -> CameraSnapshot:
        """``GET /addon/cam/:id/:camera/img``: one picture from camera ``camera`` (0 to 3).

        :class:`AddonNotActive` when the add-on is not applied; :class:`AddonUnavailable`
        while it is starting or when the camera has no image (``{"success": false}``).
        """
        if camera not in CAMERA_IDS:
            raise ValueError(f"camera must be 0 to 3, not {camera!r}")
        path = f"{self._addon_path('cam', instance_id)}/{camera}/img"
        payload = self._request("GET", path)
        what = f"GET /addon/cam/:id/{camera}/img"
        if not isinstance(payload, Mapping) or not isinstance(payload.get("success"), bool):
            raise MalformedResponse(f"{what}: expected 'success', got {payload!r}"[:400])
        if not payload["success"]:
            raise AddonUnavailable(error_message(payload) or "no image", status=200,
                                   payload=payload, method="GET", path=path)
        data = self._expect(payload, "data", str, what)
        fmt = payload.get("format")
        if payload.get("coding") != "base64" or not isinstance(fmt, str):
            raise MalformedResponse(f"{what}: expected format and coding base64, got "
                                    f"{payload.get('format')!r}, {payload.get('coding')!r}")
        try:
            image = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedResponse(f"{what}: data is not base64") from None
        if not image:
            raise MalformedResponse(f"{what}: the image is empty")
        return CameraSnapshot(instance_id, camera, fmt, image)
