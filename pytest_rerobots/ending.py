"""Ending instances by their ids: ``POST /terminate``, waiting out INIT and the moment
after ``POST /new`` when the server does not list the instance yet; one (:func:`end`), or
many in parallel with each end recorded in the ledger (:func:`end_ids`).

The one way every layer ends an instance: an :class:`~pytest_rerobots.instance.Instance`
at its end, the sweep, the watchdog, the keepers and an xdist controller ending a dead
worker's leftovers. It needs the client only, not the SSH machinery, so those layers load
it without loading paramiko. (:func:`.instance.end_all` ends ``Instance`` objects, SSH
sessions and all.)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from .errors import BusyWorkspaceInstance, ConfigurationError, InstanceNotFound, NotFound
from .outcome import ENDED_OUTCOMES, Outcome
from .signals import waiting_to_end

if TYPE_CHECKING:
    from . import retry
    from .client import RerobotsClient

__all__ = ["end", "end_ids"]

log = logging.getLogger("pytest_rerobots.ending")


class EndRecorder(Protocol):
    """Where :func:`end_ids` records each end: a :class:`~pytest_rerobots.ledger.Ledger`
    (named by its protocol, so that this module stays below the ledger)."""

    @property
    def path(self) -> os.PathLike[str]: ...

    def record_ended(self, instance_id: str, outcome: str, *, by: str = ...) -> None: ...


def end(
    client: RerobotsClient,
    instance_id: str,
    *,
    deadline: float = 120.0,
    notfound_grace: float = 0.0,
    sleep: retry.Sleep = time.sleep,
    label: str | None = None,
) -> Outcome:
    """Terminate ``instance_id`` and say how it ended: terminated, already ended or not found.

    Waits out INIT (the server refuses to terminate it) and transient errors
    until ``deadline`` s; a 404 counts as "not visible yet" for ``notfound_grace``
    s (the server inserts the instance after answering ``POST /new``). If this process
    was interrupted (its signal guard caught a signal), the wait for INIT is announced at
    once, naming the instance as ``label`` (default: its id) and how long it may take.
    """
    begun = time.monotonic()
    # Lazily: tenacity loads with the first end, not with every pytest run (the plugin
    # imports this module through the kept-instance store).
    from . import retry

    wait_over: Callable[[], None] | None = None
    try:
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
                except BusyWorkspaceInstance:  # INIT: the server ends no starting instance
                    if wait_over is None:
                        left = max(0.0, deadline - (time.monotonic() - begun))
                        wait_over = waiting_to_end(
                            f"{label or instance_id} to leave INIT", left)
                    raise
    finally:
        if wait_over is not None:
            wait_over()
    return Outcome.TERMINATED if ended_now else Outcome.ALREADY_ENDED


def _cancelled_reservation(client: RerobotsClient, ident: str) -> bool:
    """Whether ``ident`` was a reservation still waiting, now cancelled."""
    try:
        client.cancel_reservation(ident)
    except NotFound:
        return False
    return True


def end_ids(
    client: RerobotsClient,
    ids: Iterable[str],
    *,
    deadline: float = 120.0,
    notfound_grace: float | Mapping[str, float] = 0.0,
    ledger: EndRecorder | None = None,
    by: str = "controller",
) -> dict[str, str]:
    """Terminate every id in parallel (:func:`end`), waiting out INIT for up to
    ``deadline`` s.

    Returns ``{id: outcome}``, an outcome of :data:`.ENDED_OUTCOMES` or one starting
    with ``"failed:"``. Each success is recorded in ``ledger`` as ended ``by`` that
    layer. Never raises for one instance's trouble. ``notfound_grace`` may be given per
    id (a mapping; an id it does not name gets none).
    """
    def one(ident: str) -> tuple[str, str]:
        grace = (notfound_grace.get(ident, 0.0) if isinstance(notfound_grace, Mapping)
                 else notfound_grace)
        try:
            outcome: str = end(client, ident, deadline=deadline, notfound_grace=grace)
        except Exception as exc:  # one instance's trouble must not stop the others
            outcome = f"failed: {exc}"
        if ledger is not None and outcome in ENDED_OUTCOMES:
            try:
                ledger.record_ended(ident, outcome, by=by)
            except (OSError, ConfigurationError) as exc:
                log.warning("rerobots ledger %s: cannot record the end of %s: %s",
                            ledger.path, ident, exc)
        return ident, outcome

    unique = list(dict.fromkeys(ids))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(unique)),
                            thread_name_prefix="rerobots-end") as pool:
        return dict(pool.map(one, unique))
