"""Renting one instance: from ``POST /new`` to READY, kept alive meanwhile.

A :class:`Renter` does for an :class:`~pytest_rerobots.instance.Instance` what happens
before it can be used: rent it (``POST /new``), wait for a busy robot (a lone deployment
is reserved, a type of several is polled), rent again when a rental fails to start
(INIT_FAIL, or INIT past the ready timeout), recover what a lost or interrupted
``POST /new`` made, and wait for READY. :class:`Keepalive` pings the instance from a
thread of its own until it ends. What they learn (id, status, queue position, failed
rentals) is written on the instance, which listeners and reports read.
"""

from __future__ import annotations

import difflib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity

from . import retry
from .client import NewInstance
from .errors import (
    APIError,
    BusyWorkspaceDeployment,
    DeploymentNotFound,
    InstanceError,
    InstanceFailed,
    InstanceNotFound,
    InstanceTimeout,
    MalformedResponse,
    NotFound,
    RerobotsError,
    ReservationNotFound,
    UnreadableNewAnswer,
)
from .outcome import Outcome
from .pacing import poll_interval, rate_wait
from .wire import is_uuid

if TYPE_CHECKING:
    from .client import RerobotsClient
    from .instance import Instance, InstanceOptions

__all__ = ["ENDED", "FailedRental", "Keepalive", "Renter", "closest_first", "take_details"]

# The instance's logger still: what renting logs is about the instance, and filters know it.
log = logging.getLogger("pytest_rerobots.instance")

#: Statuses that end a wait for READY: the instance will never be usable.
ENDED = ("INIT_FAIL", "TERMINATING", "TERMINATED")

#: Seconds spent looking for what a ``POST /new`` interrupted by Ctrl-C made.
INTERRUPTED_NEW_LOOKS = 3.0


def closest_first(name: str, choices: Sequence[str]) -> list[str]:
    """``choices``, those most like ``name`` first (difflib's ratio), then the rest in
    their order: for "there is no type X; valid types: ..." messages."""
    close = difflib.get_close_matches(name, list(choices), n=len(choices), cutoff=0.6)
    return [*close, *(c for c in choices if c not in close)]


_E = TypeVar("_E", bound=APIError)


def _explained(error: _E, hint: str, sep: str = "\n") -> _E:
    """A copy of the API error ``error`` whose message goes on with ``hint``."""
    again = type(error)(error.message, status=error.status, payload=error.payload,
                        method=error.method, path=error.path)
    again.args = (f"{error}{sep}{hint}",)
    return again


@dataclass
class FailedRental:
    """An instance rented for an :class:`~pytest_rerobots.instance.Instance` that never
    became READY, and ended."""

    id: str
    deployment: str | None
    region: str | None
    #: The last status seen: INIT_FAIL, or INIT (or unknown) past the ready timeout.
    status: str
    outcome: Outcome | None = None


