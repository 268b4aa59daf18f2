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

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import paramiko
import tenacity

from . import retry, ssh
from .ending import end
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
    SSHConnectError,
    UnreadableNewAnswer,
)
from .fleet import Aborted, end_all, start_all
from .outcome import ENDED_OUTCOMES, Outcome
from .ssh import DEFAULT as DEFAULT_TIMEOUT
from .ssh import Timeout
from .transcript import Transcript
from .wire import is_uuid

if TYPE_CHECKING:
    from . import live
    from .client import NewInstance, RerobotsClient
    from .ssh import CommandResult

# Aborted, end_all and start_all are fleet's; named here too, where the code that starts
# instances has always found them.
__all__ = [
    "ENDED_OUTCOMES",
    "Aborted",
    "FailedRental",
    "Instance",
    "InstanceListener",
    "InstanceOptions",
    "Outcome",
    "Timings",
    "end",
    "end_all",
    "start_all",
]

log = logging.getLogger("pytest_rerobots.instance")

ENDED = ("INIT_FAIL", "TERMINATING", "TERMINATED")


@dataclass(frozen=True)
class InstanceOptions:
    """How an :class:`Instance` is rented and held (seconds unless said otherwise).

    ``allow`` lists firewall sources (CIDR); empty means the address the API
    sees this runner at. ``fast_polling`` polls every 50 ms (a local simulator).
    """

    ready_timeout: float = 600.0
    #: How long to wait for a busy robot (in a queue, or still being released); 0 fails
    #: at once.
    queue_timeout: float = 600.0
    #: How many times an instance that failed to start (INIT_FAIL, or INIT past the
    #: ready timeout) is replaced by a new rental.
    init_retries: int = 2
    #: ``expire_d`` of ``POST /new``: the server ends the instance after this long.
    lease: int | None = 3600
    allow: tuple[str, ...] = ()
    keepalive_interval: float = 40.0
    notfound_grace: float = 30.0
    connect_timeout: float = 60.0
    terminate_timeout: float = 120.0
    #: The timeout of a ``run`` that names none; ``None`` waits for ever.
    command_timeout: float | None = ssh.DEFAULT_COMMAND_TIMEOUT
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
                           "known_ids", "hint_busy", "sleep", "transcript", "kept_record",
                           "private_key_text", "keep_hook"})

#: Seconds to log in to a kept instance and run ``true`` on it before it counts as
#: unusable (a run then rents another).
KEPT_CHECK_TIMEOUT = 10.0


