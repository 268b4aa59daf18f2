"""The simulated robot hosts: real SSH servers on loopback, one per instance.

A :class:`HostManager` owns every host of one simulator. Each host has

* its own directory ``root/<instance_id>``, the instance's ``HOME`` and the
  working directory of every command, populated from the catalog's files and
  set up by running its commands once;
* its own freshly generated ``ecdsa-sha2-nistp256`` host key (the type real
  rerobots hosts report in ``hostkeys``);
* a listening socket on ``127.0.0.1`` with an ephemeral port, where every new
  TCP connection is first shown to the instance's firewall: ``ACCEPT`` passes
  it to the SSH server, ``DROP`` holds it silent (no banner is ever sent) and
  ``REJECT`` resets it.

Logins are user ``root``, public key only, with exactly the keys given. Commands
run as ``/bin/sh -c CMD`` in the host's directory with ``HOME`` set to it; a
command killed by signal ``n`` exits with status ``128 + n``, as a shell reports
it. SFTP starts in the same directory.

Two backends serve the SSH protocol:

``asyncssh`` (the default)
    In-process. One asyncio event loop in one daemon thread per manager serves
    all of its hosts.

``openssh``
    A private ``/usr/sbin/sshd -D -e`` per host on a private port, behind a
    small proxy in the same event loop that enforces the firewall (sshd then
    sees every connection as coming from 127.0.0.1, which does not matter
    here). A ``ForceCommand`` wrapper gives commands and ``sftp-server`` the
    host's directory and ``HOME``. When this process is not root, sshd can only
    log in the user running it: :attr:`HostManager.login_user` names the user
    that works (``root`` whenever we are root, which is how CI runs).

Everything a host starts (sshd, its per-connection children, commands and
whatever they leave in the background) carries a per-host marker in its
environment, so that :meth:`HostManager.stop_host` finds and kills it by pid.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import pathlib
import posixpath
import pwd
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncssh
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import ConfigurationError, RerobotsError

__all__ = ["BACKENDS", "HostInfo", "HostManager"]

log = logging.getLogger(__name__)

#: The SSH server implementations a :class:`HostManager` can run.
BACKENDS = ("asyncssh", "openssh")

SSHD = "/usr/sbin/sshd"
# Debian, Fedora/RHEL and Arch put OpenSSH's sftp-server in one of these.
_SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
)
_MARKER_VAR = "REROBOTS_SIM_HOST"
_SETUP_TIMEOUT = 300.0  # seconds for one catalog command at start_host
_START_TIMEOUT = 15.0  # seconds for a host to start listening
_STOP_TIMEOUT = 10.0  # seconds for a host to close down
_CHUNK = 65536

T = TypeVar("T")


@dataclass(frozen=True)
class HostInfo:
    """Where a started host listens and how it identifies itself."""

    port: int
    #: ``"<keytype> <base64>"``, no comment: the instance's ``hostkeys`` entry.
    hostkey: str
    #: The host's directory: ``HOME`` and working directory of its commands.
    directory: pathlib.Path


class HostManager:
    """Start and stop simulated robot hosts; thread-safe; a context manager.

    ``root`` holds one directory per host (left in place after the host stops,
    for inspection; the caller owns ``root``). ``backend`` is ``"asyncssh"`` or
    ``"openssh"``; anything else is a :class:`ConfigurationError`, and so is
    ``"openssh"`` without ``/usr/sbin/sshd``.
    """

    def __init__(self, root: pathlib.Path, backend: str = "asyncssh") -> None:
        if backend not in BACKENDS:
            raise ConfigurationError(
                f"unknown SSH host backend {backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        self.root = pathlib.Path(root)
        self.backend = backend
        #: The user that can log in: ``root``, except for the openssh backend
        #: run by another user (a non-root sshd can only log in its own user).
        self.login_user = "root"
        self._sftp_server = ""
        self._sshd_options = ""
        if backend == "openssh":
            _check_openssh()
            self._sftp_server = _sftp_server()
            self._sshd_options = _sshd_version_options()
            if os.geteuid() != 0:
                self.login_user = pwd.getpwuid(os.geteuid()).pw_name
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host | None] = {}  # None: starting
        self._closed = False
        self._errors: list[BaseException] = []
        # Firewall callables run here, not on the loop: the simulator may call
        # stop_host while holding the very lock its firewall callable needs.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="rerobots-sim-firewall"
        )
        self._loop = _LoopThread(self._record_error)
        # Should this manager be dropped without close() (a crashed test,
        # interpreter exit), whatever its hosts started is still killed by pid.
        self._leftovers = _Leftovers()
        self._finalizer = weakref.finalize(self, self._leftovers.clean)

    # -- public API --------------------------------------------------------

    def start_host(
        self,
        instance_id: str,
        *,
        authorized_keys: list[str],
        firewall: Callable[[str], str],
        files: dict[str, str],
        commands: list[str],
    ) -> HostInfo:
        """Create, set up and start the host of ``instance_id``; return once it listens.

        ``authorized_keys`` are OpenSSH public key lines; ``firewall(src_ip)``
        is called for each new TCP connection and returns ``"ACCEPT"``,
        ``"DROP"`` or ``"REJECT"``; ``files`` maps paths relative to the host's
        directory to their text (executable when it starts with ``#!``);
        ``commands`` run once, in order, through ``/bin/sh`` in that directory.
        A failing command, a bad path or a bad key is a :class:`ConfigurationError`.
        """
        if not re.fullmatch(r"[A-Za-z0-9._-]+", instance_id) or instance_id in {".", ".."}:
            raise ConfigurationError(f"instance id {instance_id!r} cannot name a host directory")
        with self._lock:
            self._check_open()
            if instance_id in self._hosts:
                raise ConfigurationError(f"a host for instance {instance_id} is already running")
            self._hosts[instance_id] = None  # reserve the id while we set up outside the lock
        try:
            directory = self.root / instance_id
            directory.mkdir(parents=True, exist_ok=True)
            keys = _parse_authorized_keys(authorized_keys)
            _populate(directory, files)
            for command in commands:
                _run_setup_command(instance_id, directory, command)
            cls = _AsyncsshHost if self.backend == "asyncssh" else _OpensshHost
            host = cls(self, instance_id, directory, keys, firewall)
            self._loop.run(host.start(), timeout=_START_TIMEOUT + 5)
        except BaseException:
            with self._lock:
                self._hosts.pop(instance_id, None)
            raise
        with self._lock:
            if self._closed:  # close() ran meanwhile: do not leak this host
                self._hosts.pop(instance_id, None)
                closed = True
            else:
                self._hosts[instance_id] = host
                closed = False
        if closed:
            with contextlib.suppress(RerobotsError):
                self._loop.run(host.stop(), timeout=_STOP_TIMEOUT + 5)
            raise RerobotsError("HostManager was closed while the host was starting")
        return HostInfo(port=host.port, hostkey=host.hostkey, directory=directory)

    def stop_host(self, instance_id: str) -> None:
        """Close the host's listener and every live connection; kill what it started.

        Idempotent: an unknown or already stopped id is not an error. A host
        whose ``start_host`` has not returned yet is not stopped: its caller
        stops it once it is up.
        """
        with self._lock:
            host = self._hosts.get(instance_id)
            if host is None:  # unknown, stopped, or still starting (start_host cleans up)
                return
            del self._hosts[instance_id]
        self._loop.run(host.stop(), timeout=_STOP_TIMEOUT + 5)

    def close(self) -> None:
        """Stop every host, then the event loop thread and the firewall workers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            hosts = [h for h in self._hosts.values() if h is not None]
            self._hosts.clear()
        try:
            if hosts:
                self._loop.run(_gather(*(h.stop() for h in hosts)), timeout=_STOP_TIMEOUT + 5)
        finally:
            self._loop.close()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._finalizer()  # anything a host failed to stop

    def check(self) -> None:
        """Raise the first unexpected error seen in the hosts' thread since the last check.

        Errors of the calls themselves (``start_host`` and so on) reach their
        caller directly; this is for what happened in the background, such as a
        firewall callable that raised. Raising forgets them.
        """
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise RerobotsError(f"simulated host failed: {errors[0]!r}") from errors[0]

    def __enter__(self) -> HostManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RerobotsError("HostManager is closed")

    def _record_error(self, exc: BaseException) -> None:
        log.error("simulated host error", exc_info=exc)
        with self._lock:
            self._errors.append(exc)

    async def _ask_firewall(self, firewall: Callable[[str], str], src: str) -> str:
        loop = asyncio.get_running_loop()
        try:
            verdict = await loop.run_in_executor(self._executor, firewall, src)
        except Exception as exc:
            self._record_error(exc)
            return "REJECT"
        if not isinstance(verdict, str) or verdict.upper() not in {"ACCEPT", "DROP", "REJECT"}:
            self._record_error(ValueError(f"firewall returned {verdict!r} for {src}"))
            return "REJECT"
        return verdict.upper()


# -- the event loop thread ---------------------------------------------------


class _LoopThread:
    """One asyncio event loop running in one daemon thread."""

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self.loop = asyncio.new_event_loop()
        self._on_error = on_error
        self.loop.set_exception_handler(self._handle_exception)
        self._thread = threading.Thread(
            target=self._main, name="rerobots-sim-hosts", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _handle_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # A peer that vanishes mid-write is routine for a test server.
        if isinstance(exc, (ConnectionError, asyncssh.Error)):
            return
        self._on_error(exc or RuntimeError(context.get("message", "event loop error")))

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float) -> T:
        """Run ``coro`` on the loop and return its result here, or raise its error here."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise RerobotsError(f"simulated host did not answer within {timeout:g} s") from exc

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def _shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_shutdown(), self.loop).result(_STOP_TIMEOUT)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(_STOP_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()


async def _gather(*aws: Awaitable[Any]) -> None:
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


# -- one host ------------------------------------------------------------------


class _Host:
    """What both backends share: the key, the listener, the firewall, cleanup."""

    def __init__(
        self,
        manager: HostManager,
        instance_id: str,
        directory: pathlib.Path,
        authorized: list[str],
        firewall: Callable[[str], str],
    ) -> None:
        self.manager = manager
        self.instance_id = instance_id
        self.directory = directory.resolve()
        self.authorized = authorized
        self.firewall = firewall
        self.marker = f"{instance_id}:{uuid.uuid4().hex}"
        manager._leftovers.markers.add(self.marker)
        key = ec.generate_private_key(ec.SECP256R1())
        self.key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        self.hostkey = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode("ascii")
        self.port = 0
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._socks: set[socket.socket] = set()

    # The backends fill these in.
    async def _start_server(self) -> None:
        raise NotImplementedError

    async def _serve(self, sock: socket.socket) -> None:
        raise NotImplementedError

    async def _close_connections(self) -> None:
        raise NotImplementedError

    async def _stop_server(self) -> None:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """The environment of a session on this host, like sshd's plus the marker."""
        user = "root"
        return {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(self.directory),
            "PWD": str(self.directory),
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/sh",
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            _MARKER_VAR: self.marker,
        }

    async def start(self) -> None:
        try:
            await self._start_server()
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
            self._listener = listener
            self.port = listener.getsockname()[1]
            self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())
        except BaseException:
            await self.stop()
            raise

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                sock, addr = await loop.sock_accept(self._listener)
            except OSError as exc:  # EMFILE and friends: keep serving
                self.manager._record_error(exc)
                await asyncio.sleep(0.1)
                continue
            # Forget sockets that their transports have closed since.
            self._socks = {s for s in self._socks if s.fileno() != -1}
            self._socks.add(sock)
            self._spawn(self._admit(sock, addr[0]))

    async def _admit(self, sock: socket.socket, src: str) -> None:
        try:
            # Nothing is sent before the verdict: a dropped client never sees a banner.
            verdict = await self.manager._ask_firewall(self.firewall, src)
            if self._stopping:
                sock.close()
            elif verdict == "ACCEPT":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await self._serve(sock)
            elif verdict == "DROP":
                await self._hold(sock)
            else:
                _reset(sock)
        finally:
            if sock.fileno() == -1:  # closed here; otherwise a transport still uses it
                self._socks.discard(sock)

    async def _hold(self, sock: socket.socket) -> None:
        """Read and discard until the client gives up; never answer."""
        loop = asyncio.get_running_loop()
        try:
            while await loop.sock_recv(sock, _CHUNK):
                pass
        except OSError:
            pass
        sock.close()

    async def stop(self) -> None:
        """Close the listener and every connection; kill every process of this host."""
        self._stopping = True
        # Stop accepting before closing the listener: asyncio must unregister
        # its file descriptor while that number still means this socket.
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await self._close_connections()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in list(self._socks):
            # A dropped or half-admitted connection: nobody else owns it any more.
            sock.close()
        self._socks.clear()
        await self._stop_server()
        await _kill_marked(self.marker)
        self.manager._leftovers.markers.discard(self.marker)
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove private files; the host's directory stays."""


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the kernel answers with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- backend: asyncssh -------------------------------------------------------------


