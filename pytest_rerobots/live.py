"""Live processes and forwarded ports on a robot's host, over its SSH connection.

* :class:`Process` (from :meth:`.ssh.Connection.spawn`): a command that keeps running
  while the test talks to it: ``expect`` a line, ``sendline`` an answer, ``wait`` for
  its exit status, ``close`` it. A reader thread drains the channel all along, so a
  chatty process never stalls on a full SSH window, and everything it printed is kept
  (a bounded tail) for the transcript and for the error of an ``expect`` that waited
  in vain.
* :class:`Forward` (from :meth:`.ssh.Connection.forward`): a listening socket on
  ``127.0.0.1`` whose every connection is carried to a port on the robot through a
  ``direct-tcpip`` channel of the same SSH connection.

Ending a remote process: SSH servers handle a ``signal`` channel request unevenly (older
OpenSSH ignore it, and it reaches only the session's first process), and a process
without a pty does not notice that its channel closed until it writes. So the spawned
command first prints its shell's PID on a line of its own, which the handle takes off
the output, and then ``exec``s the command in that same process. ``close`` then sends
SIGTERM to that process's group over a second channel (``kill -TERM -PGID``: sshd starts
each session in a session and process group of its own, so that group is the command and
what it started), and SIGKILL to what is left of the group once the process ended or a
grace period passed. With a pty, closing the
channel also hangs up the terminal, which ends the session on its own.
"""

from __future__ import annotations

import codecs
import contextlib
import re
import shlex
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import paramiko

from . import _paramiko_compat
from .channel import run
from .errors import CommandTimeout, ExpectEOF, ExpectTimeout, SSHError
from .textsafe import block_lines, fence_prefixed
from .transcript import Entry, tail

if TYPE_CHECKING:
    from .ssh import Connection

__all__ = ["Forward", "Match", "Process", "Tracker"]

_CHUNK = 65536
#: How much of what a process printed is kept (for the transcript and errors).
KEEP_CHARS = 65536
_PID_MARK = "__rerobots_pid__"
_PID_LINE = re.compile(_PID_MARK + r" (\d+)\r?\n")
GRACE = 2.0


@dataclass(frozen=True)
class Match:
    """Which of the patterns ``expect`` was given matched (``index``), the pattern, and the
    :class:`re.Match` on the text it searched; ``before`` is the text ahead of the match."""

    index: int
    pattern: str | re.Pattern[str]
    match: re.Match[str]
    before: str

    @property
    def text(self) -> str:
        """The matched text."""
        return self.match.group(0)


class Tracker:
    """The live handles one connection opened, in order; ``mark``/``close_since`` let the
    plugin end what one test opened."""

    def __init__(self) -> None:
        self._handles: list[tuple[int, Process | Forward]] = []
        self._opened = 0
        self._lock = threading.Lock()

    def add(self, handle: Process | Forward) -> None:
        with self._lock:
            self._opened += 1
            self._handles.append((self._opened, handle))

    def mark(self) -> int:
        """A number that :meth:`close_since` takes: handles opened later than now."""
        with self._lock:
            return self._opened

    def close_since(self, mark: int = 0) -> list[Exception]:
        """Close every handle opened after ``mark`` (newest first); the errors, if any."""
        with self._lock:
            closing = [h for seq, h in self._handles if seq > mark]
            self._handles = [(seq, h) for seq, h in self._handles if seq <= mark]
        errors: list[Exception] = []
        for handle in reversed(closing):
            try:
                handle.close()
            except Exception as exc:
                errors.append(exc)
        return errors