def _private_key(text: str) -> paramiko.PKey:
    """A private key from its text (PEM or OpenSSH format), read in memory."""
    import io

    for cls in (paramiko.RSAKey, paramiko.Ed25519Key, paramiko.ECDSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    raise MalformedResponse("GET /instance/:id/sshkey: not a private key paramiko can read")


_E = TypeVar("_E", bound=APIError)


def _explained(error: _E, hint: str, sep: str = "\n") -> _E:
    """A copy of the API error ``error`` whose message goes on with ``hint``."""
    again = type(error)(error.message, status=error.status, payload=error.payload,
                        method=error.method, path=error.path)
    again.args = (f"{error}{sep}{hint}",)
    return again


class InstanceListener(Protocol):
    """Observes an instance's life; the pytest plugin, ledger and watchdog implement it."""

    def rented(self, instance: Instance) -> None:
        """``POST /new`` answered with this instance's id (before anything waits)."""

    def progress(self, instance: Instance) -> None:
        """A poll while waiting in a queue or for READY."""

    def ended(self, instance: Instance) -> None:
        """The instance is terminated (or found already ended); ``instance.outcome`` says how."""

    def replaced(self, instance: Instance, failed: FailedRental) -> None:
        """A rental failed to start and was ended (``failed.outcome``); another follows."""

    def reserved(self, instance: Instance, reservation: str) -> None:
        """Waiting in a queue with ``reservation`` (its id becomes the instance's)."""

    def unreserved(self, instance: Instance, reservation: str) -> None:
        """The reservation was cancelled: nothing was rented."""


@dataclass
class FailedRental:
    """An instance rented for an :class:`Instance` that never became READY, and ended."""

    id: str
    deployment: str | None
    region: str | None
    #: The last status seen: INIT_FAIL, or INIT (or unknown) past the ready timeout.
    status: str
    outcome: Outcome | None = None


@dataclass
class Timings:
    """Seconds spent at each stage, for reports."""

    queued: float = 0.0
    to_ready: float = 0.0
    held: float = 0.0
    ready_at: float | None = None
    ended_at: float | None = None


#: Seconds spent looking for what a ``POST /new`` interrupted by Ctrl-C made.
INTERRUPTED_NEW_LOOKS = 3.0

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
        if spare <= 0:
            # Spent (or down to the teardown's share): wait for the reset in steps, so that
            # the progress line says so and the ready timeout still bounds the wait.
            return max(FAST_POLL, min(horizon, RATE_STEP))
        if spare * base < horizon:
            base = max(base, horizon / max(spare, 1))
    return base


#: The longest single sleep while the rate-limit budget is spent.
RATE_STEP = 5.0


def rate_wait(rate: Any, now: float) -> str | None:
    """What the progress line says while the budget is spent (``Remaining: 0`` with a
    ``Reset`` to come), or None while there is budget."""
    if rate is None or rate.remaining > 0 or rate.reset <= now:
        return None
    at = time.strftime("%H:%M:%S", time.gmtime(rate.reset))
    return f"API rate limit spent: waiting for its reset at {at} UTC, in {rate.reset - now:.0f} s"


def _source_address(host: str, port: int) -> str | None:
    """The local address this machine sends from to ``host`` (a UDP socket's choice of
    route; no packet is sent), or None. Behind NAT the robot sees another one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
    except OSError:
        return None


def firewall_hint(allow: Sequence[str], source: str | None) -> str | None:
    """What to say when SSH could not connect while the firewall rules (``--rerobots-allow``)
    admit none of this runner's addresses; None when no rule was given or one admits it."""
    if not allow or source is None:
        return None
    try:
        address = ipaddress.IPv4Address(source)
    except ValueError:
        return None
    if any(address in ipaddress.IPv4Network(block, strict=False) for block in allow):
        return None
    return (f"the instance's firewall admits only {', '.join(allow)} (--rerobots-allow), "
            f"which excludes this runner's address {source}: add it, or drop the option "
            "to admit the address the API sees this runner at")


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
    #: Says why our robot may be busy (e.g. "this run is still releasing ..."), for the
    #: progress line and the error after the queue timeout.
    hint_busy: Callable[[Instance], str | None] | None = field(default=None, repr=False)
    sleep: retry.Sleep = field(default=time.sleep, repr=False)
    #: Where its connection records the commands and transfers of tests (a run's).
    transcript: Transcript | None = field(default=None, repr=False)
    #: The record of an instance an earlier run kept (``pytest_rerobots.keep``): start()
    #: attaches to it (no ``POST /new``, no READY wait) with ``private_key_text``.
    kept_record: Mapping[str, Any] | None = field(default=None, repr=False)
    #: The login key's OpenSSH text, in memory (written only when the instance is kept).
    private_key_text: str | None = field(default=None, repr=False)
    #: Called by :meth:`end` for an instance marked with ``keep_for``: hands it to a
    #: keeper and returns True, or False to terminate it after all.
    keep_hook: Callable[[Instance], bool] | None = field(default=None, repr=False)

    id: str | None = field(default=None, init=False)
    deployment: str | None = field(default=None, init=False)
    region: str | None = field(default=None, init=False)
    host: str | None = field(default=None, init=False)
    port: int | None = field(default=None, init=False)
    hostkeys: list[str] = field(default_factory=list, init=False)
    status: str | None = field(default=None, init=False)
    queue_position: int | None = field(default=None, init=False)
    #: Why we wait for a busy robot, when known.
    busy_reason: str | None = field(default=None, init=False)
    #: Rentals that failed to start and were replaced, oldest first.
    failed_rentals: list[FailedRental] = field(default_factory=list, init=False)
    outcome: Outcome | None = field(default=None, init=False)
    #: Why the end failed, when ``outcome`` is ``Outcome.TERMINATE_FAILED``.
    failure: str | None = field(default=None, init=False)
    timings: Timings = field(default_factory=Timings, init=False)
    details: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    #: Why to keep it instead of terminating it at its end ("failure" or "reuse"), if so.
    keep_for: str | None = field(default=None, init=False)
    #: Whether it was attached to from an earlier run's kept record (and found usable).
    reused: bool = field(default=False, init=False)
    #: What the keeper wrote when it was kept (``pytest_rerobots.keep``).
    kept: dict[str, Any] | None = field(default=None, init=False, repr=False)
    #: How many times its connection was used (commands, transfers, ``ssh``/``sftp``).
    uses: int = field(default=0, init=False, repr=False)
    _connection: ssh.Connection | None = field(default=None, init=False, repr=False)
    _stop_keepalive: threading.Event = field(default_factory=threading.Event, init=False,
                                             repr=False)
    _keepalive: threading.Thread | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)
    _up: bool = field(default=False, init=False, repr=False)
    _ending: bool = field(default=False, init=False, repr=False)
    _rented_mono: float = field(default=0.0, init=False, repr=False)
    #: Set by whoever starts several instances at once, to stop this one's start.
    _abort: threading.Event | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.listeners = list(self.listeners)
        if isinstance(self.options, Mapping):  # a plain dict of settings is welcome too
            self.options = InstanceOptions().updated(**self.options)
        if is_uuid(self.target):
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

    def start(self, *, abort: threading.Event | None = None) -> Instance:
        """Rent, wait for READY, open the firewall and connect; returns ``self``.

        If any step fails (Ctrl-C included), whatever was rented is ended before
        the error propagates. Calling it again on a started instance does nothing,
        so ``with run.acquire(...) as robot`` does not start twice. Setting ``abort``
        (from another thread) calls the start off: it ends what it rented and raises
        :class:`Aborted`.
        """
        if self._up:
            return self
        if abort is not None:
            self._abort = abort
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
        """Terminate it, or leave it to its owner if it was attached to (``existing``), or
        hand it to a keeper if it is marked ``keep_for`` (and was up)."""
        if self.existing is not None:
            self.detach()
            return
        if (self.keep_for is not None and self._up and self.outcome is None
                and self.keep_hook is not None):
            try:
                if self.keep_hook(self):
                    return
            except Exception as exc:  # keeping is a favour; ending is the duty
                log.warning("could not keep instance %s (%s): terminating it", self.id, exc)
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
        if self.kept_record is not None:
            self._attach_kept(self.kept_record)
            return
        if self.pkey is None:
            self.pkey, self.public_key, self.private_key_text = ssh.generate_client_key_text()
        elif self.public_key is None:
            self.public_key = f"{self.pkey.get_name()} {self.pkey.get_base64()}"
        self._rent_until_ready()
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

    def _attach_kept(self, record: Mapping[str, Any]) -> None:
        """Use an instance an earlier run kept: one ``GET /instance`` (it must be READY),
        then log in with the key it was kept with and run ``true``. No ``POST /new`` and
        no READY wait; anything wrong raises, and start() ends it (it is ours)."""
        ident = str(record["id"])
        self.id = ident
        self._rented_mono = time.monotonic()
        if self.private_key_text:
            self.pkey = _private_key(self.private_key_text)
        info = self.client.instance(ident)
        self.details = info
        self.status = str(info.get("status"))
        self._emit("rented")  # the ledger and the watchdog hold it for this run now
        self._start_keepalive()
        if self.status != "READY":
            raise InstanceFailed(f"kept instance {ident} of {self.label} is {self.status}, "
                                 "not READY", instance_id=ident, status=self.status)
        self._take_details(info)
        self.timings.ready_at = time.time()
        if not self.options.connect:
            return
        if self.pkey is None:
            raise InstanceError(f"kept instance {ident}: no login key", instance_id=ident)
        assert self.host is not None and self.port is not None
        client = ssh.connect(self.host, self.port, hostkeys=self.hostkeys, pkey=self.pkey,
                             deadline=min(self.options.connect_timeout, KEPT_CHECK_TIMEOUT),
                             sleep=self._nap)
        conn = self._connection = self._wrap(client)
        conn.transcript = None  # (the check is no test's doing)
        result = conn.run("true", timeout=KEPT_CHECK_TIMEOUT)
        conn.transcript = self.transcript
        if result.exit_status != 0:
            raise InstanceFailed(f"kept instance {ident}: `true` exited {result.exit_status}",
                                 instance_id=ident, status=self.status)
        self.reused = True

    # -- steps ----------------------------------------------------------------

    def _new(self, target: str, *, reserve: bool | None = None,
             wds: Sequence[str] | None = None) -> NewInstance:
        """``POST /new``; a 5xx that reconciliation showed created nothing is sent again
        a few times with backoff (never blindly: the client looked first)."""
        first_sent = self.client.clock()
        for attempt in retry.renting(fast=self.options.fast_polling, sleep=self._nap):
            with attempt:
                if attempt.retry_state.attempt_number > 1 and not reserve:
                    # One more look first: the server lists what it made only after its
                    # 404 window, which may outlast the client's own looks.
                    found = self.client.find_new_instance(target, first_sent, self._known_ids)
                    if found is not None:
                        from .client import NewInstance

                        return NewInstance(success=True, id=found, reconciled=True)
                return self._new_once(target, reserve=reserve, wds=wds)
        raise AssertionError("unreachable")  # pragma: no cover (reraise=True)

    def _new_once(self, target: str, *, reserve: bool | None,
                  wds: Sequence[str] | None) -> NewInstance:
        sent_at = self.client.clock()
        try:
            return self.client.new_instance(
                target, sshkey=self.public_key, expire_d=self.options.lease, keepalive=True,
                reserve=reserve, wds=wds, known_ids=self._known_ids,
            )
        except UnreadableNewAnswer as unreadable:
            # The server acted on it but its answer cannot be read: what reconciliation
            # found is this instance's now, so that start() ends it at once (and the
            # summary says it was rented and terminated, not "never rented").
            if unreadable.made is not None:
                self._rented(unreadable.made)
            raise
        except KeyboardInterrupt:
            # Ctrl-C while POST /new was in flight: the server may have acted. A quick
            # look, so that what it made is ended now, not a keepalive window later.
            # (Not for a reservation: what GET /instances lists then is the robot's
            # current holder, perhaps another job on the same token.)
            if not reserve:
                self._claim_interrupted_new(target, sent_at)
            raise

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
                time.sleep(0.25)  # (not self.sleep: an injected one may interrupt again)
        if found is not None:
            log.warning("Ctrl-C during POST /new/%s: it made %s, which is ended now", target,
                        found)
            self._rented(found)

    def _known_ids(self) -> list[str]:
        """Instances that cannot be the answer to a lost POST /new of ours."""
        known = [i for i in (self.id, *(f.id for f in self.failed_rentals)) if i]
        if self.known_ids is not None:
            known.extend(self.known_ids())
        return known

    # -- renting, and renting again after a failed start ----------------------

    def _rent_until_ready(self) -> None:
        """Rent and wait for READY; an instance that ends INIT_FAIL (or stays INIT past
        the ready timeout) is ended and replaced, up to ``init_retries`` times, avoiding
        the deployments that just failed where the type has others."""
        avoid: list[str] = []
        for attempt in range(self.options.init_retries + 1):
            self._rent(avoid)
            try:
                self._wait_ready()
                return
            except (InstanceFailed, InstanceTimeout) as exc:
                if isinstance(exc, InstanceFailed) and self.status != "INIT_FAIL":
                    raise  # ended by someone (TERMINATING/TERMINATED): not a failed start
                if attempt == self.options.init_retries:
                    # This one stays the instance's own: start() ends it.
                    raise self._failed_to_start(exc) from exc
                self._replace()
                if self.failed_rentals[-1].deployment:
                    avoid.append(self.failed_rentals[-1].deployment or "")
                log.warning("instance %s of %s did not start (%s); renting again",
                            self.failed_rentals[-1].id, self.label, self.failed_rentals[-1].status)

    def _replace(self) -> None:
        """End the instance that failed to start and forget it (listeners hear of it)."""
        failed = FailedRental(id=self.id or "", deployment=self.details.get("deployment"),
                              region=self.details.get("region"),
                              status=self.status or "unknown")
        try:
            failed.outcome = self._terminate_remote()
        except Exception as exc:
            failed.outcome = Outcome.TERMINATE_FAILED
            log.warning("could not end %s, which failed to start: %s", failed.id, exc)
        self.failed_rentals.append(failed)
        self._emit("replaced", failed)
        with self._lock:
            self.id, self.status, self.details = None, None, {}
            self.deployment = self.target if is_uuid(self.target) else None

    def _failed_to_start(self, cause: InstanceError) -> InstanceError:
        if not self.failed_rentals:
            return cause  # rented once, as asked (init_retries 0)
        tried = ", ".join(f"{f.id} ({f.status})" for f in self.failed_rentals)
        tried += f", {self.id} ({self.status or 'unknown'})"
        n = len(self.failed_rentals) + 1
        return InstanceFailed(
            f"{self.label}: {n} rental{'s' if n > 1 else ''} failed to start: {tried}; "
            f"rented again {self.options.init_retries} time(s) (init_retries, "
            f"--rerobots-init-retries). The last: {cause}",
            instance_id=self.id, status=self.status,
        )

    def _rent(self, avoid: Sequence[str] = ()) -> None:
        wds = self._others_than(avoid) if avoid and self.deployment is None else None
        try:
            answer: NewInstance | None = self._new(self.target, wds=wds)
        except DeploymentNotFound as missing:
            raise self._not_found(missing) from None
        except BusyWorkspaceDeployment as busy:
            if self.options.queue_timeout <= 0:
                on = f" ({self.deployment[:8]})" if self.deployment else ""
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
            self._follow_reservation(answer.id, self.deployment or "")

    def _not_found(self, missing: DeploymentNotFound) -> DeploymentNotFound:
        """The error for a workspace type (or deployment) the API does not know, with the
        valid types (``GET /workspaces``), the closest to ours first."""
        from .listing import closest_first

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
        if self.deployment is not None:
            candidates = [self.deployment]
        else:
            candidates = list(wds) if wds else self._usable_deployments()
        if not candidates:
            raise BusyWorkspaceDeployment(f"no usable deployment of workspace type {self.label}")
        self._busy_hint()
        if len(candidates) == 1:
            answer = self._new(candidates[0], reserve=True)
            if answer.success:
                self._rented(answer.id)
            else:
                self._follow_reservation(answer.id, candidates[0])
            return
        self._poll_for_a_robot(candidates, wds)

    def _queue_pace(self, waited: float) -> float:
        """Seconds between looks at a queue: frugal against the real API (each look costs
        calls from the shared hourly budget), quick on a local simulator."""
        time_left = self.options.queue_timeout - waited
        base = poll_interval(waited, time_left, self.client.rate_limit, self.client.clock(),
                             self.options.fast_polling)
        return max(base, 0.1 if self.options.fast_polling else 5.0)

    def _poll_for_a_robot(self, candidates: Sequence[str], wds: Sequence[str] | None) -> None:
        begun = time.monotonic()
        self.status = "BUSY"
        try:
            while True:
                waited = time.monotonic() - begun
                if waited >= self.options.queue_timeout:
                    raise BusyWorkspaceDeployment(self._still_busy(waited))
                try:
                    # A fresh count, not the cached /deployments one.
                    lengths = self.client.queue_lengths(deployments=candidates)
                    self.queue_position = min(
                        (int((v or {}).get("qlen") or 0) for v in lengths.values()), default=None)
                except RerobotsError as exc:
                    log.debug("GET /qlen: %s", exc)
                self._emit("progress")
                self._nap(min(self._queue_pace(waited),
                               max(0.0, self.options.queue_timeout - waited)))
                try:
                    answer = self._new(self.target, wds=wds)
                except BusyWorkspaceDeployment:
                    continue
                if answer.success:
                    self._rented(answer.id)
                    return
                self._follow_reservation(answer.id, self.deployment or "")
                return
        finally:
            self.timings.queued = time.monotonic() - begun
            self.queue_position = None
            self.busy_reason = None

    def _busy_hint(self) -> None:
        hint = self.hint_busy(self) if self.hint_busy is not None else None
        self.busy_reason = hint

    def _still_busy(self, waited: float) -> str:
        why = f" ({self.busy_reason})" if self.busy_reason else ""
        return (f"{self.label}: still busy after waiting {waited:.1f} s{why}; wait longer "
                f"with queue_timeout (--rerobots-queue-timeout S, now "
                f"{self.options.queue_timeout:g})")

    def _follow_reservation(self, rid: str, deployment: str) -> None:
        """Wait in the queue until reservation ``rid`` becomes the instance (same id).

        On the deadline the reservation is cancelled and ``BusyWorkspaceDeployment``
        raised; on any other way out (Ctrl-C included) it is cancelled and the
        original exception propagates.
        """
        begun = time.monotonic()
        served: bool | None = False
        self.status = "QUEUED"
        # The ledger and the watchdog hold the reservation too: served after this process
        # died, it would be an instance with no keepalive (the server gives none to an
        # instance made from a reservation), nobody's to end until its lease ran out.
        self._emit("reserved", rid)
        try:
            while time.monotonic() - begun < self.options.queue_timeout:
                if not any(r.get("id") == rid for r in self.client.reservations()):
                    served = True
                    break
                if deployment:
                    self.queue_position = self.client.queue_length(deployment)
                self._emit("progress")
                waited = time.monotonic() - begun
                self._nap(min(self._queue_pace(waited),
                               max(0.05, self.options.queue_timeout - waited)))
        finally:
            if not served:
                served = self._cancel_reservation(rid)
            self.timings.queued = time.monotonic() - begun
            self.queue_position = None
            if served:
                # Also on the way out of a Ctrl-C: what was served must be ended.
                self._rented(rid)
            elif served is False:
                self._emit("unreserved", rid)
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

    def _rented(self, ident: str) -> None:
        with self._lock:
            self.id = ident
            # terminate() from another thread before there was an id said "never rented":
            # what the server made since must be ended all the same.
            raced = self.outcome == Outcome.NEVER_RENTED
            if raced:
                self.outcome = None
        self.status = "INIT"
        self.busy_reason = None  # no longer waiting for a busy robot
        self._rented_mono = time.monotonic()
        self._emit("rented")
        self._start_keepalive()
        if raced:
            self.terminate()
            raise InstanceError(f"instance {ident} was terminated while it was being rented",
                                instance_id=ident)

    def _start_keepalive(self) -> None:
        if self._keepalive is not None:
            return  # one thread pings whichever instance this is now (after a replacement)
        ident = self.id or ""
        self._keepalive = threading.Thread(
            target=self._keepalive_loop, name=f"rerobots-keepalive-{ident[:8]}", daemon=True
        )
        self._keepalive.start()

    def _keepalive_loop(self) -> None:
        wait = self.options.keepalive_interval
        while not self._stop_keepalive.wait(wait):
            ident = self.id
            if ident is None:
                continue  # between a failed start and its replacement
            try:
                self.client.keepalive(ident)
                wait = self.options.keepalive_interval
            except NotFound as exc:
                if self.status == "READY" and ident == self.id:
                    # An instance served from a reservation has no keepalive on the server
                    # (it is not the request that asked for it): nothing to ping. The
                    # lease, the watchdog and teardown still end it.
                    log.info("instance %s has no keepalive on the server (%s)", ident, exc)
                    return
                wait = min(5.0, self.options.keepalive_interval)  # not listed yet
            except RerobotsError as exc:
                # One attempt per ping (a retried ping could outlast the server's
                # window); a failed one is tried again soon.
                log.warning("keepalive for %s failed: %s", self.id, exc)
                wait = min(5.0, self.options.keepalive_interval)

    def _wait_ready(self) -> None:
        assert self.id is not None
        begun = time.monotonic()

        def poll() -> str:
            spent = rate_wait(self.client.rate_limit, self.client.clock())
            if spent is not None:
                # No call until the budget resets (the client would sleep there, silently
                # and past the ready timeout): the progress line shows the wait instead.
                self.busy_reason = spent
                return "PENDING"
            if self.busy_reason and self.busy_reason.startswith("API rate limit spent"):
                self.busy_reason = None
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
            sleep=self._nap, before_sleep=shown,
        )
        try:
            # Nothing is READY the instant POST /new answers: sleep before the first poll.
            self._nap(interval())
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
        try:
            client = ssh.connect(
                self.host, self.port, hostkeys=self.hostkeys, pkey=self.pkey,
                deadline=self.options.connect_timeout, sleep=self._nap,
            )
        except SSHConnectError as exc:
            hint = firewall_hint(self.options.allow, _source_address(self.host, self.port))
            if hint is None:
                raise
            raise SSHConnectError(f"{exc}; {hint}") from exc
        self._connection = self._wrap(client)

    def _wrap(self, client: paramiko.SSHClient) -> ssh.Connection:
        """A connection on ``client`` that records to the run's transcript, with the
        default command timeout."""
        conn = ssh.Connection(client)
        conn.transcript = self.transcript
        conn.label = self.where
        conn.command_timeout = self.options.command_timeout
        return conn

    @property
    def where(self) -> str:
        """Its type, id and deployment (short), as messages and transcripts name it."""
        on = f" (deployment {self.deployment[:8]})" if self.deployment else ""
        return f"{self.label} {(self.id or '(no id)')[:8]}{on}"

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
        self.uses += 1  # (what a test used, for --rerobots-keep-on-failure)
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

    def run(self, command: str, timeout: Timeout = DEFAULT_TIMEOUT, check: bool = False,
            stdin: bytes | str | None = None) -> CommandResult:
        """Run ``command`` through the host's shell (see :meth:`.ssh.Connection.run`).
        Without ``timeout``, the ``command_timeout`` option applies (default 300 s);
        ``timeout=None`` waits for ever."""
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

    def detach(self, outcome: Outcome = Outcome.HANDED_OVER) -> None:
        """Stop using the instance without ending it (another process will): close SSH
        and stop this process's keepalive. Listeners see ``outcome``: "handed over"
        (to another user of a shared instance), or "kept" (to a keeper process)."""
        if not self._claim():
            return
        try:
            self._close_connection()
            self.outcome = outcome
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
        self.timings.ended_at = time.time()
        if self.timings.ready_at is not None:
            self.timings.held = self.timings.ended_at - self.timings.ready_at
        self._emit("ended")

    def _terminate_remote(self) -> Outcome:
        assert self.id is not None
        # The server may not list it yet for a while after POST /new answered.
        since_rent = time.monotonic() - (self._rented_mono or self._started)
        opts = self.options
        return end(self.client, self.id, deadline=opts.terminate_timeout,
                   notfound_grace=max(0.0, opts.notfound_grace - since_rent), sleep=self.sleep)

    def show_progress(self) -> None:
        """Tell the listeners how the start is going (from the thread that waits for a
        start running in another)."""
        self._emit("progress")

    def _nap(self, seconds: float) -> None:
        """Sleep during the start, or stop it (:class:`Aborted`) when it is called off."""
        abort = self._abort
        if abort is None:
            self.sleep(seconds)
        elif abort.wait(seconds):
            raise Aborted(f"start of {self.label} called off")

    def _emit(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            handler = getattr(listener, event, None)
            if handler is None:
                continue  # a listener written before that event existed
            try:
                handler(self, *args)
            except Exception:  # a reporting bug must never stop a terminate
                log.exception("listener %r failed on %s", listener, event)

    # -- live processes and forwarded ports (pytest_rerobots.live) ------------

    def spawn(self, command: str, *, pty: bool = False) -> live.Process:
        """Start ``command`` on the host and return a :class:`.live.Process` to ``expect``
        its output, ``sendline`` to it, ``wait`` for it or ``close`` it. Under the plugin it
        ends at the teardown of the test that spawned it."""
        return self.connection.spawn(command, pty=pty)

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        """A port on 127.0.0.1 that reaches ``remote_host:remote_port`` from the robot's
        host through the SSH connection; several connections at once. Under the plugin it
        closes at the teardown of the test that opened it."""
        return self.connection.forward(remote_port, remote_host)

    def live_mark(self) -> int:
        """For :meth:`end_live`: what is opened from now on."""
        conn = self._connection
        return conn.tracker.mark() if conn is not None else 0

    def end_live(self, since: int = 0) -> None:
        """End the processes and close the forwards opened after ``since`` (a
        :meth:`live_mark`); the first error, if any, is raised after all were tried."""
        conn = self._connection
        if conn is None:
            return
        errors = conn.tracker.close_since(since)
        if errors:
            raise errors[0]