class _AsyncsshHost(_Host):
    """An in-process asyncssh server on this host's sockets."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._options: asyncssh.SSHServerConnectionOptions | None = None
        self._allowed = {asyncssh.import_public_key(line).public_data for line in self.authorized}
        self._conns: set[asyncssh.SSHServerConnection] = set()
        self._procs: set[asyncio.subprocess.Process] = set()

    async def _start_server(self) -> None:
        home = os.fsencode(self.directory)
        self._options = await asyncssh.SSHServerConnectionOptions.construct(
            server_factory=lambda: _SSHServer(self),
            server_host_keys=[asyncssh.import_private_key(self.key_pem)],
            process_factory=self._handle_process,
            sftp_factory=lambda chan: _HomeSFTPServer(chan, home),
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
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
            _killpg(proc.pid)

    async def _stop_server(self) -> None:
        procs = list(self._procs)
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=5)

    async def _handle_process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        try:
            await self._exec(process)
        except Exception as exc:  # our bug, not the client's: surface it
            self.manager._record_error(exc)
            with contextlib.suppress(Exception):
                process.exit(255)

    async def _exec(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        argv = ["/bin/sh"] if process.command is None else ["/bin/sh", "-c", process.command]
        try:
            transport, proc = await _subprocess(
                *argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.directory,
                env=self.env(),
                # Its own process group, so that a timeout or stop_host kills
                # the command and everything it started, and nothing else.
                start_new_session=True,
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
                _killpg(proc.pid)
            for task in (feeder, closed, outputs):
                task.cancel()
            try:
                await _reap(transport, proc)
            finally:
                self._procs.discard(proc)


class _SSHServer(asyncssh.SSHServer):
    """Per-connection policy: user root, public key only, the host's keys only."""

    def __init__(self, host: _AsyncsshHost) -> None:
        self._host = host
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._host._conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._host._conns.discard(self._conn)

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