class Process:
    """A command running on the host, attached to the test through an SSH channel.

    stdout and stderr come as one stream (with a pty, the terminal's). Text is decoded as
    UTF-8 (undecodable bytes replaced). Thread-safe enough for one test thread beside the
    reader thread.
    """

    def __init__(self, conn: Connection, command: str, *, pty: bool = False,
                 timeout: float = 10.0) -> None:
        self.command = command
        self.pty = pty
        self.pid: int | None = None
        self._conn = conn
        self._started = time.monotonic()
        self._at = time.time()
        self._cond = threading.Condition()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._raw_head = ""  # output before the PID line was seen
        self._buffer = ""  # not yet consumed by expect / read_available
        self._kept: deque[str] = deque()
        self._kept_len = 0
        self._eof = False
        self._closed = False
        self._recorded = False
        self._note = ""
        transport = conn.client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHError(f"cannot spawn {command!r}: the SSH connection is closed")
        try:
            self._chan = transport.open_session(timeout=timeout)
            if pty:
                self._chan.get_pty(term="dumb", width=200, height=50)
            else:
                self._chan.set_combine_stderr(True)
            self._chan.exec_command(
                f"echo {_PID_MARK} $$; exec /bin/sh -c {shlex.quote(command)}")
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self._chan_close_quietly()
            how = " with a pty" if pty else ""
            raise SSHError(f"cannot spawn {command!r}{how}: {exc or type(exc).__name__}"
                           ) from exc
        self._reader = threading.Thread(target=self._read, name="rerobots-spawn", daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"<Process {self.command!r} pid={self.pid}>"

    def _chan_close_quietly(self) -> None:
        chan = getattr(self, "_chan", None)
        if chan is not None:
            chan.close()

    # -- reading ---------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                data = self._chan.recv(_CHUNK)
            except (OSError, EOFError, paramiko.SSHException):
                data = b""
            text = self._decoder.decode(data, final=not data)
            with self._cond:
                if text:
                    self._take(text)
                if not data:
                    self._eof = True
                    if self.pid is None and self._raw_head:
                        self._buffer += self._raw_head
                        self._keep(self._raw_head)
                        self._raw_head = ""
                self._cond.notify_all()
            if not data:
                return

    def _take(self, text: str) -> None:
        if self.pid is None:
            self._raw_head += text
            found = _PID_LINE.search(self._raw_head)
            if found is None:
                return
            self.pid = int(found.group(1))
            text = self._raw_head[:found.start()] + self._raw_head[found.end():]
            self._raw_head = ""
        self._buffer += text
        self._keep(text)

    def _keep(self, text: str) -> None:
        self._kept.append(text)
        self._kept_len += len(text)
        while self._kept_len > KEEP_CHARS and len(self._kept) > 1:
            self._kept_len -= len(self._kept.popleft())

    @property
    def output(self) -> str:
        """The last (up to 64 KiB) text the process printed, consumed or not."""
        with self._cond:
            return "".join(self._kept)

    def read_available(self) -> str:
        """What the process printed that no ``expect`` consumed yet; does not wait."""
        with self._cond:
            text, self._buffer = self._buffer, ""
        return text

    def expect(self, pattern: str | re.Pattern[str] | Sequence[str | re.Pattern[str]],
               timeout: float = 30.0) -> Match:
        """Wait until the output holds ``pattern`` (a regex string or compiled pattern; a
        list: any of them, the earliest match wins) and consume the output up to the
        match's end.

        Raises :class:`~.errors.ExpectTimeout` after ``timeout`` seconds, and
        :class:`~.errors.ExpectEOF` (a kind of it) when the process ends first; both show
        the tail of what it printed.
        """
        patterns = [pattern] if isinstance(pattern, (str, re.Pattern)) else list(pattern)
        if not patterns:
            raise ValueError("expect() needs at least one pattern")
        compiled = [p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns]
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                best: tuple[int, int, re.Match[str]] | None = None
                for k, regex in enumerate(compiled):
                    found = regex.search(self._buffer)
                    if found and (best is None or found.start() < best[1]):
                        best = (k, found.start(), found)
                if best is not None:
                    k, _, found = best
                    before = self._buffer[:found.start()]
                    self._buffer = self._buffer[found.end():]
                    return Match(k, patterns[k], found, before)
                if self._eof and self._conn.lost is None:
                    self._conn._check_lost(EOFError())  # a broken connection: diagnosed
                if self._conn.lost is not None:
                    # The robot is lost (lease watch): infrastructure, not the product.
                    raise self._conn.lost.again()
                if self._eof:
                    raise self._expect_error(ExpectEOF, patterns, timeout)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._expect_error(ExpectTimeout, patterns, timeout)
                # Woken by the reader at EOF, which a lost robot's cut transport brings.
                self._cond.wait(remaining)

    def _expect_error(self, cls: type[ExpectTimeout],
                      patterns: Sequence[str | re.Pattern[str]], timeout: float
                      ) -> ExpectTimeout:
        shown = " or ".join(repr(p.pattern if isinstance(p, re.Pattern) else p)
                            for p in patterns)
        kept = tail("".join(self._kept))
        printed = kept or "(nothing)"
        if cls is ExpectEOF:
            # sshd sends the exit status just after the EOF.
            ended = _paramiko_compat.wait_for_exit_status(self._chan, 1.0)
            status = self._chan.exit_status if ended and self._chan.exit_status >= 0 else None
            why = "ended" + (f" with status {status}" if status is not None else "")
            head = f"{self.command!r} {why} before printing {shown}"
        else:
            head = f"{self.command!r} did not print {shown} within {timeout:g} s"
        # The message shows the output made inert (textsafe, as errors._tails); ``output``
        # keeps it as the process printed it.
        body = fence_prefixed("\n".join(block_lines(kept))) if kept else printed
        return cls(f"{head}; it printed:\n{body}", command=self.command, timeout=timeout,
                   output=printed)

    # -- writing ---------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Write ``data`` to the process's stdin (its terminal, with a pty)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if self._conn.lost is not None:
            raise self._conn.lost.again()
        try:
            self._chan.sendall(raw)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if self._conn.lost is not None:
                raise self._conn.lost.again() from exc
            raise SSHError(f"cannot write to {self.command!r}: {exc or 'closed'}") from exc

    def sendline(self, line: str | bytes = "") -> None:
        """``send`` the line and a newline (``\\r`` with a pty, as a terminal's Enter)."""
        end = "\r" if self.pty else "\n"
        if isinstance(line, str):
            self.send(line + end)
        else:
            self.send(bytes(line) + end.encode())

    def send_eof(self) -> None:
        """Close the process's stdin (without a pty; with one, send Ctrl-D instead)."""
        if self.pty:
            self.send(b"\x04")
        else:
            self._chan.shutdown_write()

    # -- the end ---------------------------------------------------------------

    @property
    def exit_status(self) -> int | None:
        """The exit status once the process ended (``128 + n`` when killed by signal ``n``)."""
        return self._chan.exit_status if self._chan.exit_status_ready() else None

    def wait(self, timeout: float | None = 30.0) -> int:
        """Wait for the process to end and return its exit status.

        Raises :class:`~.errors.CommandTimeout` when it is still running after
        ``timeout`` seconds (it keeps running; ``close`` ends it)."""
        if not _paramiko_compat.wait_for_exit_status(self._chan, timeout):
            raise CommandTimeout(f"{self.command!r} still running after {timeout:g} s",
                                 command=self.command, timeout=timeout)
        self._reader.join(timeout=GRACE)  # the output that came with the end
        status = self._chan.exit_status
        self._record(status)
        return status

    def close(self, grace: float = GRACE) -> int | None:
        """End the process if it still runs: SIGTERM to its process group, and once it
        ended or ``grace`` seconds passed, SIGKILL to what is left of that group. Then
        close the channel and record it in the transcript. Returns the exit status, if
        any. Idempotent."""
        with self._cond:
            if self._closed:
                return self.exit_status
            self._closed = True
        transport = self._conn.client.get_transport()
        if transport is None or not transport.is_active():
            self._note = "the SSH connection was gone"  # and the session with it
        elif not self._chan.exit_status_ready():
            self._note = "ended by close()"
            with self._cond:  # just spawned: its PID line may still be on its way
                self._cond.wait_for(lambda: self.pid is not None or self._eof, grace)
            pgid = self._signal_group("TERM", None)
            _paramiko_compat.wait_for_exit_status(self._chan, grace)
            # Also when it ended: what it started may linger in its group.
            self._signal_group("KILL", pgid)
            _paramiko_compat.wait_for_exit_status(self._chan, grace)
        status = self.exit_status
        self._chan.close()
        self._reader.join(timeout=GRACE)
        self._record(status)
        return status

    def _signal_group(self, name: str, pgid: int | None) -> int | None:
        """Send SIG``name`` to the process group (found from the PID when ``pgid`` is
        None) over a channel of its own; return the group."""
        if self.pid is None:
            return None  # it never started its command: closing the channel is all there is
        if pgid is not None:
            script = f"kill -{name} -{pgid} 2>/dev/null; true"
        else:
            pid = self.pid
            # dash's kill takes no "--": "-PGID" right after the signal names a group.
            script = (f"pg=$(ps -o pgid= -p {pid} 2>/dev/null | tr -d ' '); "
                      f"[ -n \"$pg\" ] || pg=$(cut -d' ' -f5 /proc/{pid}/stat 2>/dev/null); "
                      f"if [ -n \"$pg\" ] && [ \"$pg\" -gt 1 ]; then "
                      f"kill -{name} -\"$pg\" 2>/dev/null; echo \"$pg\"; "
                      # No group to name (in the simulator's sandbox the session's group
                      # lies outside the robot's PID namespace): the process and its children.
                      f"else for c in $(ps -o pid= --ppid {pid} 2>/dev/null); do "
                      f"kill -{name} $c 2>/dev/null; done; kill -{name} {pid} 2>/dev/null; fi; "
                      f"true")
        try:
            # On the client, not the Connection: not recorded (ours, not the test's).
            out = run(self._conn.client, script, timeout=10).stdout.strip()
        except SSHError:
            return None  # the connection is gone: so is the session, with the channel
        return pgid if pgid is not None else (int(out) if out.isdigit() else None)

    def _record(self, status: int | None) -> None:
        with self._cond:
            if self._recorded:
                return
            self._recorded = True
            printed = "".join(self._kept)
        transcript = self._conn.transcript
        if transcript is not None:
            transcript.record(Entry(
                at=self._at, kind="spawn", command=self.command, instance=self._conn.label,
                status=status, duration=time.monotonic() - self._started,
                stdout=tail(printed), note=self._note,
            ))

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Forward:
    """``127.0.0.1:port`` here, carried to ``remote_host:remote_port`` on the robot.

    One thread accepts; each connection gets a ``direct-tcpip`` channel and two threads
    that copy one way each, so several connections are served at once.
    """

    def __init__(self, conn: Connection, remote_port: int, remote_host: str = "127.0.0.1",
                 *, local_port: int = 0) -> None:
        self.remote = (remote_host, int(remote_port))
        self._conn = conn
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", local_port))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._closed = threading.Event()
        self._pairs: set[tuple[socket.socket, paramiko.Channel]] = set()
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, name="rerobots-forward",
                                          daemon=True)
        self._accepter.start()

    def __repr__(self) -> str:
        return f"<Forward 127.0.0.1:{self.port} -> {self.remote[0]}:{self.remote[1]}>"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, origin = self._sock.accept()
            except OSError:
                return  # closed
            transport = self._conn.client.get_transport()
            try:
                if transport is None:
                    raise paramiko.SSHException("the SSH connection is closed")
                chan = transport.open_channel("direct-tcpip", self.remote, origin, timeout=10)
            except (paramiko.SSHException, EOFError, OSError):
                client.close()  # the robot refused: so does the local end
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.add((client, chan))
            threading.Thread(target=self._pipe, args=(client, chan),
                             name="rerobots-forward-pipe", daemon=True).start()

    def _pipe(self, client: socket.socket, chan: paramiko.Channel) -> None:
        # Two blocking copiers rather than select(): a channel's fileno() is an OS pipe
        # that chan.close() closes while paramiko's thread may still write to it.
        back = threading.Thread(target=self._back, args=(client, chan),
                                name="rerobots-forward-back", daemon=True)
        back.start()
        try:
            while data := client.recv(_CHUNK):
                chan.sendall(data)
            chan.shutdown_write()  # half-close: the robot may still answer
        except (OSError, EOFError, paramiko.SSHException):
            chan.close()
        back.join()
        with self._lock:
            self._pairs.discard((client, chan))
        chan.close()
        client.close()

    @staticmethod
    def _back(client: socket.socket, chan: paramiko.Channel) -> None:
        try:
            while data := chan.recv(_CHUNK):
                client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except (OSError, EOFError, paramiko.SSHException):
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)  # wakes the other copier

    def close(self) -> None:
        """Stop listening and close every forwarded connection. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._sock.close()
        with self._lock:
            pairs = list(self._pairs)
        for client, chan in pairs:
            chan.close()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        self._accepter.join(timeout=GRACE)

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
