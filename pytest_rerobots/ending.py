"""Ending one instance by its id: ``POST /terminate``, waiting out INIT and the moment
after ``POST /new`` when the server does not list the instance yet.

The one way every layer ends an instance: an :class:`~pytest_rerobots.instance.Instance`
at its end, the ledger's sweep, the watchdog and the keepers. It needs the client only,
not the SSH machinery, so those layers load it without loading paramiko.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from . import retry
from .errors import BusyWorkspaceInstance, InstanceNotFound, NotFound
from .outcome import Outcome

if TYPE_CHECKING:
    from .client import RerobotsClient

__all__ = ["end"]


def end(
    client: RerobotsClient,
    instance_id: str,
    *,
    deadline: float = 120.0,
    notfound_grace: float = 0.0,
    sleep: retry.Sleep = time.sleep,
) -> Outcome:
    """Terminate ``instance_id`` and say how it ended: terminated, already ended or not found.

    Waits out INIT (the server refuses to terminate it) and transient errors
    until ``deadline`` s; a 404 counts as "not visible yet" for ``notfound_grace``
    s (the server inserts the instance after answering ``POST /new``).
    """
    begun = time.monotonic()
    for attempt in retry.terminating(deadline=deadline, sleep=sleep):
        with attempt:
            try:
                ended_now = client.terminate(instance_id, once=True)
            except InstanceNotFound:
                if _cancelled_reservation(client, instance_id):
                    return Outcome.NOT_FOUND  # a reservation not served yet: now never
                if time.monotonic() - begun < notfound_grace:
                    raise BusyWorkspaceInstance(
                        f"instance {instance_id} not visible yet", status=404) from None
                return Outcome.NOT_FOUND
    return Outcome.TERMINATED if ended_now else Outcome.ALREADY_ENDED


def _cancelled_reservation(client: RerobotsClient, ident: str) -> bool:
    """Whether ``ident`` was a reservation still waiting, now cancelled."""
    try:
        client.cancel_reservation(ident)
    except NotFound:
        return False
    return True