class _HomeSFTPServer(asyncssh.SFTPServer):
    """SFTP with relative paths resolved against the host's directory, like sftp-server."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], home: bytes) -> None:
        super().__init__(chan)
        self._home = home

    def map_path(self, path: bytes) -> bytes:
        # posixpath.join keeps absolute paths as they are, as OpenSSH does.
        return posixpath.join(self._home, path)


async def _pump(src: asyncio.StreamReader, dst: asyncssh.SSHWriter[bytes]) -> bool:
    """Copy a command's output to the channel with flow control; True at EOF."""
    try:
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()
    except (OSError, asyncssh.Error):
        return False
    return True


async def _feed(
    process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process
) -> None:
    """Copy the channel's data to the command's stdin; forward signals; close at EOF."""
    assert proc.stdin is not None
    try:
        while True:
            try:
                data = await process.stdin.read(_CHUNK)
            except asyncssh.SignalReceived as exc:
                signum = getattr(signal, "SIG" + exc.signal, None)
                if signum is not None:
                    _killpg(proc.pid, signum)
                continue
            except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged):
                continue
            if not data:
                break
            proc.stdin.write(data)
            await proc.stdin.drain()
    except (OSError, asyncssh.Error):
        pass  # the command stopped reading, or the channel went away
    finally:
        proc.stdin.close()


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


