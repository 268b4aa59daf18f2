"""Running one command on a logged-in SSH connection, over a channel of its own.

The layer below :mod:`.ssh` (connecting, files, the ``Connection``) and :mod:`.live`
(spawned processes end their process group with a command run here): :func:`run` opens a
session channel, execs the command, reads stdout and stderr together until EOF and returns
a :class:`CommandResult`. Unless told otherwise it gives up after
:data:`DEFAULT_COMMAND_TIMEOUT` seconds (``timeout=None`` waits for ever, and only when
asked for). The paramiko and socket errors of a command become pytest-rerobots errors here.
"""

from __future__ import annotations

import enum
import socket
import threading
import time
from dataclasses import dataclass
from typing import Literal

import paramiko

from . import _paramiko_compat
from .errors import CommandFailed, CommandTimeout, SSHError

__all__ = [
    "DEFAULT",
    "DEFAULT_COMMAND_TIMEOUT",
    "CommandResult",
    "Timeout",
    "describe",
    "run",
]

_CHUNK = 65536

#: Seconds a command may run when its caller names no timeout: a hung command
#: must not hold a whole test run (and its robots) until someone presses Ctrl-C.
DEFAULT_COMMAND_TIMEOUT = 300.0


class _Default(enum.Enum):
    DEFAULT = "default"

    def __repr__(self) -> str:
        return "DEFAULT"


#: "No timeout named": the connection's ``command_timeout`` (else
#: :data:`DEFAULT_COMMAND_TIMEOUT`) applies. ``None`` means no timeout at all.
DEFAULT = _Default.DEFAULT
Timeout = float | None | Literal[_Default.DEFAULT]


@dataclass(frozen=True)
class CommandResult:
    """What one command did: its exit status, its output (decoded as UTF-8,
    undecodable bytes replaced) and how long it took, in seconds.

    ``exit_status`` is ``128 + n`` for a command killed by signal ``n``, as a
    shell reports it, and ``-1`` when the host sent no status at all.
    """

    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.exit_status == 0


def describe(exc: BaseException | None) -> str:
    """What went wrong, in a few words, for a message (socket timeouts as "timed out")."""
    if exc is None:
        return "unknown error"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (socket.timeout, TimeoutError)) and text == "timed out":
        return "timed out"
    return text


def run(
    client: paramiko.SSHClient,
    command: str,
    timeout: Timeout = DEFAULT,
    check: bool = False,
    stdin: bytes | str | None = None,
    *,
    where: str = "",
) -> CommandResult:
    """Run ``command`` on the host (through its shell) and wait for it to end.

    stdout and stderr are read together, so neither can fill up and stall the
    command. ``stdin`` is sent and then closed; without it the command's stdin
    is closed at once (like ``ssh -n``), so a command that reads it does not
    hang. No pty is requested.

    Raises :class:`CommandTimeout` when ``timeout`` seconds pass first
    (:data:`DEFAULT_COMMAND_TIMEOUT` unless given; ``None`` waits for ever),
    carrying what the command printed until then: only this command's channel
    is closed, the connection stays usable. With ``check=True`` a non-zero
    status raises :class:`CommandFailed` carrying the result. ``where`` names
    the host in those messages. A lost connection is an :class:`SSHError`. Not
    retried: a command may not be safe to run twice.
    """
    if timeout is DEFAULT:
        timeout = DEFAULT_COMMAND_TIMEOUT
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise SSHError(f"cannot run {command!r}: the SSH connection is closed")
    try:
        chan = transport.open_session(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise SSHError(f"cannot run {command!r}: {describe(exc)}") from exc
    feeder: threading.Thread | None = None
    try:
        try:
            chan.exec_command(command)
            if stdin is None:
                chan.shutdown_write()
            else:
                data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
                # A thread, because the command may not read all its input
                # before it writes output that we must read meanwhile.
                feeder = threading.Thread(
                    target=_feed, args=(chan, data), name="rerobots-ssh-stdin", daemon=True
                )
                feeder.start()
            stdout, stderr, status = _collect(chan, deadline)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise SSHError(f"running {command!r} failed: {describe(exc)}") from exc
        if status == -1 and not transport.is_active():
            raise SSHError(f"the SSH connection was lost while running {command!r}")
        if status is None:
            on = f" on {where}" if where else ""
            raise CommandTimeout(
                f"command {command!r}{on} did not finish within {timeout or 0:g} s"
                + _held_open(command, chan),
                command=command,
                timeout=timeout,
                stdout=stdout.decode("utf-8", "replace"),
                stderr=stderr.decode("utf-8", "replace"),
                background=bool(_held_open(command, chan)),
            )
    finally:
        chan.close()
        if feeder is not None:
            feeder.join()
    result = CommandResult(
        command=command,
        exit_status=status,
        stdout=stdout.decode("utf-8", "replace"),
        stderr=stderr.decode("utf-8", "replace"),
        duration=time.monotonic() - started,
    )
    if check and result.exit_status != 0:
        raise CommandFailed(result, where)
    return result


def _held_open(command: str, chan: paramiko.Channel) -> str:
    """Why a timed-out command may never have ended, if it looks like the usual cause: a
    background process (``cmd &``) that keeps the channel's output open, so that no EOF
    comes although the shell is gone (SSH's behaviour, OpenSSH's too). Empty otherwise."""
    if chan.exit_status_ready() and not chan.eof_received:
        status = chan.exit_status
        return (f": its shell exited (status {status}) but the output stayed open, held by "
                "a process it started in the background")
    if command.rstrip().endswith("&") and not command.rstrip().endswith("&&"):
        return (": it ends with '&', and a process in the background keeps the output "
                "open until it ends")
    return ""


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command ended or timed out without reading everything: not our error


def _collect(chan: paramiko.Channel, deadline: float | None) -> tuple[bytes, bytes, int | None]:
    """Read stdout and stderr until EOF, then the exit status; on timeout, what was
    read until then and None."""
    # One event that both buffers set when data (or EOF) arrives, so one thread
    # waits on both with no polling interval. Not chan.fileno(): its OS pipe is
    # closed by chan.close() while paramiko's thread may still write to it for
    # in-flight data, which can kill the whole transport (EBADF).
    ready = threading.Event()
    _paramiko_compat.wake_on_output(chan, ready)
    out: list[bytes] = []
    err: list[bytes] = []
    while True:
        progressed = False
        if chan.recv_ready():
            out.append(chan.recv(_CHUNK))
            progressed = True
        if chan.recv_stderr_ready():
            err.append(chan.recv_stderr(_CHUNK))
            progressed = True
        if progressed:
            continue
        if chan.eof_received or chan.closed:
            # Data that arrived with the EOF after our readiness checks above.
            while chan.recv_ready():
                out.append(chan.recv(_CHUNK))
            while chan.recv_stderr_ready():
                err.append(chan.recv_stderr(_CHUNK))
            break
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return b"".join(out), b"".join(err), None
        # Only this thread clears the event (by reading a buffer empty), and it
        # checked both buffers since: a set event means new data or EOF.
        ready.wait(remaining)
        ready.clear()
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not _paramiko_compat.wait_for_exit_status(chan, remaining):
        return b"".join(out), b"".join(err), None
    return b"".join(out), b"".join(err), chan.exit_status
