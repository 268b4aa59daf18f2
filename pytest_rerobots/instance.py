"""``Instance``: one rented robot, from ``POST /new`` to terminated.

A context manager usable without pytest::

    with RerobotsClient() as api, api.acquire("basic_kobuki") as robot:
        robot.run("uname -a", check=True)

``__enter__`` rents, waits for READY, opens the firewall and connects SSH; if
any step fails after ``POST /new`` answered, the instance is terminated before
the error propagates (Ctrl-C included). ``__exit__`` and :meth:`terminate`
are idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import paramiko
import tenacity

from . import retry, ssh
from .errors import (
    BusyWorkspaceDeployment,
    BusyWorkspaceInstance,
    InstanceError,
    InstanceFailed,
    InstanceNotFound,
    InstanceTimeout,
    MalformedResponse,
    RerobotsError,
    ReservationNotFound,
)

if TYPE_CHECKING:
    from .client import RerobotsClient
    from .ssh import CommandResult

__all__ = [
    "ENDED_OUTCOMES",
    "Instance",
    "InstanceListener",
    "InstanceOptions",
    "Outcome",
    "Timings",
    "end",
    "is_deployment_id",
]

log = logging.getLogger("pytest_rerobots.instance")

ENDED = ("INIT_FAIL", "TERMINATING", "TERMINATED")


class Outcome(str, Enum):
    """How an instance's use ended (``Instance.outcome``); equal to its text."""

    TERMINATED = "terminated"
    ALREADY_ENDED = "already ended"
    NOT_FOUND = "not found"
    #: Left running for another process that uses it (xdist shared mode).
    HANDED_OVER = "handed over"
    #: ``POST /new`` never answered with an id: there is nothing to end.
    NEVER_RENTED = "never rented"
    #: The API did not confirm the end; ``Instance.failure`` says why.
    TERMINATE_FAILED = "terminate failed"

    def __str__(self) -> str:
        return self.value


#: Outcomes that mean the instance is over (anything else may still run).
ENDED_OUTCOMES = (Outcome.TERMINATED, Outcome.ALREADY_ENDED, Outcome.NOT_FOUND)


@dataclass(frozen=True)
class InstanceOptions:
    """How an :class:`Instance` is rented and held (seconds unless said otherwise).

    ``allow`` lists firewall sources (CIDR); empty means the address the API
    sees this runner at. ``fast_polling`` polls every 50 ms (a local simulator).
    """

    ready_timeout: float = 600.0
    queue_timeout: float = 0.0
    #: ``expire_d`` of ``POST /new``: the server ends the instance after this long.
    lease: int | None = 3600
    allow: tuple[str, ...] = ()
    keepalive_interval: float = 40.0
    notfound_grace: float = 30.0
    connect_timeout: float = 60.0
    terminate_timeout: float = 120.0
    connect: bool = True
    fast_polling: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(self.allow))

    def updated(self, **changes: Any) -> InstanceOptions:
        """A copy with ``changes``; an unknown name is a ``TypeError`` that lists the known."""
        unknown = sorted(set(changes) - _OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown instance option {unknown[0]!r} "
                            f"(known: {', '.join(sorted(_OPTION_NAMES))})")
        return replace(self, **changes) if changes else self


_OPTION_NAMES = frozenset(f.name for f in fields(InstanceOptions))
#: ``Instance`` keywords that are not options (see :meth:`Instance.build`).
_OWN_KEYWORDS = frozenset({"wtype", "pkey", "public_key", "listeners", "existing", "shared_key",
                           "known_ids", "sleep"})


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
                ended_now = client.terminate(instance_id)
            except InstanceNotFound:
                if time.monotonic() - begun < notfound_grace:
                    raise BusyWorkspaceInstance(
                        f"instance {instance_id} not visible yet", status=404) from None
                return Outcome.NOT_FOUND
    return Outcome.TERMINATED if ended_now else Outcome.ALREADY_ENDED


