"""The lease watch: while a robot is held READY, notice within seconds that it is lost.

Every ``watch_interval`` seconds (default 5) a daemon thread probes the robot's host on the
test's own SSH connection: a session channel opened and closed at once, which costs no API
call. What it finds:

- the probe is answered: the robot is fine;
- the transport is closed (the service stops the host of a robot it ends) or the probe is
  not answered within ``PROBE_TIMEOUT`` s while the connection stays open (a network
  partition, a hung host): one ``GET /instance/:id`` says which. TERMINATING, TERMINATED or
  INIT_FAIL that this run did not ask for means the service ended it (its lease, an admin,
  another client, a fault); otherwise an unanswered probe is a host unreachable, and a
  closed transport a dropped connection, which the next user reconnects
  (:meth:`~.instance.Instance.ensure_connected`; if that fails, so does the test);
- and once every ``API_EVERY`` seconds the status is asked anyway, for a robot the service
  ended while its host still answers.

The real API's budget is 3600 calls an hour per token, shared by every job: the watch
spends one call a minute per robot while all is well.

A loss is an :class:`~.errors.InstanceLost` naming what happened and when; the watch hands
it to the instance (:meth:`~.instance.Instance.lose`), which cuts the connection so that a
command, transfer, ``expect`` or forward in flight fails at once with that error, never
after its own timeout. A connection that breaks under a use is diagnosed at once with the
same API question, so the use fails naming the termination rather than a bare lost
connection. API trouble during a check is not a loss (the next check tries again).

So a robot the service ended (its host gone) is noticed within ``watch_interval``, at
once if a command was running; a partitioned host within ``watch_interval +
PROBE_TIMEOUT`` (10 s by default); a robot ended whose host still answers within
``API_EVERY`` (60 s).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import paramiko

from .errors import InstanceLost, RerobotsError

if TYPE_CHECKING:
    from .instance import Instance

__all__ = ["API_EVERY", "ENDED_BY_SERVICE", "PROBE_TIMEOUT", "LeaseWatch", "clock", "diagnose",
           "lose"]

log = logging.getLogger(__name__)
# What a loss does to the instance is logged as the instance's (filters know that name).
_instance_log = logging.getLogger("pytest_rerobots.instance")

#: Seconds a host has to answer the watch's probe before it counts as unreachable.
PROBE_TIMEOUT = 5.0
#: Seconds between status requests while the host answers (the API's budget is small).
API_EVERY = 60.0
#: Statuses that mean the service ended the instance.
ENDED_BY_SERVICE = frozenset({"TERMINATING", "TERMINATED", "INIT_FAIL"})


def lose(inst: Instance, error: InstanceLost) -> None:
    """:meth:`.instance.Instance.lose`: remember why ``inst`` is lost, cut its connection so
    that what is in flight fails now with ``error``, and tell the listeners (``lost``).
    Nothing when it is lost already or this process is ending it."""
    if inst.lost is not None or inst.ending:
        return
    inst.lost = error
    _instance_log.warning("rerobots: %s", error)
    conn = inst.current_connection
    if conn is not None:
        conn.mark_lost(error)
    inst._emit("lost", error)  # (an optional event: listeners may have no ``lost``)


def diagnose(inst: Instance) -> None:
    """The connection of ``inst`` broke under a use: ask the service at once whether it
    ended the robot (one ``GET /instance``), so that the use fails naming that."""
    watch = inst._watch
    if watch is not None and inst.lost is None and not inst.ending:
        lost = watch.check_api()
        if lost is not None:
            inst.lose(lost)


def clock(at: float) -> str:
    """``12:03:04``: a time of day as the reports name it (local time)."""
    return time.strftime("%H:%M:%S", time.localtime(at))


class LeaseWatch:
    """Checks one held instance every ``interval`` seconds until :meth:`stop` or a loss."""

    def __init__(self, inst: Instance, interval: float,
                 probe_timeout: float = PROBE_TIMEOUT) -> None:
        self.inst = inst
        self.interval = interval
        self.probe_timeout = probe_timeout
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._asked = time.monotonic()  # (READY was just seen: no status request yet)
        self._probe_at = 0.0

    def start(self) -> None:
        if self._thread is not None or self.interval <= 0:
            return
        ident = self.inst.id or ""
        self._thread = threading.Thread(target=self._loop, name=f"rerobots-watch-{ident[:8]}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                lost = self.check()
            except Exception:  # a watch bug must never take the run down
                log.exception("lease watch of %s failed", self.inst.id)
                continue
            if lost is not None and not self._stop.is_set():
                self.inst.lose(lost)
                return

    def check(self) -> InstanceLost | None:
        """One look at the instance; the loss, if it is lost."""
        inst = self.inst
        if inst.id is None or inst.outcome is not None or inst.ending:
            return None
        now = time.monotonic()
        probe = self._probe_host(inst)
        lost: InstanceLost | None = None
        if probe == "answered" and now - self._asked < API_EVERY:
            return None
        if probe != "answered" or now - self._asked >= API_EVERY:
            self._asked = now
            lost = self.check_api()
        if lost is None and probe == "silent":
            lost = InstanceLost(
                f"{inst.where}: its host stopped answering at {clock(self._probe_at)} (no "
                f"SSH answer within {self.probe_timeout:g} s, connection still open: a "
                "network partition or a hung host)", instance_id=inst.id,
                status=inst.status, at=self._probe_at, reason="host unreachable")
        return None if self._stop.is_set() or inst.ending else lost

    def check_api(self) -> InstanceLost | None:
        """Whether the service ended it (one ``GET /instance``): the loss, or None."""
        inst = self.inst
        if inst.id is None:
            return None
        try:
            status = str(inst.client.instance(inst.id).get("status"))
        except RerobotsError as exc:
            log.info("lease watch: GET /instance/%s failed (%s); the next check tries again",
                     inst.id, exc)
            return None
        if status not in ENDED_BY_SERVICE:
            return None
        now = time.time()
        lease = inst.options.lease
        ready_at = inst.timings.ready_at
        rented_at = None if ready_at is None else ready_at - inst.timings.to_ready
        if lease and rented_at is not None and now >= rented_at + lease - 1:
            why = f"its lease of {lease} s ended"
        else:
            why = "ended outside this run: an admin, another client or the service"
        return InstanceLost(
            f"{inst.where} was terminated by the service (noticed at {clock(now)}, status "
            f"{status}): {why}", instance_id=inst.id, status=status, at=now,
            reason="terminated by the service")

    def _probe_host(self, inst: Instance) -> str:
        """``answered``, ``silent`` (no answer, connection open), ``closed`` (the transport
        is down) or ``none`` (no connection to probe)."""
        conn = inst.current_connection
        if conn is None or conn.closed:
            return "none"
        transport = conn.client.get_transport()
        if transport is None or not transport.is_active():
            return "closed"
        self._probe_at = time.time()
        try:
            chan = transport.open_session(timeout=self.probe_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if not transport.is_active():
                return "closed"  # closed meanwhile (a drop, or this run's own end)
            log.info("lease watch: host of %s did not answer: %s", inst.id, exc)
            return "silent"
        chan.close()
        return "answered"