# -- backend: openssh ------------------------------------------------------------

_SESSION_SCRIPT = """\
#!/bin/sh
# sshd runs this for every exec, shell and sftp request (ForceCommand): it puts
# the session in the host's directory with HOME there, whatever passwd says.
{marker_var}={marker}; export {marker_var}
HOME={home}; export HOME
cd "$HOME" || exit 1
if [ -z "${{SSH_ORIGINAL_COMMAND+set}}" ]; then
    /bin/sh
else
    /bin/sh -c "$SSH_ORIGINAL_COMMAND"
fi
# Not exec: the shell reports a command killed by signal n as 128+n.
exit $?
"""

_SSHD_CONFIG = """\
# Private sshd of one simulated rerobots host; written by pytest_rerobots.sim.hosts.
Port {port}
ListenAddress 127.0.0.1
HostKey {private}/host_key
PidFile {private}/sshd.pid
AuthorizedKeysFile {private}/authorized_keys
AllowUsers {user}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
UseDNS no
PermitTTY no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
AllowAgentForwarding no
PermitTunnel no
PermitUserEnvironment no
LoginGraceTime 30
MaxStartups 100:30:200
MaxSessions 100
Subsystem sftp {sftp_server}
ForceCommand {private}/session
# The login shell runs the ForceCommand. Bash run by sshd sources ~/.bashrc, so
# HOME must already be the host's directory here (its .bashrc, if any, as on a
# real host; never the .bashrc of whoever runs the simulator).
SetEnv "HOME={home}" "{marker_var}={marker}"
{extra}"""