def _private_key(text: str) -> paramiko.PKey:
    """A private key from its text (PEM or OpenSSH format), read in memory."""
    import io

    for cls in (paramiko.RSAKey, paramiko.Ed25519Key, paramiko.ECDSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise MalformedResponse("GET /instance/:id/sshkey: not a private key paramiko can read")


def is_deployment_id(target: str) -> bool:
    """Whether ``target`` is a deployment id (a UUID) rather than a workspace type."""
    import uuid

    try:
        uuid.UUID(target)
    except ValueError:
        return False
    return len(target) == 36


class InstanceListener(Protocol):
    """Observes an instance's life; the pytest plugin, ledger and watchdog implement it."""

    def rented(self, instance: Instance) -> None:
        """``POST /new`` answered with this instance's id (before anything waits)."""

    def progress(self, instance: Instance) -> None:
        """A poll while waiting in a queue or for READY."""

    def ended(self, instance: Instance) -> None:
        """The instance is terminated (or found already ended); ``instance.outcome`` says how."""


@dataclass
class Timings:
    """Seconds spent at each stage, for reports."""

    queued: float = 0.0
    to_ready: float = 0.0
    held: float = 0.0
    ready_at: float | None = None


#: Seconds between status polls under ``fast_polling`` (a simulator, where calls are free).
FAST_POLL = 0.05


def poll_interval(waited: float, time_left: float, rate: Any, now: float,
                  fast: bool = False) -> float:
    """Seconds until the next status poll, ``waited`` s into a wait with ``time_left`` s.

    The real API's budget is 3600 calls an hour per token, shared by every job
    using it, so polls are frugal: at 0.25 s and 1 s (a quick host), then every
    2 s so that READY is noticed within 2 s. If the ``X-RateLimit-*`` budget
    (``rate``, keeping 20 calls for teardown) cannot pay for that until the wait
    ends or the window resets, polls are spread evenly over what is left.
    ``fast`` polls every 50 ms instead (the embedded simulator).
    """
    if fast:
        base = FAST_POLL
    else:
        base = 0.25 if waited < 0.25 else 0.75 if waited < 1.0 else 2.0
    if rate is not None and rate.reset > now:
        horizon = max(0.0, min(rate.reset - now, time_left))
        spare = rate.remaining - 20
        if spare * base < horizon:
            base = max(base, horizon / max(spare, 1))
    return base


@dataclass(eq=False)
class Instance:
    """A rented instance of a workspace type (or of one deployment).

    ``target`` is what ``POST /new`` names: a workspace type or a deployment id
    (then ``wtype`` may say its type). ``options`` say how it is rented and held.
    Attributes filled as it comes up: ``id``, ``deployment``, ``region``, ``host``,
    ``port``, ``hostkeys``, ``status``; ``timings`` and ``outcome`` (how it ended)
    for reports.

    Use it as a context manager, or call :meth:`start` and later :meth:`terminate`.
    """

    client: RerobotsClient
    target: str
    options: InstanceOptions = field(default_factory=InstanceOptions)
    wtype: str | None = None
    pkey: paramiko.PKey | None = field(default=None, repr=False)
    public_key: str | None = field(default=None, repr=False)
    listeners: Iterable[InstanceListener] = field(default=(), repr=False)
    #: The id of an instance another process rented, to attach to instead of renting.
    existing: str | None = None
    #: (directory, key) of a :class:`~.share.SharedPool` entry when shared by xdist workers.
    shared_key: tuple[str, str] | None = None
    known_ids: Callable[[], Iterable[str]] | None = field(default=None, repr=False)
    sleep: retry.Sleep = field(default=time.sleep, repr=False)

    id: str | None = field(default=None, init=False)
    deployment: str | None = field(default=None, init=False)
    region: str | None = field(default=None, init=False)
    host: str | None = field(default=None, init=False)
    port: int | None = field(default=None, init=False)
    hostkeys: list[str] = field(default_factory=list, init=False)
    status: str | None = field(default=None, init=False)
    queue_position: int | None = field(default=None, init=False)
    outcome: Outcome | None = field(default=None, init=False)
    #: Why the end failed, when ``outcome`` is ``Outcome.TERMINATE_FAILED``.
    failure: str | None = field(default=None, init=False)
    timings: Timings = field(default_factory=Timings, init=False)
    details: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _connection: ssh.Connection | None = field(default=None, init=False, repr=False)
    _stop_keepalive: threading.Event = field(default_factory=threading.Event, init=False,
                                             repr=False)
    _keepalive: threading.Thread | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)
    _up: bool = field(default=False, init=False, repr=False)
    _ending: bool = field(default=False, init=False, repr=False)
    _rented_mono: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.listeners = list(self.listeners)
        if isinstance(self.options, Mapping):  # a plain dict of settings is welcome too
            self.options = InstanceOptions().updated(**self.options)
        if is_deployment_id(self.target):
            self.deployment = self.target
        elif self.wtype is None:
            self.wtype = self.target

    def __repr__(self) -> str:
        return (f"Instance(id={self.id!r}, wtype={self.wtype!r}, deployment={self.deployment!r}, "
                f"status={self.status!r})")

    @property
    def label(self) -> str:
        """What to call it in messages: its workspace type, else what was asked for."""
        return self.wtype or self.target

    # -- context manager ------------------------------------------------------

    def __enter__(self) -> Instance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.end()

    def start(self) -> Instance:
        """Rent, wait for READY, open the firewall and connect; returns ``self``.

        If any step fails (Ctrl-C included), whatever was rented is ended before
        the error propagates. Calling it again on a started instance does nothing,
        so ``with run.acquire(...) as robot`` does not start twice.
        """
        if self._up:
            return self
        try:
            self._bring_up()
        except BaseException as exc:
            # Half-started: what was rented is ended first; an instance attached to is
            # someone else's, so it is only left.
            try:
                self.end()
            except Exception as cleanup:
                # The first error is the one the user needs; the second one is logged.
                log.error("while cleaning up after %r: %s", exc, cleanup)
            raise
        self._up = True
        return self

    def end(self) -> None:
        """Terminate it, or leave it to its owner if it was attached to (``existing``)."""
        if self.existing is not None:
            self.detach()
        else:
            self.terminate()

    @classmethod
    def build(cls, client: RerobotsClient, target: str,
              defaults: InstanceOptions | None = None, **settings: Any) -> Instance:
        """An unstarted instance: ``settings`` name :class:`InstanceOptions` fields (over
        ``defaults``) or this class's own keywords (``wtype``, ``existing``, ``sleep``...)."""
        own = {k: settings.pop(k) for k in list(settings) if k in _OWN_KEYWORDS}
        return cls(client, target, (defaults or InstanceOptions()).updated(**settings), **own)

    def _bring_up(self) -> None:
        self._started = time.monotonic()
        if self.existing is not None:
            self._attach(self.existing)
            return
        if self.pkey is None:
            self.pkey, self.public_key = ssh.generate_client_key()
        elif self.public_key is None:
            self.public_key = f"{self.pkey.get_name()} {self.pkey.get_base64()}"
        self._rent()
        self._wait_ready()
        self._open_firewall()
        if self.options.connect:
            self._connect()

    def _attach(self, ident: str) -> None:
        """Use an instance another process rented (``existing``): log in with the key
        the server generated for it (``GET /instance/:id/sshkey``, kept in memory)."""
        self.id = ident
        self.status = "INIT"
        # Listeners learn of it as of a rented one (this process now helps hold it).
        self._emit("rented")
        self._start_keepalive()
        self._wait_ready()
        if self.options.connect:
            if self.pkey is None:
                self.pkey = _private_key(self.client.instance_sshkey(ident))
            self._connect()

    # -- steps ----------------------------------------------------------------

    def _new(self, target: str, *, reserve: bool | None = None) -> Any:
        sent_at = self.client.clock()
        try:
            return self.client.new_instance(
                target, sshkey=self.public_key, expire_d=self.options.lease, keepalive=True,
                reserve=reserve, known_ids=self._known_ids,
            )
        except KeyboardInterrupt:
            # Ctrl-C while POST /new was in flight: the server may have acted. One quick
            # look, so that what it made is ended now, not a keepalive window later.
            self._claim_interrupted_new(target, sent_at)
            raise

    def _claim_interrupted_new(self, target: str, sent_at: float) -> None:
        try:
            found = self.client.find_new_instance(target, sent_at, self._known_ids)
        except Exception as exc:  # nothing may replace the KeyboardInterrupt
            log.warning("after Ctrl-C during POST /new/%s: %s", target, exc)
            return
        if found is not None:
            log.warning("Ctrl-C during POST /new/%s: it made %s, which is ended now", target,
                        found)
            self._rented(found)

    def _known_ids(self) -> list[str]:
        """Instances that cannot be the answer to a lost POST /new of ours."""
        known = [i for i in (self.id,) if i]
        if self.known_ids is not None:
            known.extend(self.known_ids())
        return known

    def _rent(self) -> None:
        try:
            answer = self._new(self.target)
        except BusyWorkspaceDeployment:
            if self.options.queue_timeout <= 0:
                raise
            answer = None
        if answer is not None and answer.success:
            self._rented(answer.id)
            return
        if answer is None:
            deployment = self.deployment or self._shortest_queue()
            answer = self._new(deployment, reserve=True)
            if answer.success:
                self._rented(answer.id)
                return
        self._follow_reservation(answer.id)

    def _shortest_queue(self) -> str:
        """The usable deployment of our type with the shortest queue (to reserve on)."""
        listing = self.client.deployments(types=[self.target], info=True)
        info = listing.get("info") or {}
        ids = [d for d in listing["workspace_deployments"]
               if isinstance(d, str) and not (info.get(d) or {}).get("lockout")]
        if not ids:
            raise BusyWorkspaceDeployment(f"no usable deployment of workspace type {self.target!r}")
        return min(ids, key=lambda d: (info.get(d) or {}).get("queuelen", 0))

    def _follow_reservation(self, rid: str) -> None:
        """Wait in the queue until reservation ``rid`` becomes the instance (same id).

        On the deadline the reservation is cancelled and ``BusyWorkspaceDeployment``
        raised; on any other way out (Ctrl-C included) it is cancelled and the
        original exception propagates.
        """
        begun = time.monotonic()
        served = False
        try:
            while time.monotonic() - begun < self.options.queue_timeout:
                if not any(r.get("id") == rid for r in self.client.reservations()):
                    served = True
                    break
                if self.deployment:
                    self.queue_position = self.client.queue_length(self.deployment)
                self.status = "QUEUED"
                self._emit("progress")
                self.sleep(min(2.0, max(0.1, self.options.queue_timeout / 20)))
        finally:
            if not served:
                served = self._cancel_reservation(rid)
            self.timings.queued = time.monotonic() - begun
            self.queue_position = None
            if served:
                # Also on the way out of a Ctrl-C: what was served must be ended.
                self._rented(rid)
        if not served:
            # Cancelled in time: nothing was rented after all.
            raise BusyWorkspaceDeployment(
                f"{self.target}: still queued after {self.options.queue_timeout:g} s "
                "(--rerobots-queue-timeout); reservation cancelled"
            )

    def _cancel_reservation(self, rid: str) -> bool:
        """Cancel reservation ``rid``; True if it turned out to be served already."""
        try:
            self.client.cancel_reservation(rid)
        except ReservationNotFound:
            # Served between the last look and now: the reservation is an instance.
            return True
        except RerobotsError as exc:
            # Should it be served later, it carries keepalive: the server ends it
            # within its keepalive window, as nobody pings it.
            log.warning("could not cancel reservation %s: %s", rid, exc)
        return False

    def _rented(self, ident: str) -> None:
        with self._lock:
            self.id = ident
            # terminate() from another thread before there was an id said "never rented":
            # what the server made since must be ended all the same.
            raced = self.outcome == Outcome.NEVER_RENTED
            if raced:
                self.outcome = None
        self.status = "INIT"
        self._rented_mono = time.monotonic()
        self._emit("rented")
        self._start_keepalive()
        if raced:
            self.terminate()
            raise InstanceError(f"instance {ident} was terminated while it was being rented",
                                instance_id=ident)

    def _start_keepalive(self) -> None:
        ident = self.id or ""
        self._keepalive = threading.Thread(
            target=self._keepalive_loop, name=f"rerobots-keepalive-{ident[:8]}", daemon=True
        )
        self._keepalive.start()

    def _keepalive_loop(self) -> None:
        wait = self.options.keepalive_interval
        while not self._stop_keepalive.wait(wait):
            try:
                self.client.keepalive(self.id or "")
                wait = self.options.keepalive_interval
            except RerobotsError as exc:
                # One attempt per ping (a retried ping could outlast the server's
                # window); a failed one is tried again soon.
                log.warning("keepalive for %s failed: %s", self.id, exc)
                wait = min(5.0, self.options.keepalive_interval)

    def _wait_ready(self) -> None:
        assert self.id is not None
        begun = time.monotonic()

        def poll() -> str:
            try:
                info = self.client.instance(self.id or "")
            except InstanceNotFound:
                # The real server inserts the row asynchronously after POST /new.
                if time.monotonic() - begun > self.options.notfound_grace:
                    raise
                return "PENDING"
            self.details = info
            self.status = info["status"]
            if self.status in ENDED:
                raise InstanceFailed(
                    f"instance {self.id} of {self.target} became {self.status} before READY",
                    instance_id=self.id, status=self.status,
                )
            return self.status

        opts = self.options

        def interval(state: tenacity.RetryCallState | None = None) -> float:
            waited = time.monotonic() - begun
            return poll_interval(waited, opts.ready_timeout - waited, self.client.rate_limit,
                                 self.client.clock(), opts.fast_polling)

        def shown(state: tenacity.RetryCallState) -> None:
            self._emit("progress")

        policy = retry.polling(
            deadline=opts.ready_timeout, interval=interval, keep_going=lambda s: s != "READY",
            sleep=self.sleep, before_sleep=shown,
        )
        try:
            # Nothing is READY the instant POST /new answers: sleep before the first poll.
            self.sleep(interval())
            policy(poll)
        except tenacity.RetryError as exc:
            raise InstanceTimeout(
                f"instance {self.id} of {self.target} not READY after {opts.ready_timeout:g} s "
                f"(last status: {self.status or 'unknown'})",
                instance_id=self.id, status=self.status,
            ) from exc
        self.timings.to_ready = time.monotonic() - begun
        self.timings.ready_at = time.time()
        self._take_details(self.details)
        self._emit("progress")  # the last word of the wait: READY

    def _take_details(self, info: Mapping[str, Any]) -> None:
        try:
            self.wtype = info.get("type") or self.wtype
            self.deployment = info.get("deployment") or self.deployment
            self.region = info.get("region")
            fwd = info.get("fwd") or {}
            self.host = str(fwd["ipv4"])
            self.port = int(fwd["port"])
            self.hostkeys = [str(k) for k in info["hostkeys"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedResponse(
                f"GET /instance/{self.id}: READY but no usable fwd/hostkeys: {dict(info)!r}"[:400]
            ) from exc

    def _open_firewall(self) -> None:
        assert self.id is not None
        if not self.options.allow:
            self.client.add_firewall_rule(self.id)
        for cidr in self.options.allow:
            self.client.add_firewall_rule(self.id, src=cidr)

    def _connect(self) -> None:
        assert self.host is not None and self.port is not None and self.pkey is not None
        client = ssh.connect(
            self.host, self.port, hostkeys=self.hostkeys, pkey=self.pkey,
            deadline=self.options.connect_timeout, sleep=self.sleep,
        )
        self._connection = ssh.Connection(client)

    # -- using it -------------------------------------------------------------

    def ensure_connected(self) -> None:
        """Reconnect if the SSH connection was lost (e.g. a test closed it or the host
        dropped it), so the next user of a shared instance gets a live one."""
        if not self.options.connect or self.host is None or self.outcome is not None:
            return
        conn = self._connection
        if conn is not None:
            transport = conn.client.get_transport()
            if not conn.closed and transport is not None and transport.is_active():
                return
            self._connection = None
            conn.close()
        self._connect()

    @property
    def connection(self) -> ssh.Connection:
        if self._connection is None:
            raise RerobotsError(f"instance {self.id} has no SSH connection")
        return self._connection

    @property
    def ssh(self) -> paramiko.SSHClient:
        """The paramiko ``SSHClient``, logged in as root."""
        return self.connection.client

    @property
    def sftp(self) -> paramiko.SFTPClient:
        """One SFTP session on that connection, opened on first use."""
        return self.connection.sftp

    def run(self, command: str, timeout: float | None = None, check: bool = False,
            stdin: bytes | str | None = None) -> CommandResult:
        """Run ``command`` through the host's shell (see :meth:`.ssh.Connection.run`)."""
        return self.connection.run(command, timeout=timeout, check=check, stdin=stdin)

    def put(self, local: str, remote: str) -> None:
        """Copy a local file to the host over SFTP."""
        self.connection.put(local, remote)

    def get(self, remote: str, local: str) -> None:
        """Copy a file from the host over SFTP."""
        self.connection.get(remote, local)

    # -- the end --------------------------------------------------------------

    def terminate(self) -> None:
        """End the instance: close SSH, terminate (waiting out INIT), stop keepalive.

        Idempotent and safe from ``finally`` blocks and other threads. If it is
        interrupted (Ctrl-C) before the API confirmed the end, the instance keeps
        its keepalive and a later call tries again.
        """
        if not self._claim():
            return
        try:
            self._close_connection()
            if self.id is None:
                self.outcome = Outcome.NEVER_RENTED
                return
            try:
                self.outcome = self._terminate_remote()
            except Exception as exc:
                self.outcome, self.failure = Outcome.TERMINATE_FAILED, str(exc)
                raise
        finally:
            self._finish()

    def detach(self) -> None:
        """Stop using the instance without ending it (another process will): close SSH
        and stop this process's keepalive. Listeners see the outcome "handed over"."""
        if not self._claim():
            return
        try:
            self._close_connection()
            self.outcome = Outcome.HANDED_OVER
        finally:
            self._finish()

    def _claim(self) -> bool:
        """Whether this caller is the one to end (or leave) the instance now."""
        with self._lock:
            if self.outcome is not None or self._ending:
                return False
            self._ending = True
            return True

    def _close_connection(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            conn.close()

    def _finish(self) -> None:
        self._ending = False
        if self.outcome is None:
            return  # interrupted: still ours, still kept alive
        self._stop_keepalive.set()
        if self.timings.ready_at is not None:
            self.timings.held = time.time() - self.timings.ready_at
        self._emit("ended")

    def _terminate_remote(self) -> Outcome:
        assert self.id is not None
        # The server may not list it yet for a while after POST /new answered.
        since_rent = time.monotonic() - (self._rented_mono or self._started)
        opts = self.options
        return end(self.client, self.id, deadline=opts.terminate_timeout,
                   notfound_grace=max(0.0, opts.notfound_grace - since_rent), sleep=self.sleep)

    def _emit(self, event: str) -> None:
        for listener in self.listeners:
            try:
                getattr(listener, event)(self)
            except Exception:  # a reporting bug must never stop a terminate
                log.exception("listener %r failed on %s", listener, event)