class Renter:
    """Rents for one instance and waits until it is READY (see the module's docstring).

    It holds no state of its own: what it learns goes on the instance (``id``,
    ``status``, ``details``, ``queue_position``, ``busy_reason``, ``failed_rentals``,
    ``timings``), and it sleeps through the instance's ``_nap``, so that a start called
    off (:class:`~pytest_rerobots.fleet.Aborted`) stops it too.
    """

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        #: The id last recorded (:meth:`_record`), and whether the instance had been ended
        #: from another thread when it was.
        self._recorded: str | None = None
        self._raced = False

    @property
    def client(self) -> RerobotsClient:
        return self.inst.client

    @property
    def options(self) -> InstanceOptions:
        return self.inst.options

    @property
    def target(self) -> str:
        return self.inst.target

    @property
    def label(self) -> str:
        return self.inst.label

    # -- POST /new, and what a lost or interrupted one made --------------------

    def _new(self, target: str, *, reserve: bool | None = None,
             wds: Sequence[str] | None = None) -> NewInstance:
        """``POST /new``; a 5xx that reconciliation showed created nothing is sent again
        a few times with backoff (never blindly: the client looked first)."""
        inst = self.inst
        first_sent = self.client.clock()
        for attempt in retry.renting(fast=self.options.fast_polling, sleep=inst._nap):
            with attempt:
                if attempt.retry_state.attempt_number > 1 and not reserve:
                    # One more look first: the server lists what it made only after its
                    # 404 window, which may outlast the client's own looks.
                    found = self.client.find_new_instance(target, first_sent, self._known_ids)
                    if found is not None:
                        return NewInstance(success=True, id=found, reconciled=True)
                return self._new_once(target, reserve=reserve, wds=wds)
        raise AssertionError("unreachable")  # pragma: no cover (reraise=True)

    def _new_once(self, target: str, *, reserve: bool | None,
                  wds: Sequence[str] | None) -> NewInstance:
        inst = self.inst
        sent_at = self.client.clock()
        answer: NewInstance | None = None
        try:
            answer = self.client.new_instance(
                target, sshkey=inst.public_key, expire_d=self.options.lease, keepalive=True,
                reserve=reserve, wds=wds, known_ids=self._known_ids,
            )
            if answer.success:
                # Recorded here, where the answer is read: a Ctrl-C on the way back to
                # the caller must not lose the id (it would live until the keepalive
                # window ended it).
                self._record(answer.id)
            return answer
        except UnreadableNewAnswer as unreadable:
            # The server acted on it but its answer cannot be read: what reconciliation
            # found is this instance's now, so that start() ends it at once (and the
            # summary says it was rented and terminated, not "never rented").
            if unreadable.made is not None:
                self._rented(unreadable.made)
            raise
        except KeyboardInterrupt:
            if answer is not None:
                # Ctrl-C just after the answer: what it made is ours to end (start() does).
                self._interrupted_after(answer)
                raise
            # Ctrl-C while POST /new was in flight: the server may have acted. A quick
            # look, so that what it made is ended now, not a keepalive window later.
            # (Not for a reservation: what GET /instances lists then is the robot's
            # current holder, perhaps another job on the same token.)
            if not reserve:
                self._claim_interrupted_new(target, sent_at)
            raise

    def _interrupted_after(self, answer: NewInstance) -> None:
        """A Ctrl-C came after POST /new answered and before the caller used the answer:
        an instance is recorded (start() ends it); a reservation is cancelled, or, if it
        was served meanwhile, recorded."""
        if answer.success:
            self._record(answer.id)
        elif self._cancel_reservation(answer.id) is True:
            self._record(answer.id)

    def _claim_interrupted_new(self, target: str, sent_at: float) -> None:
        # The server lists a new instance only once its launch task has inserted it,
        # a moment after answering: a few quick looks, at most INTERRUPTED_NEW_LOOKS s.
        found = None
        deadline = time.monotonic() + min(INTERRUPTED_NEW_LOOKS, self.options.notfound_grace)
        while found is None:
            try:
                found = self.client.find_new_instance(target, sent_at, self._known_ids)
            except Exception as exc:  # nothing may replace the KeyboardInterrupt
                log.warning("after Ctrl-C during POST /new/%s: %s", target, exc)
                return
            if found is None:
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.25)  # (not inst.sleep: an injected one may interrupt again)
        if found is not None:
            log.warning("Ctrl-C during POST /new/%s: it made %s, which is ended now", target,
                        found)
            self._rented(found)

    def _known_ids(self) -> list[str]:
        """Instances that cannot be the answer to a lost POST /new of ours."""
        inst = self.inst
        known = [i for i in (inst.id, *(f.id for f in inst.failed_rentals)) if i]
        if inst.known_ids is not None:
            known.extend(inst.known_ids())
        return known

    # -- renting, and renting again after a failed start ----------------------

    def rent_until_ready(self) -> None:
        """Rent and wait for READY; an instance that ends INIT_FAIL (or stays INIT past
        the ready timeout) is ended and replaced, up to ``init_retries`` times, avoiding
        the deployments that just failed where the type has others."""
        inst = self.inst
        avoid: list[str] = []
        for attempt in range(self.options.init_retries + 1):
            self._rent(avoid)
            try:
                self.wait_ready()
                return
            except (InstanceFailed, InstanceTimeout) as exc:
                if isinstance(exc, InstanceFailed) and inst.status != "INIT_FAIL":
                    raise  # ended by someone (TERMINATING/TERMINATED): not a failed start
                if attempt == self.options.init_retries:
                    # This one stays the instance's own: start() ends it.
                    raise self._failed_to_start(exc) from exc
                self._replace()
                if inst.outcome is not None:
                    # terminate() from another thread while the failed start was being
                    # ended: nothing more is rented for an instance that was ended.
                    raise InstanceError(
                        f"{self.label}: terminated while a rental that failed to start "
                        f"({inst.failed_rentals[-1].id}) was being replaced",
                        instance_id=inst.failed_rentals[-1].id) from exc
                if inst.failed_rentals[-1].deployment:
                    avoid.append(inst.failed_rentals[-1].deployment or "")
                log.warning("instance %s of %s did not start (%s); renting again",
                            inst.failed_rentals[-1].id, self.label, inst.failed_rentals[-1].status)

    def _replace(self) -> None:
        """End the instance that failed to start and forget it (listeners hear of it)."""
        inst = self.inst
        failed = FailedRental(id=inst.id or "", deployment=inst.details.get("deployment"),
                              region=inst.details.get("region"),
                              status=inst.status or "unknown")
        try:
            failed.outcome = inst._terminate_remote()
        except Exception as exc:
            failed.outcome = Outcome.TERMINATE_FAILED
            log.warning("could not end %s, which failed to start: %s", failed.id, exc)
        inst.failed_rentals.append(failed)
        inst._emit("replaced", failed)
        with inst._lock:
            inst.id, inst.status, inst.details = None, None, {}
            inst.deployment = self.target if is_uuid(self.target) else None

    def _failed_to_start(self, cause: InstanceError) -> InstanceError:
        inst = self.inst
        if not inst.failed_rentals:
            return cause  # rented once, as asked (init_retries 0)
        tried = ", ".join(f"{f.id} ({f.status})" for f in inst.failed_rentals)
        tried += f", {inst.id} ({inst.status or 'unknown'})"
        n = len(inst.failed_rentals) + 1
        return InstanceFailed(
            f"{self.label}: {n} rental{'s' if n > 1 else ''} failed to start: {tried}; "
            f"rented again {self.options.init_retries} time(s) (init_retries, "
            f"--rerobots-init-retries). The last: {cause}",
            instance_id=inst.id, status=inst.status,
        )

    def _rent(self, avoid: Sequence[str] = ()) -> None:
        inst = self.inst
        wds = self._others_than(avoid) if avoid and inst.deployment is None else None
        healthy = (self._healthy(avoid)
                   if inst.deployment is None and inst.unhealthy is not None else None)
        if healthy:
            # The healthy deployments first; if they are all busy, any (no wait for them).
            try:
                first = self._new(self.target, wds=healthy)
            except BusyWorkspaceDeployment:
                log.info("rerobots: %s: the deployments without recent trouble are busy; "
                         "renting any", self.label)
            else:
                if first.success:
                    self._rented(first.id)
                else:
                    self._follow_reservation(first.id, inst.deployment or "")
                return
        try:
            answer: NewInstance | None = self._new(self.target, wds=wds)
        except DeploymentNotFound as missing:
            raise self._not_found(missing) from None
        except BusyWorkspaceDeployment as busy:
            if self.options.queue_timeout <= 0:
                on = f" ({inst.deployment[:8]})" if inst.deployment else ""
                raise _explained(busy, (
                    f"{self.label}{on} is in use, perhaps still being released (the service "
                    "holds a robot for up to 2 minutes while it terminates); to wait for it: "
                    "queue_timeout (--rerobots-queue-timeout S, or the ini option "
                    "rerobots_queue_timeout; 0, as now, fails at once)"), sep=". ") from None
            answer = None
        if answer is None:
            # Busy: wait for any deployment of the type, the one that just failed
            # included. (It may only have lost the busy race; and the others may be held
            # by this very run, which cannot release them while this start waits.)
            self._wait_for_a_robot(None)
        elif answer.success:
            self._rented(answer.id)
        else:
            self._follow_reservation(answer.id, inst.deployment or "")

    def _not_found(self, missing: DeploymentNotFound) -> DeploymentNotFound:
        """The error for a workspace type (or deployment) the API does not know, with the
        valid types (``GET /workspaces``), the closest to ours first."""
        if is_uuid(self.target):
            return missing  # a deployment id: there is no list of them to suggest from
        try:
            types = self.client.workspace_types()
        except RerobotsError as exc:
            known = f"(the list of valid types is not available: {exc})"
        else:
            known = "valid types: " + (", ".join(closest_first(self.target, types)) or "none")
        return _explained(missing, (
            f"There is no workspace type {self.target!r}; {known}.\nChoose one in "
            "@pytest.mark.rerobots(...) or --rerobots-wtype (pytest --rerobots-list shows "
            "the types and their deployments)"))

    def _usable_deployments(self) -> list[str]:
        """The deployments of our type that are not locked out (ids only: a listing
        the server may have cached for minutes is not trusted for queue lengths)."""
        listing = self.client.deployments(types=[self.target], info=True)
        info = listing.get("info") or {}
        return [d for d in listing["workspace_deployments"]
                if isinstance(d, str) and not (info.get(d) or {}).get("lockout")]

    def _healthy(self, avoid: Sequence[str]) -> list[str] | None:
        """The type's usable deployments without recent trouble (the health record) and
        not in ``avoid``; None if the record names none of them or none would be left."""
        assert self.inst.unhealthy is not None
        try:
            bad = set(self.inst.unhealthy())
        except Exception as exc:  # the record is a favour
            log.warning("rerobots: cannot read the health record: %s", exc)
            return None
        if not bad:
            return None
        usable = [d for d in self._usable_deployments() if d not in avoid]
        healthy = [d for d in usable if d not in bad]
        if not healthy or len(healthy) == len(usable):
            return None
        log.info("rerobots: %s: avoiding deployments with recent trouble: %s", self.label,
                 ", ".join(sorted(d[:8] for d in bad if d in usable)))
        return healthy

    def _others_than(self, avoid: Sequence[str]) -> list[str] | None:
        """The type's usable deployments other than ``avoid``; None if there are none."""
        others = [d for d in self._usable_deployments() if d not in avoid]
        return others or None

    def _wait_for_a_robot(self, wds: Sequence[str] | None) -> None:
        """Every robot that could serve us is busy: wait, up to ``queue_timeout``.

        A deployment (pinned, or the only one of the type) is reserved: the server
        serves reservations in order when the robot is released. A type with several
        is polled, so that whichever robot frees first is taken.
        """
        inst = self.inst
        if inst.deployment is not None:
            candidates = [inst.deployment]
        else:
            candidates = list(wds) if wds else self._usable_deployments()
        if not candidates:
            raise BusyWorkspaceDeployment(f"no usable deployment of workspace type {self.label}")
        self._busy_hint()
        self._check_held_here(candidates)
        if len(candidates) == 1:
            answer = self._new(candidates[0], reserve=True)
            if answer.success:
                self._rented(answer.id)
            else:
                self._follow_reservation(answer.id, candidates[0])
            return
        self._poll_for_a_robot(candidates, wds)

    def _check_held_here(self, candidates: Sequence[str]) -> None:
        """Fail at once when every robot that could serve us is held by this very run for
        longer than this wait can last (:attr:`.Instance.held_here`); when they are held
        by it for a while only, or kept by this checkout, say so in the progress line."""
        inst = self.inst
        if inst.held_here is None:
            return
        try:
            found = inst.held_here(inst, candidates)
        except Exception as exc:  # a courtesy: never the reason a rental fails
            log.debug("held_here: %s", exc)
            return
        if found is None:
            return
        text, hopeless = found
        if hopeless:
            raise BusyWorkspaceDeployment(f"{self.label}: {text}")
        inst.busy_reason = text

    def _queue_pace(self, waited: float) -> float:
        """Seconds between looks at a queue: frugal against the real API (each look costs
        calls from the shared hourly budget), quick on a local simulator."""
        time_left = self.options.queue_timeout - waited
        base = poll_interval(waited, time_left, self.client.rate_limit, self.client.clock(),
                             self.options.fast_polling)
        return max(base, 0.1 if self.options.fast_polling else 5.0)

    def _poll_for_a_robot(self, candidates: Sequence[str], wds: Sequence[str] | None) -> None:
        inst = self.inst
        begun = time.monotonic()
        inst.status = "BUSY"
        try:
            while True:
                waited = time.monotonic() - begun
                if waited >= self.options.queue_timeout:
                    raise BusyWorkspaceDeployment(self._still_busy(waited))
                self._check_held_here(candidates)
                try:
                    # A fresh count, not the cached /deployments one.
                    lengths = self.client.queue_lengths(deployments=candidates)
                    inst.queue_position = min(
                        (int((v or {}).get("qlen") or 0) for v in lengths.values()), default=None)
                except RerobotsError as exc:
                    log.debug("GET /qlen: %s", exc)
                inst._emit("progress")
                inst._nap(min(self._queue_pace(waited),
                               max(0.0, self.options.queue_timeout - waited)))
                try:
                    answer = self._new(self.target, wds=wds)
                except BusyWorkspaceDeployment:
                    continue
                if answer.success:
                    self._rented(answer.id)
                    return
                self._follow_reservation(answer.id, inst.deployment or "")
                return
        finally:
            inst.timings.queued = time.monotonic() - begun
            inst.queue_position = None
            inst.busy_reason = None

    def _busy_hint(self) -> None:
        inst = self.inst
        hint = inst.hint_busy(inst) if inst.hint_busy is not None else None
        inst.busy_reason = hint

    def _still_busy(self, waited: float) -> str:
        inst = self.inst
        why = f" ({inst.busy_reason})" if inst.busy_reason else ""
        return (f"{self.label}: still busy after waiting {waited:.1f} s{why}; wait longer "
                f"with queue_timeout (--rerobots-queue-timeout S, now "
                f"{self.options.queue_timeout:g})")

    def _follow_reservation(self, rid: str, deployment: str) -> None:
        """Wait in the queue until reservation ``rid`` becomes the instance (same id).

        On the deadline the reservation is cancelled and ``BusyWorkspaceDeployment``
        raised; on any other way out (Ctrl-C included) it is cancelled and the
        original exception propagates.
        """
        inst = self.inst
        begun = time.monotonic()
        served: bool | None = False
        inst.status = "QUEUED"
        # The ledger and the watchdog hold the reservation too: served after this process
        # died, it would be an instance with no keepalive (the server gives none to an
        # instance made from a reservation), nobody's to end until its lease ran out.
        inst._emit("reserved", rid)
        try:
            while time.monotonic() - begun < self.options.queue_timeout:
                if not any(r.get("id") == rid for r in self.client.reservations()):
                    served = True
                    break
                if deployment:
                    self._check_held_here([deployment])
                    inst.queue_position = self.client.queue_length(deployment)
                inst._emit("progress")
                waited = time.monotonic() - begun
                inst._nap(min(self._queue_pace(waited),
                               max(0.05, self.options.queue_timeout - waited)))
        finally:
            if not served:
                served = self._cancel_reservation(rid)
            inst.timings.queued = time.monotonic() - begun
            inst.queue_position = None
            if served:
                # Also on the way out of a Ctrl-C: what was served must be ended.
                self._rented(rid)
            elif served is False:
                inst._emit("unreserved", rid)
        if not served:
            # Cancelled in time: nothing was rented after all (or, if the API did not
            # answer, the watchdog and the ledger still hold the reservation).
            fate = ("reservation cancelled" if served is False else
                    f"reservation {rid} could not be cancelled: the watchdog or "
                    "--rerobots-sweep ends it")
            raise BusyWorkspaceDeployment(
                f"{self._still_busy(time.monotonic() - begun)}; {fate}")

    def _cancel_reservation(self, rid: str) -> bool | None:
        """Cancel reservation ``rid``: False when cancelled, True if it turned out to be
        served already, None if the API did not say."""
        try:
            self.client.cancel_reservation(rid)
        except ReservationNotFound:
            # Served between the last look and now: the reservation is an instance.
            return True
        except RerobotsError as exc:
            # Still held by the ledger and the watchdog (no "unreserved" follows), which
            # cancel it, or end what it became, when this process is gone.
            log.warning("could not cancel reservation %s: %s", rid, exc)
            return None
        return False


    def _record(self, ident: str) -> None:
        """Make instance ``ident`` the instance's, recorded by the listeners (the ledger,
        the watchdog) and kept alive; once per id."""
        if self._recorded == ident:
            return
        inst = self.inst
        with inst._lock:
            inst.id = ident
            # terminate() from another thread before there was an id said "never rented";
            # or it ended a rental that failed to start while that was being replaced.
            # What the server made since must be ended all the same.
            if inst.outcome is not None:
                self._raced = True
                inst.outcome = None
            self._recorded = ident
        inst.status = "INIT"
        inst.busy_reason = None  # no longer waiting for a busy robot
        inst._rented_mono = time.monotonic()
        inst.timings.rented_at = time.time()
        inst._emit("rented")
        inst._keepalive.start()

    def _rented(self, ident: str) -> None:
        """The server made instance ``ident`` for us: it is the instance's now (to end)."""
        inst = self.inst
        self._record(ident)
        if self._raced:
            self._raced = False
            inst.terminate()
            raise InstanceError(f"instance {ident} was terminated while it was being rented",
                                instance_id=ident)

    def wait_ready(self) -> None:
        inst = self.inst
        assert inst.id is not None
        begun = time.monotonic()

        def poll() -> str:
            spent = rate_wait(self.client.rate_limit, self.client.clock())
            if spent is not None:
                # No call until the budget resets (the client would sleep there, silently
                # and past the ready timeout): the progress line shows the wait instead.
                inst.busy_reason = spent
                return "PENDING"
            if inst.busy_reason and inst.busy_reason.startswith("API rate limit spent"):
                inst.busy_reason = None
            try:
                info = self.client.instance(inst.id or "")
            except InstanceNotFound:
                # The real server inserts the row asynchronously after POST /new.
                if time.monotonic() - begun > self.options.notfound_grace:
                    raise
                return "PENDING"
            inst.details = info
            inst.status = info["status"]
            if inst.status in ENDED:
                raise InstanceFailed(
                    f"instance {inst.id} of {self.target} became {inst.status} before READY",
                    instance_id=inst.id, status=inst.status,
                )
            return inst.status

        opts = self.options

        def interval(state: tenacity.RetryCallState | None = None) -> float:
            waited = time.monotonic() - begun
            return poll_interval(waited, opts.ready_timeout - waited, self.client.rate_limit,
                                 self.client.clock(), opts.fast_polling)

        def shown(state: tenacity.RetryCallState) -> None:
            inst._emit("progress")

        policy = retry.polling(
            deadline=opts.ready_timeout, interval=interval, keep_going=lambda s: s != "READY",
            sleep=inst._nap, before_sleep=shown,
        )
        try:
            # Nothing is READY the instant POST /new answers: sleep before the first poll.
            inst._nap(interval())
            policy(poll)
        except tenacity.RetryError as exc:
            raise InstanceTimeout(
                f"instance {inst.id} of {self.target} not READY after {opts.ready_timeout:g} s "
                f"(last status: {inst.status or 'unknown'})",
                instance_id=inst.id, status=inst.status,
            ) from exc
        inst.timings.to_ready = time.monotonic() - begun
        inst.timings.ready_at = time.time()
        take_details(inst, inst.details)
        inst._emit("progress")  # the last word of the wait: READY