class _OpensshHost(_Host):
    """A private OpenSSH sshd behind a firewall-enforcing proxy."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._private: pathlib.Path | None = None
        self._sshd: asyncio.subprocess.Process | None = None
        self._sshd_transport: asyncio.SubprocessTransport | None = None
        self._sshd_port = 0
        self._log: collections.deque[str] = collections.deque(maxlen=200)
        self._links: set[asyncio.StreamWriter] = set()

    async def _start_server(self) -> None:
        if any(c in str(self.directory) for c in '"\\\n'):
            raise ConfigurationError(
                f"the openssh backend cannot quote the host directory {str(self.directory)!r} "
                "in sshd_config; choose a root without quotes, backslashes or newlines"
            )
        private = pathlib.Path(tempfile.mkdtemp(prefix="rerobots-sshd-"))
        self._private = private
        self.manager._leftovers.dirs.add(private)
        key_file = private / "host_key"
        key_file.write_bytes(self.key_pem)
        key_file.chmod(0o600)  # sshd refuses readable host keys whatever StrictModes says
        (private / "authorized_keys").write_text("".join(k + "\n" for k in self.authorized))
        session = private / "session"
        session.write_text(
            _SESSION_SCRIPT.format(
                marker_var=_MARKER_VAR,
                marker=shlex.quote(self.marker),
                home=shlex.quote(str(self.directory)),
            )
        )
        session.chmod(0o755)
        if os.geteuid() == 0:
            # sshd refuses to start without its privilege separation directory,
            # which only the init system normally creates.
            pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        last_error = ""
        for _attempt in range(3):  # a port picked free can be taken before sshd binds it
            self._sshd_port = _free_port()
            config = private / "sshd_config"
            config.write_text(
                _SSHD_CONFIG.format(
                    port=self._sshd_port,
                    private=private,
                    user=self.manager.login_user,
                    sftp_server=self.manager._sftp_server,
                    home=self.directory,
                    marker_var=_MARKER_VAR,
                    marker=self.marker,
                    extra=self.manager._sshd_options,
                )
            )
            self._sshd_transport, self._sshd = await _subprocess(
                SSHD, "-D", "-e", "-f", str(config),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**self.env(), "HOME": str(private)},
                start_new_session=True,
            )
            self.manager._leftovers.pids.add(self._sshd.pid)
            if await self._wait_listening():
                self._spawn(self._drain_log())
                return
            last_error = "\n".join(self._log)
            await self._stop_server()
            if "Address already in use" not in last_error:
                break
        raise RerobotsError(f"sshd for instance {self.instance_id} did not start:\n{last_error}")

    async def _wait_listening(self) -> bool:
        """Read sshd's log until it listens (True) or exits (False)."""
        assert self._sshd is not None and self._sshd.stderr is not None
        stderr = self._sshd.stderr

        async def _read() -> bool:
            while line := await stderr.readline():
                text = line.decode(errors="replace").rstrip()
                self._log.append(text)
                if text.startswith("Server listening on"):
                    return True
            return False

        try:
            return await asyncio.wait_for(_read(), _START_TIMEOUT)
        except asyncio.TimeoutError:
            self._log.append(f"(no 'Server listening' within {_START_TIMEOUT:g} s)")
            return False

    async def _drain_log(self) -> None:
        # sshd -e logs every connection; a full pipe would stall it.
        assert self._sshd is not None and self._sshd.stderr is not None
        while line := await self._sshd.stderr.readline():
            self._log.append(line.decode(errors="replace").rstrip())

    async def _serve(self, sock: socket.socket) -> None:
        client_r, client_w = await asyncio.open_connection(sock=sock)
        self._links.add(client_w)
        try:
            try:
                sshd_r, sshd_w = await asyncio.open_connection("127.0.0.1", self._sshd_port)
            except OSError:
                _reset_transport(client_w)
                return
            self._links.add(sshd_w)
            await asyncio.gather(_splice(client_r, sshd_w), _splice(sshd_r, client_w))
            sshd_w.close()
            self._links.discard(sshd_w)
            client_w.close()
        finally:
            self._links.discard(client_w)

    async def _close_connections(self) -> None:
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def _stop_server(self) -> None:
        sshd, self._sshd = self._sshd, None
        transport, self._sshd_transport = self._sshd_transport, None
        if sshd is None or transport is None:
            return
        children: list[int] = []
        if sshd.returncode is None:
            # sshd's per-connection children outlive a SIGTERM to the listener
            # by design, so they are signalled by pid too.
            children = _descendants(sshd.pid)
            with contextlib.suppress(ProcessLookupError):
                sshd.terminate()
            _signal_all(children, signal.SIGTERM)
        reaping = asyncio.ensure_future(_reap(transport, sshd))
        try:
            await asyncio.wait_for(asyncio.shield(reaping), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                sshd.kill()
            await reaping
        # Only what still is an sshd: a pid freed since may be someone else's now.
        _signal_all([pid for pid in children if "sshd" in _cmdline(pid)], signal.SIGKILL)
        self.manager._leftovers.pids.discard(sshd.pid)

    def _cleanup(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self.manager._leftovers.dirs.discard(self._private)


async def _reap(transport: asyncio.SubprocessTransport, proc: asyncio.subprocess.Process) -> None:
    """Wait for a process that was killed or has ended, then close its transport.

    The pipes are closed first: ``wait()`` also waits for them, and a pipe
    that nobody reads any more (a killed command's stdout, paused because its
    buffer is full) would never report EOF.
    """
    try:
        for fd in (0, 1, 2):
            pipe = transport.get_pipe_transport(fd)
            if pipe is not None:
                pipe.close()
        await proc.wait()
    finally:
        transport.close()


async def _subprocess(
    *argv: str, **kwargs: Any
) -> tuple[asyncio.SubprocessTransport, asyncio.subprocess.Process]:
    """``asyncio.create_subprocess_exec``, also returning the transport.

    The transport must be closed explicitly when a pipe was not read to EOF
    (a killed command, sshd's log): asyncio would warn about it otherwise.
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=_CHUNK, loop=loop),
        *argv,
        **kwargs,
    )
    return transport, asyncio.subprocess.Process(transport, protocol, loop)


async def _splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


def _reset_transport(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- helpers -------------------------------------------------------------------------


def _check_openssh() -> None:
    if not os.access(SSHD, os.X_OK):
        raise ConfigurationError(
            f"the openssh host backend needs {SSHD}, which is missing "
            "(Debian: apt-get install openssh-server); use the asyncssh backend instead"
        )


def _sftp_server() -> str:
    for path in _SFTP_SERVERS:
        if os.access(path, os.X_OK):
            return path
    raise ConfigurationError(
        "the openssh host backend needs OpenSSH's sftp-server "
        f"(looked in {', '.join(_SFTP_SERVERS)})"
    )


def _sshd_version_options() -> str:
    """Options that only some sshd versions know."""
    out = subprocess.run([SSHD, "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stderr + out.stdout)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    # OpenSSH 9.8 penalises sources that fail to log in; behind our proxy every
    # connection comes from 127.0.0.1, so one wrong key would lock everyone out.
    return "PerSourcePenalties no\n" if version >= (9, 8) else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parse_authorized_keys(lines: list[str]) -> list[str]:
    keys = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigurationError(f"not an OpenSSH public key: {line[:60]!r}") from exc
        keys.append(line)
    return keys


def _populate(directory: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = pathlib.PurePosixPath(rel)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ConfigurationError(f"host file {rel!r} must be a relative path inside the host")
        target = directory.joinpath(*path.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        if text.startswith("#!"):
            target.chmod(0o755)


def _run_setup_command(instance_id: str, directory: pathlib.Path, command: str) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(directory),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_SETUP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigurationError(
            f"setup command of instance {instance_id} ran over {_SETUP_TIMEOUT:g} s: {command!r}"
        ) from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
        raise ConfigurationError(
            f"setup command of instance {instance_id} exited with status {done.returncode}: "
            f"{command!r}" + (f"\n{tail}" if tail else "")
        )


def _killpg(pid: int, signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _proc_table() -> dict[int, int]:
    """pid -> parent pid for every process we can see (empty without /proc)."""
    table = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            # The command name may hold spaces and parentheses; fields follow the last ')'.
            fields = stat[stat.rfind(b")") + 2 :].split()
            table[int(entry.name)] = int(fields[1])
    return table


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, parent in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class _Leftovers:
    """What the hosts of one manager have started and not yet cleaned up.

    ``markers`` of hosts not fully stopped; ``pids`` of sshd listeners (sshd
    overwrites its environment with its process title, so no marker finds
    it); ``dirs``, the private sshd directories holding host keys.
    """

    markers: set[str] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    dirs: set[pathlib.Path] = field(default_factory=set)

    def clean(self) -> None:
        """Last resort for a manager that was never closed: SIGKILL by pid, remove dirs."""
        _signal_all(list(self.pids), signal.SIGKILL)
        _kill_marked_now(self.markers)
        for path in list(self.dirs):
            shutil.rmtree(path, ignore_errors=True)


def _kill_marked_now(markers: Collection[str]) -> list[int]:
    """SIGKILL every process whose environment carries one of ``markers``; return their pids."""
    needles = [f"{_MARKER_VAR}={marker}".encode() + b"\0" for marker in list(markers)]
    if not needles:
        return []
    me = os.getpid()
    victims = []
    for pid in _proc_table():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read() + b"\0"
        except OSError:
            continue
        if any(needle in environ for needle in needles):
            victims.append(pid)
    _signal_all(victims, signal.SIGKILL)
    return victims


async def _kill_marked(marker: str) -> None:
    """Kill every process of this host, by pid, until none is left (three rounds at most).

    The marker in their environment reaches what a command left running in the
    background after its session ended, which no parent or process group leads
    us to any more.
    """
    for _round in range(3):
        if not _kill_marked_now([marker]):
            return
        await asyncio.sleep(0.05)
