"""The asyncssh backend: an in-process SSH server on each host's accepted sockets.

Logins are user ``root``, public key only, with exactly the host's keys. Commands run as
``/bin/sh -c CMD`` in the host's directory with ``HOME`` set to it, in a process group of
their own; a command killed by signal ``n`` exits with status ``128 + n``, as a shell reports
it. SFTP resolves relative paths against the same directory. In a sandbox (:mod:`.sandbox`)
commands run inside it, and so does SFTP: OpenSSH's ``sftp-server``, with the subsystem's
channel piped to it as a command's is, so that every path it opens is resolved in the
robot's own file system. (asyncssh's SFTP server runs in this process, outside the
sandbox: no check of a path before opening it by name can keep up with a robot that swaps
a directory for a link to ``/`` in between, and then the runner's files were open to it.)
Unsandboxed, asyncssh serves SFTP itself, as the runner's user, as it runs commands.

A session that asked for a pty (``pty-req``) gets one, as sshd gives it: a pseudo-terminal
of the requested size is the command's stdin, stdout, stderr and controlling terminal (in a
sandbox, one of the robot's own ``/dev/pts``), ``TERM`` is the client's, and window changes
resize it. stdout and stderr are then one stream, with the terminal's ``\r\n`` line ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import pathlib
import posixpath
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

from ._asyncssh import asyncssh
from .host import SFTP_SERVERS, Host, HostContext, find_sftp_server
from .processes import (
    CHUNK,
    children,
    killpg,
    reap,
    set_window_size,
    subprocess_exec,
    take_terminal,
)
from .sandbox import SETSID

__all__ = ["AsyncsshHost"]

log = logging.getLogger(__name__)


class AsyncsshHost(Host):
    """An in-process asyncssh server on this host's sockets."""

    def __init__(
        self,
        context: HostContext,
        instance_id: str,
        directory: pathlib.Path,
        authorized: list[str],
        firewall: Callable[[str], str],
    ) -> None:
        super().__init__(context, instance_id, directory, authorized, firewall)
        self._options: asyncssh.SSHServerConnectionOptions | None = None
        self._allowed = {asyncssh.import_public_key(line).public_data for line in self.authorized}
        self._conns: set[asyncssh.SSHServerConnection] = set()
        self._procs: set[asyncio.subprocess.Process] = set()
        self._sftp_server: str | None = None

    async def _start_server(self) -> None:
        home = os.fsencode(self.directory)
        sessions: dict[str, Any] = {
            "process_factory": self._handle_process,
            "sftp_factory": lambda chan: _HomeSFTPServer(chan, home),
        }
        if self.sandbox is not None:
            # Sessions come from _SSHServer.session_requested, which sends SFTP to
            # sftp-server in the sandbox; asyncssh's own server never sees a robot's path.
            self._sftp_server = find_sftp_server()
            sessions = {}
            if self._sftp_server is None:
                # The client only sees its SFTP session end; say why where the runner looks.
                log.warning("instance %s refuses SFTP: a sandboxed robot's SFTP is OpenSSH's "
                            "sftp-server, which is in none of %s", self.instance_id,
                            ", ".join(SFTP_SERVERS))
        self._options = await asyncssh.SSHServerConnectionOptions.construct(
            server_factory=lambda: _SSHServer(self),
            server_host_keys=[asyncssh.import_private_key(self.key_pem)],
            **sessions,
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=True,
            line_editor=False,
            login_timeout=30,
        )

    async def _serve(self, sock: socket.socket) -> None:
        try:
            await asyncssh.run_server(sock, options=self._options)
        except (asyncssh.Error, OSError, asyncio.TimeoutError):
            pass  # a client that fails to log in or goes away is the client's business

    def allows(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == "root" and key.public_data in self._allowed

    async def _close_connections(self) -> None:
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        for proc in list(self._procs):
            killpg(proc.pid)

    async def _freeze_connections(self) -> None:
        for conn in list(self._conns):
            # asyncssh keeps the connection's asyncio transport in ``_transport`` (no
            # public accessor): reading stops, and whatever would be sent is dropped.
            transport = getattr(conn, "_transport", None)
            if transport is not None:
                transport.pause_reading()
                transport.write = lambda data: None

    async def _stop_server(self) -> None:
        procs = list(self._procs)
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=5)

    async def _handle_process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        try:
            await self._exec(process)
        except Exception as exc:  # our bug, not the client's: surface it
            self.context.record_error(exc)
            with contextlib.suppress(Exception):
                process.exit(255)

    async def _exec(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if process.subsystem == "sftp":  # sandboxed only (see _SandboxedSession)
            if self._sftp_server is None:
                # What sshd's shell says of a Subsystem line whose program is missing.
                process.stderr.write(
                    b"sh: sftp-server: not found (a sandboxed robot's SFTP is OpenSSH's "
                    b"sftp-server, which is in none of " + " ".join(SFTP_SERVERS).encode()
                    + b"; Debian: apt-get install openssh-sftp-server)\n")
                process.exit(127)
                return
            argv = [self._sftp_server]
        elif process.command is None:
            argv = ["/bin/sh"]
        else:
            argv = ["/bin/sh", "-c", process.command]
        if process.term_type is not None:
            await self._exec_pty(process, argv)
            return
        try:
            transport, proc = await subprocess_exec(
                *self.argv(*argv),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.directory,
                env=self.env(),
                # Its own process group, so that a timeout or stop_host kills
                # the command and everything it started, and nothing else.
                start_new_session=True,
                pass_fds=self.pass_fds,
            )
        except OSError as exc:
            process.stderr.write(f"sh: {exc}\n".encode())
            process.exit(127)
            return
        self._procs.add(proc)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        loop = asyncio.get_running_loop()
        feeder = loop.create_task(_feed(process, proc))
        closed = loop.create_task(process.channel.wait_closed())
        outputs = loop.create_task(
            _all_true(_pump(proc.stdout, process.stdout), _pump(proc.stderr, process.stderr))
        )
        try:
            # The client may close the channel (a timeout on its side) at any
            # moment: then the command is killed, as nobody can read its output.
            if await _unless_closed(outputs, closed):
                waiter = loop.create_task(proc.wait())
                if await _unless_closed(waiter, closed):
                    rc = waiter.result()
                    with contextlib.suppress(OSError):
                        process.exit(rc if rc >= 0 else 128 - rc)
        finally:
            if proc.returncode is None:
                killpg(proc.pid)
            for task in (feeder, closed, outputs):
                task.cancel()
            try:
                await reap(transport, proc)
            finally:
                self._procs.discard(proc)

    async def _exec_pty(self, process: asyncssh.SSHServerProcess[bytes],
                        argv: list[str]) -> None:
        """Run ``argv`` with a pseudo-terminal as its stdin, stdout, stderr and controlling
        terminal, as sshd runs a session that asked for a pty."""
        env = self.env()
        if process.term_type:
            env["TERM"] = process.term_type
        try:
            master, slave = self._openpty()
        except OSError as exc:
            process.stdout.write(f"sh: cannot allocate a pty: {exc}\r\n".encode())
            process.exit(127)
            return
        # A session of its own, so a process group of its own too (see _exec), with the
        # terminal as its controlling terminal. In a sandbox, where nsenter's session and
        # group lie outside the robot's PID namespace, the command takes the terminal in a
        # session of its own inside (an interactive sh sets the terminal's process group
        # back to the one it found there when it exits).
        sandboxed = self.sandbox is not None
        try:
            set_window_size(slave, *process.term_size)
            transport, proc = await subprocess_exec(
                *(self.argv(SETSID, "--ctty", *argv) if sandboxed else argv),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=self.directory,
                env=env,
                start_new_session=True,
                preexec_fn=None if sandboxed else take_terminal,
                pass_fds=self.pass_fds,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(master)
            process.stdout.write(f"sh: {exc}\r\n".encode())
            process.exit(127)
            return
        finally:
            os.close(slave)
        self._procs.add(proc)

        def groups() -> list[int]:
            """The process groups that a signal for the command goes to: in a sandbox the
            one that nsenter's child leads, nsenter's own only before or after it."""
            return (children(proc.pid) if sandboxed else []) or [proc.pid]

        terminal = _Terminal(master)
        loop = asyncio.get_running_loop()
        feeder = loop.create_task(_feed(process, proc, terminal, groups))
        closed = loop.create_task(process.channel.wait_closed())
        output = loop.create_task(_pump_terminal(terminal, process.stdout))
        waiter = loop.create_task(proc.wait())
        tasks = [feeder, closed, output, waiter]
        try:
            # As sshd, the session ends with the command, not with the last process that
            # holds the terminal open; the channel may close first, as in _exec.
            if await _unless_closed(waiter, closed):
                output.cancel()
                await asyncio.gather(output, return_exceptions=True)
                if output.cancelled() or output.result():
                    # What it printed before it ended can be read now without waiting (the
                    # kernel pushes a pty's pending output before it says there is none).
                    rest = loop.create_task(_pump_terminal(terminal, process.stdout,
                                                           drain=True))
                    tasks.append(rest)
                    if await _unless_closed(rest, closed):
                        rc = waiter.result()
                        with contextlib.suppress(OSError):
                            process.exit(rc if rc >= 0 else 128 - rc)
        finally:
            if proc.returncode is None:
                for pgid in groups():
                    killpg(pgid)
                killpg(proc.pid)
            for task in tasks:
                task.cancel()
            # The terminal is closed once no task waits on it any more; that hangs it up,
            # and the kernel sends SIGHUP to what still runs in its foreground.
            ending = asyncio.gather(*tasks, return_exceptions=True)
            ending.add_done_callback(lambda _: terminal.close())
            try:
                await asyncio.shield(ending)
            finally:
                try:
                    await reap(transport, proc)
                finally:
                    self._procs.discard(proc)

    def _openpty(self) -> tuple[int, int]:
        """A pty pair: in a sandbox, one of the robot's own ``/dev/pts``."""
        if self.sandbox is not None:
            try:
                return self.sandbox.openpty()
            except OSError as exc:
                # The runner's own pty is a terminal too; only the robot's tty cannot name it.
                log.warning("instance %s: no pty of the robot's own (%s); the session gets "
                            "one of the simulator's", self.instance_id, exc)
        return os.openpty()


class _SSHServer(asyncssh.SSHServer):
    """Per-connection policy: user root, public key only, the host's keys only."""

    def __init__(self, host: AsyncsshHost) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._host._conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._host._conns.discard(self._conn)

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        # Asked only of a sandboxed host, whose options name no session factories.
        return _SandboxedSession(self._host._handle_process)

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is always required

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self._host.allows(username, key)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> bool:
        # direct-tcpip (Instance.forward), as sshd's "AllowTcpForwarding local" allows it.
        return True


class _SandboxedSession(asyncssh.SSHServerProcess[bytes]):
    """A sandboxed host's session: SFTP too is a process, sftp-server in the sandbox.

    asyncssh's stream session would serve a subsystem named ``sftp`` in this process, with
    this process's view of the files; here it goes to the process factory, as a command
    does, and :meth:`AsyncsshHost._exec` runs sftp-server for it. Other subsystems are
    refused, as sshd refuses subsystems it has no line for.
    """

    def __init__(self, process_factory: Callable[[asyncssh.SSHServerProcess[bytes]],
                                                 Awaitable[None]]) -> None:
        super().__init__(process_factory, None, 0, False)

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        chan = self._chan
        if chan is None or chan.get_subsystem() != "sftp" or self._conn is None:
            super().session_started()
            return
        # What the stream session does for a command: the channel as stdin, stdout and
        # stderr of a process, which the process factory starts.
        stdin = asyncssh.SSHReader[bytes](self, chan)
        stdout = asyncssh.SSHWriter[bytes](self, chan)
        stderr = asyncssh.SSHWriter[bytes](self, chan, asyncssh.EXTENDED_DATA_STDERR)
        handler = self._start_process(stdin, stdout, stderr)
        if inspect.isawaitable(handler):
            self._conn.create_task(handler, stdin.logger)


class _HomeSFTPServer(asyncssh.SFTPServer):
    """SFTP with relative paths resolved against the host's directory, like sftp-server
    (for an unsandboxed host only: it opens whatever path it is given, as the runner)."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], home: bytes) -> None:
        super().__init__(chan)
        self._home = home

    def map_path(self, path: bytes) -> bytes:
        # posixpath.join keeps absolute paths as they are, as OpenSSH does.
        return posixpath.join(self._home, path)


async def _pump(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> bool:
    """Copy a command's output to the channel with flow control; True at EOF."""
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()
    except (OSError, asyncssh.Error):
        return False
    return True


async def _feed(
    process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process,
    terminal: _Terminal | None = None, groups: Callable[[], list[int]] | None = None,
) -> None:
    """Copy the channel's data to the command's stdin, or to its terminal; forward signals
    (to ``groups()``, by default the command's process group) and, to a terminal, window
    changes; close stdin at EOF (a terminal stays open, as sshd leaves it: a client ends a
    terminal's input with Ctrl-D)."""
    try:
        while True:
            try:
                data = await process.stdin.read(CHUNK)
            except asyncssh.SignalReceived as exc:
                signum = signal.Signals.__members__.get("SIG" + exc.signal)
                if signum is not None:
                    for pgid in groups() if groups is not None else [proc.pid]:
                        killpg(pgid, signum)
                continue
            except asyncssh.TerminalSizeChanged as exc:
                if terminal is not None:
                    terminal.resize(exc.width, exc.height, exc.pixwidth, exc.pixheight)
                continue
            except asyncssh.BreakReceived:
                continue
            if not data:
                break
            if terminal is not None:
                await terminal.write(data)
                continue
            assert proc.stdin is not None
            proc.stdin.write(data)
            await proc.stdin.drain()
    except (OSError, asyncssh.Error):
        pass  # the command stopped reading, or the channel went away
    finally:
        if proc.stdin is not None:
            proc.stdin.close()


class _Terminal:
    """The simulator's side (the master) of a command's pty, read and written on the loop."""

    def __init__(self, master: int) -> None:
        os.set_blocking(master, False)
        self.fd = master

    def read_ready(self) -> bytes | None:
        """What can be read without waiting: None if nothing, ``b""`` at the end (no
        process has the terminal open any more)."""
        try:
            return os.read(self.fd, CHUNK)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EIO:  # Linux's word for the end of a pty's output
                return b""
            raise

    async def read(self) -> bytes:
        """What the command printed; ``b""`` at the end."""
        while (data := self.read_ready()) is None:
            await self._ready(write=False)
        return data

    async def write(self, data: bytes) -> None:
        """Type ``data`` into the terminal, waiting while its input is full."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._ready(write=True)

    def resize(self, columns: int, rows: int, xpixels: int, ypixels: int) -> None:
        set_window_size(self.fd, columns, rows, xpixels, ypixels)

    def close(self) -> None:
        """Close the master (no task may wait on it any more)."""
        os.close(self.fd)

    async def _ready(self, write: bool) -> None:
        # Watched only while waiting: a terminal with unread output would otherwise wake
        # the loop for nothing whenever the channel's flow control holds the reader back.
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if write:
            loop.add_writer(self.fd, wake)
        else:
            loop.add_reader(self.fd, wake)
        try:
            await ready
        finally:
            if write:
                loop.remove_writer(self.fd)
            else:
                loop.remove_reader(self.fd)


async def _pump_terminal(terminal: _Terminal, dst: asyncssh.SSHWriter[bytes], *,
                         drain: bool = False) -> bool:
    """Copy what the command printed to its terminal to the channel with flow control; True
    at the end. With ``drain``, only what can be read without waiting."""
    try:
        while data := (terminal.read_ready() if drain else await terminal.read()):
            dst.write(data)
            await dst.drain()
    except (OSError, asyncssh.Error):
        return False
    return True


async def _all_true(*aws: Awaitable[bool]) -> bool:
    return all(await asyncio.gather(*aws))


async def _unless_closed(task: asyncio.Task[Any], closed: asyncio.Task[Any]) -> bool:
    """Wait for ``task``; False if the channel closes first (``task`` is then
    cancelled), if ``task`` failed, or if it returned False."""
    await asyncio.wait({task, closed}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    return not task.cancelled() and task.exception() is None and task.result() is not False