def take_details(inst: Instance, info: Mapping[str, Any]) -> None:
    """Write on ``inst`` where a READY instance is and how to log in (``info``, its
    ``GET /instance`` answer): type, deployment, region, host, port and host keys."""
    try:
        inst.wtype = info.get("type") or inst.wtype
        inst.deployment = info.get("deployment") or inst.deployment
        inst.region = info.get("region")
        fwd = info.get("fwd") or {}
        inst.host = str(fwd["ipv4"])
        inst.port = int(fwd["port"])
        inst.hostkeys = [str(k) for k in info["hostkeys"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedResponse(
            f"GET /instance/{inst.id}: READY but no usable fwd/hostkeys: {dict(info)!r}"[:400]
        ) from exc


class Keepalive:
    """Pings ``POST /instance/:id/ka`` for an instance, every ``keepalive_interval`` s,
    from a daemon thread, until :meth:`stop`. One thread pings whichever instance the
    :class:`~pytest_rerobots.instance.Instance` is now (a failed start's replacement
    included)."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return  # one thread pings whichever instance this is now (after a replacement)
        ident = self.inst.id or ""
        self._thread = threading.Thread(
            target=self._loop, name=f"rerobots-keepalive-{ident[:8]}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        inst = self.inst
        wait = inst.options.keepalive_interval
        while not self._stop.wait(wait):
            ident = inst.id
            if ident is None:
                continue  # between a failed start and its replacement
            try:
                inst.client.keepalive(ident)
                wait = inst.options.keepalive_interval
            except NotFound as exc:
                if inst.status == "READY" and ident == inst.id:
                    # An instance served from a reservation has no keepalive on the server
                    # (it is not the request that asked for it): nothing to ping. The
                    # lease, the watchdog and teardown still end it.
                    log.info("instance %s has no keepalive on the server (%s)", ident, exc)
                    return
                wait = min(5.0, inst.options.keepalive_interval)  # not listed yet
            except RerobotsError as exc:
                # One attempt per ping (a retried ping could outlast the server's
                # window); a failed one is tried again soon.
                log.warning("keepalive for %s failed: %s", inst.id, exc)
                wait = min(5.0, inst.options.keepalive_interval)

