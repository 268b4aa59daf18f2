"""``Instance``: one rented robot, from ``POST /new`` to terminated.

A context manager usable without pytest::

    with RerobotsClient() as api, acquire(api, "basic_kobuki") as robot:
        robot.run("uname -a", check=True)

``__enter__`` rents, waits for READY, opens the firewall and connects SSH; if
any step fails after ``POST /new`` answered, the instance is terminated before
the error propagates (Ctrl-C included). ``__exit__`` and :meth:`terminate`
are idempotent.

The instance holds its state, starts and ends, and fronts its SSH connection. Renting it
(queues, reservations, failed starts, a lost ``POST /new``, keepalive, the READY
wait) is :mod:`.renting`'s; attaching to one rented elsewhere, kept by an earlier run or
rented ahead, :mod:`.attaching`'s; what a loss while held does, the lease watch's
(:mod:`.leasewatch`); starting and ending several at once, :mod:`.fleet`'s.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import paramiko

from . import attaching, leasewatch, retry, ssh
from .board import Holder
from .ending import end
from .errors import (
    InstanceLost,
    RerobotsError,
    SSHConnectError,
)
from .fleet import Aborted, end_all, start_all
from .leasewatch import LeaseWatch
from .options import ConstructorKeywords, InstanceOptions
from .outcome import ENDED_OUTCOMES, Outcome
from .renting import FailedRental, Keepalive, Renter
from .ssh import DEFAULT as DEFAULT_TIMEOUT
from .ssh import Timeout
from .transcript import Transcript
from .wire import is_uuid

if TYPE_CHECKING:
    from . import live
    from .client import RerobotsClient
    from .ssh import CommandResult

# Aborted, FailedRental, end_all and start_all are fleet's and renting's; named here too,
# where the code that starts and observes instances has always found them.
__all__ = [
    "ENDED_OUTCOMES",
    "Aborted",
    "FailedRental",
    "Instance",
    "InstanceListener",
    "InstanceOptions",
    "Outcome",
    "Timings",
    "acquire",
    "end",
    "end_all",
    "start_all",
]

log = logging.getLogger("pytest_rerobots.instance")


#: ``Instance`` keywords that are not options (see :meth:`Instance.build`): its constructor's
#: fields less those ``build`` passes itself, read at first use (``Instance`` is below).
_OWN_KEYWORDS = ConstructorKeywords(lambda: Instance, exclude=("client", "target", "options"))

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
class Timings:
    """Seconds spent at each stage, for reports."""

    queued: float = 0.0
    to_ready: float = 0.0
    held: float = 0.0
    ready_at: float | None = None
    ended_at: float | None = None
    #: Wall-clock times (``time.time()``) of the run's timeline and of the instance-minutes
    #: (:mod:`.costs`): the start was asked for, ``POST /new`` answered with this instance
    #: (or this run took over one an earlier run kept), the terminate began.
    requested_at: float | None = None
    rented_at: float | None = None
    ending_at: float | None = None


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
    #: (directory, key) of a :class:`~.xdist_pool.SharedPool` entry when shared by xdist workers.
    shared_key: tuple[str, str] | None = None
    known_ids: Callable[[], Iterable[str]] | None = field(default=None, repr=False)
    #: Says why our robot may be busy (e.g. "this run is still releasing ..."), for the
    #: progress line and the error after the queue timeout.
    hint_busy: Callable[[Instance], str | None] | None = field(default=None, repr=False)
    #: Given the deployments that could serve it (all busy), says whether this run holds
    #: them itself: (what to say, whether waiting is hopeless), or None. A hopeless wait
    #: fails at once; another one shows what to say in the progress line.
    held_here: Callable[[Instance, Sequence[str]], tuple[str, bool] | None] | None = field(
        default=None, repr=False)
    #: The deployments to avoid while others of the type can serve (the checkout's
    #: health record, :mod:`.health`); a pinned deployment is rented all the same.
    unhealthy: Callable[[], Sequence[str]] | None = field(default=None, repr=False)
    #: Who holds it, and for how long (for the run's board and its messages).
    holder: Holder | None = field(default=None, repr=False)
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
    #: Whether it was rented ahead of this run (``pytest --rerobots-rent-ahead``) and
    #: attached to.
    rented_ahead: bool = field(default=False, init=False)
    #: What the keeper wrote when it was kept (``pytest_rerobots.keep``).
    kept: dict[str, Any] | None = field(default=None, init=False, repr=False)
    #: How many times its connection was used (commands, transfers, ``ssh``/``sftp``).
    uses: int = field(default=0, init=False, repr=False)
    _connection: ssh.Connection | None = field(default=None, init=False, repr=False)
    #: Why it was lost while held (the lease watch), if it was: every use raises it.
    lost: InstanceLost | None = field(default=None, init=False, repr=False)
    _keepalive: Keepalive = field(init=False, repr=False)
    _watch: LeaseWatch | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)
    _up: bool = field(default=False, init=False, repr=False)
    _ending: bool = field(default=False, init=False, repr=False)
    _rented_mono: float = field(default=0.0, init=False, repr=False)
    #: Set by whoever starts several instances at once, to stop this one's start.
    _abort: threading.Event | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._keepalive = Keepalive(self)
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
        self.timings.requested_at = time.time()
        if self.existing is not None:
            attaching.attach_existing(self, self.existing)
            return
        if self.kept_record is not None:
            attaching.attach_kept(self, self.kept_record)
            return
        if self.pkey is None:
            self.pkey, self.public_key, self.private_key_text = ssh.generate_client_key_text()
        elif self.public_key is None:
            self.public_key = f"{self.pkey.get_name()} {self.pkey.get_base64()}"
        Renter(self).rent_until_ready()
        self._open_firewall()
        if self.options.connect:
            self._connect()
        self._start_watch()

    # -- the lease watch (pytest_rerobots.leasewatch) -------------------------

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch = LeaseWatch(self, self.options.watch_interval)
            self._watch.start()

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()

    @property
    def ending(self) -> bool:
        """Whether this process is ending (or has ended) it: not a loss."""
        return self._ending or self.outcome is not None

    @property
    def current_connection(self) -> ssh.Connection | None:
        """Its SSH connection, if any, without counting a use."""
        return self._connection

    def lose(self, error: InstanceLost) -> None:
        """It is lost while held (the lease watch saw it): remember why, cut its
        connection so that what is in flight fails now with ``error``, and tell the
        listeners (``lost``). It is still ended as usual (a partitioned host's instance
        is still live on the service)."""
        leasewatch.lose(self, error)

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
            self._emit("unreachable")  # (an optional event: the health record's)
            hint = firewall_hint(self.options.allow, _source_address(self.host, self.port))
            if hint is None:
                raise
            raise SSHConnectError(f"{exc}; {hint}") from exc
        self._connection = self._wrap(client)

    def _wrap(self, client: paramiko.SSHClient) -> ssh.Connection:
        """A connection on ``client`` that records to the run's transcript, with the
        default command timeout."""
        conn = ssh.Connection(client)
        conn.diagnose = functools.partial(leasewatch.diagnose, self)
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
        if self.lost is not None:
            raise self.lost.again()
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
            self.timings.ending_at = time.time()
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
        self._stop_watch()  # our own end is no loss
        return True

    def _close_connection(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None:
            conn.close()

    def _finish(self) -> None:
        self._ending = False
        if self.outcome is None:
            return  # interrupted: still ours, still kept alive
        self._keepalive.stop()
        # Ended before READY (Ctrl-C in the READY wait): the polls saw where it was.
        self.deployment = self.deployment or self.details.get("deployment") or None
        self.region = self.region or self.details.get("region") or None
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
                   notfound_grace=max(0.0, opts.notfound_grace - since_rent), sleep=self.sleep,
                   label=self.where)

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


def acquire(client: RerobotsClient, target: str, **settings: Any) -> Instance:
    """An unstarted :class:`Instance` for ``target`` (a workspace type or a deployment id)
    rented through ``client``, a context manager; ``settings`` name :class:`InstanceOptions`
    fields (``ready_timeout=...``) or the instance's own keywords (:meth:`Instance.build`).

    The bare building block: the instance has its own ``try/finally``, keepalive
    and lease, but no ledger, watchdog or signal guard, so a SIGKILL of this
    process leaves it to the server's keepalive. :class:`pytest_rerobots.Run`
    adds those layers.
    """
    return Instance.build(client, target, **settings)
