"""eurl notifications: the status events the server POSTs to the URL given with POST /new.

The payload is the server's (``{"id", "wd", "kind": "instance status", "val", "user"}``, the
INIT event adding ``sshkey`` when the user sent no public key). Each POST carries
``Authorization: Bearer <token>`` with a token of this simulator's own, so a receiver can
tell its events apart. Delivery runs on one worker thread; a receiver that fails is logged,
never fatal.
"""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

__all__ = ["EventSender", "event_payload"]

log = logging.getLogger(__name__)


def event_payload(instance_id: str, deployment_id: str, user: str, status: str,
                  private_key: str | None) -> dict[str, Any]:
    """The body of one event; ``private_key`` is only sent with INIT."""
    payload: dict[str, Any] = {
        "id": instance_id,
        "wd": deployment_id,
        "kind": "instance status",
        "val": status,
        "user": user,
    }
    if private_key is not None:
        payload["sshkey"] = private_key
    return payload


class EventSender:
    """Delivers events, on a worker once :meth:`start` ran, else in the caller's thread."""

    def __init__(self) -> None:
        #: Bearer token sent with every event.
        self.token = secrets.token_urlsafe(24)
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        """Start the worker thread."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="rerobots-sim-eurl")

    def close(self) -> None:
        """Stop the worker; an event in flight is bounded by its own short timeout."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def send(self, url: str, payload: dict[str, Any]) -> None:
        """Deliver ``payload`` to ``url`` (queued on the worker when there is one)."""
        if self._pool is None:
            self._post(url, payload)
            return
        try:
            self._pool.submit(self._post, url, payload)
        except RuntimeError:
            log.debug("not sending event %s: the simulator is closing", payload["val"])

    def _post(self, url: str, payload: dict[str, Any]) -> None:
        if not url.startswith(("http://", "https://")):
            # The server also mails (mailto://); the simulator only records that it would.
            log.info("eurl %s: not an http(s) URL, event %s not sent", url, payload["val"])
            return
        try:
            requests.post(url, json=payload, timeout=1.0,
                          headers={"Authorization": f"Bearer {self.token}"})
        except requests.RequestException as exc:
            log.warning("eurl %s: could not deliver event %s: %s", url, payload["val"], exc)
