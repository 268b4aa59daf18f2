"""SSH to a robot's host: connect, run commands, move files.

The one place where paramiko and socket errors become pytest-rerobots errors
(with ``raise ... from exc``):

* :func:`connect` opens a TCP connection with ``TCP_NODELAY``, pins the host
  key to the ``hostkeys`` the API reported (``RejectPolicy``, an in-memory
  host key table; ``~/.ssh/known_hosts``, the agent and ``~/.ssh/id_*`` are
  never consulted) and logs in with an in-memory key. Refused, reset and timed
  out connections are retried with bounded backoff while the host's sshd comes
  up; a wrong host key (:class:`HostKeyMismatch`) or a refused login
  (:class:`SSHConnectError`) is not retried, as retrying cannot help.
* :func:`run` (from :mod:`.channel`, the layer below this one and :mod:`.live`)
  executes one command and returns a :class:`CommandResult`; unless told otherwise
  it gives up after :data:`DEFAULT_COMMAND_TIMEOUT` seconds (``timeout=None`` waits
  for ever, and only when asked for).
* :class:`Connection` holds one logged-in client and its SFTP session; an
  ``Instance`` delegates ``run``, ``put``, ``get``, ``sftp`` and ``close`` to
  it, and its ``ssh`` is the connection's ``client``.

Latency: every ``run`` costs a channel open, an exec request and the reply.
Nagle's algorithm on a default paramiko socket makes small back-to-back
packets (channel close, then the next channel open) wait for a delayed ACK,
tens of milliseconds each; with ``TCP_NODELAY``, no pty and no polling sleeps a
``run`` costs a few loopback round trips.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from paramiko.pkey import UnknownKeyType

from . import _paramiko_compat, live, retry
from .channel import DEFAULT, DEFAULT_COMMAND_TIMEOUT, CommandResult, Timeout, describe, run
from .errors import (
    CommandFailed,
    CommandTimeout,
    HostKeyMismatch,
    InstanceLost,
    LocalFileError,
    RemoteFileError,
    SSHConnectError,
    SSHError,
)
from .transcript import Entry, Transcript, tail

log = logging.getLogger(__name__)

# DEFAULT, DEFAULT_COMMAND_TIMEOUT, CommandResult, Timeout and run live in .channel; they
# are named here too, as the SSH layer's own, for the code that reaches them through it.
__all__ = [
    "DEFAULT",
    "DEFAULT_COMMAND_TIMEOUT",
    "CommandResult",
    "Connection",
    "Timeout",
    "connect",
    "generate_client_key",
    "generate_client_key_text",
    "run",
]

KEY_COMMENT = "pytest-rerobots"

# -- keys ------------------------------------------------------------------------------


def generate_client_key() -> tuple[paramiko.PKey, str]:
    """Make a fresh ed25519 login key in memory; return it and its public line.

    paramiko cannot generate ed25519 keys, so ``cryptography`` makes one and
    paramiko reads its OpenSSH serialization from memory: the private key never
    touches the disk. The public line is ``"ssh-ed25519 AAAA... pytest-rerobots"``,
    what ``POST /new`` takes as ``sshkey``.
    """
    pkey, public, _ = generate_client_key_text()
    return pkey, public


def generate_client_key_text() -> tuple[paramiko.PKey, str, str]:
    """:func:`generate_client_key`, with the private key's OpenSSH text as well (held in
    memory; paramiko cannot write an ed25519 key). Written to a file only for an
    instance kept after the run (``pytest_rerobots.keep``)."""
    private = ed25519.Ed25519PrivateKey.generate()
    text = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    pkey = paramiko.Ed25519Key(file_obj=io.StringIO(text))
    return pkey, f"{pkey.get_name()} {pkey.get_base64()} {KEY_COMMENT}", text


def _parse_hostkeys(hostkeys: list[str]) -> list[paramiko.PKey]:
    """Parse ``"<type> <base64>[ comment]"`` lines; skip types paramiko lacks."""
    keys = []
    problems = []
    for line in hostkeys:
        fields = line.split()
        if len(fields) < 2:
            problems.append(f"{line!r}: not '<type> <base64>'")
            continue
        try:
            keys.append(paramiko.PKey.from_type_string(fields[0], base64.b64decode(fields[1])))
        except (paramiko.SSHException, UnknownKeyType, binascii.Error, ValueError) as exc:
            problems.append(f"{fields[0]}: {exc}")
    if not keys:
        detail = "; ".join(problems) or "the list is empty"
        raise SSHConnectError(f"no usable host key to pin the connection to ({detail})")
    return keys


# -- connect ---------------------------------------------------------------------------


class _Retryable(Exception):
    """Internal: an attempt failed in a way that a later attempt may not."""


def connect(
    host: str,
    port: int,
    *,
    hostkeys: list[str],
    pkey: paramiko.PKey,
    username: str = "root",
    timeout: float = 10.0,
    attempts: int | None = None,
    deadline: float = 60.0,
    source_address: tuple[str, int] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> paramiko.SSHClient:
    """Open an SSH connection to ``host:port`` and log in as ``username`` with ``pkey``.

    The host must present one of ``hostkeys``. ``timeout`` bounds each attempt's
    TCP connect, banner, key exchange and login. Refused, reset and timed out
    attempts are retried, with exponential backoff through ``sleep``
    (injectable, so tests need not wait), until ``deadline`` seconds have
    passed or, when given, ``attempts`` attempts were made.
    ``source_address`` binds the local end, as for :func:`socket.create_connection`.

    Raises :class:`HostKeyMismatch` at once when the host presents another key,
    and :class:`SSHConnectError` when the login is refused or the retries run
    out. Safe to retry: a failed call leaves nothing open.
    """
    pinned = _parse_hostkeys(hostkeys)
    retrying = retry.connecting(deadline=deadline, retry_on=(_Retryable,), attempts=attempts,
                                sleep=sleep)
    try:
        for attempt in retrying:
            with attempt:
                return _connect_once(host, port, pinned, pkey, username, timeout, source_address)
    except _Retryable as exc:
        tries = retrying.statistics.get("attempt_number", 1)
        cause = exc.__cause__
        raise SSHConnectError(
            f"could not connect to {host}:{port} ({tries} attempt{'s' * (tries != 1)}): "
            f"{describe(cause)}"
        ) from cause
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


def _connect_once(
    host: str,
    port: int,
    pinned: list[paramiko.PKey],
    pkey: paramiko.PKey,
    username: str,
    timeout: float,
    source_address: tuple[str, int] | None,
) -> paramiko.SSHClient:
    try:
        sock = socket.create_connection((host, port), timeout, source_address)
    except socket.gaierror as exc:
        raise SSHConnectError(f"cannot resolve {host!r}: {exc}") from exc
    except OSError as exc:  # refused, unreachable, timed out: sshd may still be coming up
        raise _Retryable() from exc
    # A command round trip is a string of small packets; Nagle would hold each
    # back until the previous one is ACKed, and Linux delays ACKs by up to 40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client = paramiko.SSHClient()
    # Fresh, in-memory table: nothing from or to ~/.ssh/known_hosts.
    name = host if port == 22 else f"[{host}]:{port}"
    for key in pinned:
        client.get_host_keys().add(name, key.get_name(), key)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(
            host,
            port,
            username=username,
            pkey=pkey,
            sock=sock,
            # The handshake deadline a little after the banner's: when both
            # expire together paramiko may report "No existing session"
            # instead of the missing banner.
            timeout=timeout + 0.5,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            look_for_keys=False,
            allow_agent=False,
            # Maps exit-signal to an exit status (paramiko alone leaves -1).
            transport_factory=_paramiko_compat.transport_factory,
        )
    except paramiko.BadHostKeyException as exc:
        _close_quietly(client, sock)
        expected = ", ".join(f"{k.fingerprint} ({k.get_name()})" for k in pinned)
        raise HostKeyMismatch(
            f"host key mismatch for {name}: it presented {exc.key.fingerprint} "
            f"({exc.key.get_name()}), expected {expected}; refusing to connect"
        ) from exc
    except paramiko.AuthenticationException as exc:
        _close_quietly(client, sock)
        raise SSHConnectError(
            f"{name} refused the login of {username!r} with key {pkey.fingerprint}: {exc}"
        ) from exc
    except (paramiko.SSHException, EOFError, OSError) as exc:
        # No banner (sshd starting, or a firewall dropping us), reset, timeout.
        _close_quietly(client, sock)
        raise _Retryable() from exc
    return client


def _close_quietly(client: paramiko.SSHClient, sock: socket.socket) -> None:
    client.close()
    sock.close()


# -- Connection ---------------------------------------------------------------------------


class Connection:
    """One logged-in SSH connection and its SFTP session; a context manager.

    ``run``, ``put`` and ``get`` are thread-safe as far as paramiko is: each
    ``run`` uses its own channel. ``close`` is idempotent.
    """

    def __init__(self, client: paramiko.SSHClient) -> None:
        self._client = client
        #: Where ``run``, ``put``, ``get`` and spawned processes are recorded, if
        #: anywhere (the plugin sets its run's transcript), and the name entries carry.
        self.transcript: Transcript | None = None
        self.label = ""
        #: The timeout of a ``run`` that names none (``None``: wait for ever).
        self.command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        self._closed = False
        #: Why the robot is lost, once the lease watch said so: every use fails with it.
        self.lost: InstanceLost | None = None
        #: Asked when the connection breaks under a use: finds out at once whether the
        #: robot is lost (its instance sets it; it calls :meth:`mark_lost` if so).
        self.diagnose: Callable[[], None] | None = None

    @classmethod
    def open(cls, host: str, port: int, **kwargs: Any) -> Connection:
        """Connect (see :func:`connect` for the arguments) and wrap the client."""
        return cls(connect(host, port, **kwargs))

    @property
    def client(self) -> paramiko.SSHClient:
        """The logged-in :class:`paramiko.SSHClient`."""
        return self._client

    @property
    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session, opened on first use and then reused."""
        with self._lock:
            if self._closed:
                raise SSHError("the SSH connection is closed")
            if self._sftp is None:
                try:
                    self._sftp = self._client.open_sftp()
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    raise SSHError(f"cannot open an SFTP session: {describe(exc)}") from exc
            return self._sftp

    def run(
        self,
        command: str,
        timeout: Timeout = DEFAULT,
        check: bool = False,
        stdin: bytes | str | None = None,
    ) -> CommandResult:
        """Run ``command``; see :func:`run`. Without ``timeout``, ``command_timeout``
        applies. Recorded in ``transcript``, if set."""
        if timeout is DEFAULT:
            timeout = self.command_timeout
        self._check_lost()
        at, begun = time.time(), time.monotonic()
        try:
            result = run(self._client, command, timeout=timeout, check=check, stdin=stdin,
                         where=self.label)
        except CommandFailed as exc:
            self._record_result(at, exc.result)
            raise
        except CommandTimeout as exc:
            self._record(at, "run", command, None, begun, stdout=exc.stdout, stderr=exc.stderr,
                         note=f"timed out after {timeout or 0:g} s")
            self._check_lost(exc)
            raise
        except SSHError as exc:
            self._record(at, "run", command, None, begun,
                         note=str(self.lost) if self.lost is not None else str(exc))
            self._check_lost(exc)
            raise
        self._record_result(at, result)
        return result

    def put(self, local: str | os.PathLike[str], remote: str) -> None:
        """Copy the local file ``local`` to ``remote`` on the host (relative: to its home).

        A remote path that does not exist (its directory) or may not be written is a
        :class:`RemoteFileError`; a missing or unreadable local file, a
        :class:`LocalFileError` naming it (both are test failures)."""
        local = os.fspath(local)
        self._transfer("put", f"{local} -> {remote}", remote, local,
                       lambda sftp: sftp.put(local, remote))

    def get(self, remote: str, local: str | os.PathLike[str]) -> None:
        """Copy ``remote`` on the host to the local file ``local``.

        A remote file that does not exist or may not be read is a
        :class:`RemoteFileError` (and leaves no empty local file behind); a local path
        that cannot be written (no such directory), a :class:`LocalFileError`."""
        local = os.fspath(local)
        existed = os.path.exists(local)
        try:
            self._transfer("get", f"{remote} -> {local}", remote, local,
                           lambda sftp: sftp.get(remote, local))
        except RemoteFileError:
            if not existed:  # paramiko opened (made) it before asking for the remote file
                with contextlib.suppress(OSError):
                    os.remove(local)
            raise

    def _transfer(self, kind: str, what: str, remote: str, local: str,
                  move: Callable[[paramiko.SFTPClient], object]) -> None:
        self._check_lost()
        at, begun = time.time(), time.monotonic()
        on = f" on {self.label}" if self.label else ""
        try:
            try:
                move(self.sftp)
            except (OSError, EOFError, SSHError) as exc:
                self._check_lost(exc)
                raise
        except (FileNotFoundError, PermissionError) as exc:
            reason = "no such file or directory" if isinstance(exc, FileNotFoundError) \
                else "permission denied"
            if exc.filename is not None and os.fspath(exc.filename) == local:
                # The test's own mistake: one short line naming the path, not the frames
                # of paramiko's copy (from None: nothing the traceback would add).
                self._record(at, kind, what, None, begun, note=f"{local}: {reason}")
                raise LocalFileError(f"local path {local!r}: {reason} ({kind} {what}{on})",
                                     path=local, reason=reason, errno=exc.errno) from None
            self._record(at, kind, what, None, begun, note=f"{remote}: {reason}")
            raise RemoteFileError(f"remote path {remote!r}{on}: {reason} ({kind} {what})",
                                  path=remote, reason=reason) from exc
        except OSError as exc:
            if not isinstance(exc, paramiko.SSHException) and exc.errno is None \
                    and len(exc.args) == 1 and isinstance(exc.args[0], str):
                # A status answer of the SFTP server other than "no such file" and
                # "permission denied" (paramiko raises those two with an errno): the host
                # is there and refused this path, say on a read-only file system.
                reason = f"refused by the host (SFTP: {exc.args[0]})"
                self._record(at, kind, what, None, begun, note=f"{remote}: {reason}")
                raise RemoteFileError(f"remote path {remote!r}{on}: {reason} ({kind} {what})",
                                      path=remote, reason=reason) from exc
            self._record(at, kind, what, None, begun, note=describe(exc))
            raise SSHError(f"cannot {kind} {what}{on}: {describe(exc)}") from exc
        except (paramiko.SSHException, EOFError) as exc:
            self._record(at, kind, what, None, begun, note=describe(exc))
            raise SSHError(f"cannot {kind} {what}{on}: {describe(exc)}") from exc
        except SSHError as exc:  # no SFTP session
            self._record(at, kind, what, None, begun, note=str(exc))
            raise
        self._record(at, kind, what, None, begun)

    def _record_result(self, at: float, result: CommandResult) -> None:
        if self.transcript is not None:
            self.transcript.record(Entry(
                at=at, kind="run", command=result.command, instance=self.label,
                status=result.exit_status, duration=result.duration,
                stdout=tail(result.stdout), stderr=tail(result.stderr)))

    def _record(self, at: float, kind: str, command: str, status: int | None, begun: float,
                *, stdout: str = "", stderr: str = "", note: str = "") -> None:
        if self.transcript is not None:
            self.transcript.record(Entry(
                at=at, kind=kind, command=command, instance=self.label, status=status,
                duration=time.monotonic() - begun, stdout=tail(stdout), stderr=tail(stderr),
                note=note.splitlines()[0] if note else ""))

    def mark_lost(self, error: InstanceLost) -> None:
        """The robot is lost (``pytest_rerobots.leasewatch``): cut the transport, so that
        what is in flight (a command, a transfer, an ``expect``) ends now and raises
        ``error`` rather than waiting for its timeout. :meth:`close` still cleans up."""
        self.lost = error
        transport = self._client.get_transport()
        if transport is not None:
            transport.close()

    def _check_lost(self, exc: BaseException | None = None) -> None:
        """Raise the loss (from ``exc``, what it caused), if the robot is lost. A broken
        connection is diagnosed first: the service may have ended the robot."""
        if self.lost is None and exc is not None and self.diagnose is not None \
                and not self.transport_active:
            try:
                self.diagnose()
            except Exception:  # the diagnosis is a favour; the first error stands
                log.debug("diagnosing a broken connection failed", exc_info=True)
        if self.lost is not None:
            raise self.lost.again() from exc

    @property
    def transport_active(self) -> bool:
        """Whether the SSH transport is still up."""
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def close(self) -> None:
        """End what it spawned or forwarded, close the SFTP session and the connection.
        Idempotent."""
        tracker: live.Tracker | None = self.__dict__.get("_live")
        if tracker is not None and not self._closed:
            # Before the connection goes: a process without a pty would outlive it.
            tracker.close_since(0)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sftp, self._sftp = self._sftp, None
        if sftp is not None:
            sftp.close()
        self._client.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- live processes and forwarded ports (pytest_rerobots.live) --------------------

    @property
    def tracker(self) -> live.Tracker:
        """The processes and forwards this connection opened (the plugin ends a test's)."""
        tracker: live.Tracker | None = self.__dict__.get("_live")
        if tracker is None:
            tracker = self.__dict__.setdefault("_live", live.Tracker())
        return tracker

    def spawn(self, command: str, *, pty: bool = False) -> live.Process:
        """Start ``command`` and return its :class:`.live.Process` handle."""
        process = live.Process(self, command, pty=pty)
        self.tracker.add(process)
        return process

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        """Listen on a free port of 127.0.0.1 that reaches ``remote_host:remote_port`` as
        seen from the host; return that local port (see :class:`.live.Forward`)."""
        fwd = live.Forward(self, remote_port, remote_host)
        self.tracker.add(fwd)
        return fwd.port
