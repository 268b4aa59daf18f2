"""What both SSH backends share: one host's key, listener, firewall and cleanup.

A :class:`Host` listens on ``127.0.0.1`` with an ephemeral port and shows every new TCP
connection to the instance's firewall before anything is sent: ``ACCEPT`` hands it to the
backend's SSH server, ``DROP`` holds it silent (no banner ever) and ``REJECT`` resets it.
A backend fills in :meth:`Host._start_server`, :meth:`Host._serve`,
:meth:`Host._close_connections` and :meth:`Host._stop_server`. Hosts run on the manager's
event loop and reach the manager only through a :class:`HostContext`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import pathlib
import socket
import struct
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .processes import CHUNK, MARKER_VAR, Leftovers, kill_marked
from .sandbox import PATH, Sandbox

__all__ = ["FIREWALL_VERDICTS", "SFTP_SERVERS", "Host", "HostContext", "find_sftp_server",
           "reset"]

FIREWALL_VERDICTS = frozenset({"ACCEPT", "DROP", "REJECT"})
#: Where Debian, Fedora/RHEL and Arch put OpenSSH's sftp-server.
SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
)


def find_sftp_server() -> str | None:
    """The path of OpenSSH's sftp-server, or None where it is not installed."""
    return next((path for path in SFTP_SERVERS if os.access(path, os.X_OK)), None)


@dataclass(frozen=True)
class HostContext:
    """What a host needs from its manager.

    ``executor`` runs the firewall callables (never on the loop: the simulator may call
    ``stop_host`` while holding the very lock its firewall callable needs); ``leftovers``
    records what the host started until it has cleaned up; ``record_error`` reports an
    unexpected error of the background work.
    """

    executor: concurrent.futures.Executor
    leftovers: Leftovers
    record_error: Callable[[BaseException], None]


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the kernel answers with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Host:
    """One host: the key, the listener, the firewall, cleanup."""

    def __init__(
        self,
        context: HostContext,
        instance_id: str,
        directory: pathlib.Path,
        authorized: list[str],
        firewall: Callable[[str], str],
    ) -> None:
        self.context = context
        self.instance_id = instance_id
        self.directory = directory.resolve()
        self.authorized = authorized
        self.firewall = firewall
        #: The robot's sandbox (set by the manager before :meth:`start`), or None.
        self.sandbox: Sandbox | None = None
        self.marker = f"{instance_id}:{uuid.uuid4().hex}"
        context.leftovers.markers.add(self.marker)
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
        #: A network partition (:meth:`partition`): nothing answers, nothing is closed.
        self.partitioned = False
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

    async def _freeze_connections(self) -> None:
        raise NotImplementedError

    async def partition(self) -> None:
        """A network partition until the host stops: its connections stay open but nothing
        is read from them or sent on them; a new connection is held silent."""
        self.partitioned = True
        await self._freeze_connections()

    async def drop_connections(self) -> None:
        """Drop every SSH connection (and what its sessions run); keep listening."""
        await self._close_connections()

    def argv(self, *command: str) -> list[str]:
        """``command`` as run on this robot: inside its sandbox, if it has one."""
        return self.sandbox.argv(*command) if self.sandbox is not None else list(command)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """What a process started with :meth:`argv` must inherit."""
        return self.sandbox.pass_fds if self.sandbox is not None else ()

    def env(self) -> dict[str, str]:
        """The environment of a session on this host, like sshd's plus the marker.

        In a sandbox nothing comes from the runner's environment."""
        user = "root"
        sandboxed = self.sandbox is not None
        return {
            "PATH": PATH if sandboxed else os.environ.get("PATH", PATH),
            "HOME": str(self.directory),
            "PWD": str(self.directory),
            "USER": user,
            "LOGNAME": user,
            "SHELL": "/bin/sh",
            "LANG": "C.UTF-8" if sandboxed else os.environ.get("LANG", "C.UTF-8"),
            MARKER_VAR: self.marker,
        }

    async def start(self) -> None:
        """Start the SSH server and the listener; on failure, undo what was started."""
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
                self.context.record_error(exc)
                await asyncio.sleep(0.1)
                continue
            # Forget sockets that their transports have closed since.
            self._socks = {s for s in self._socks if s.fileno() != -1}
            self._socks.add(sock)
            self._spawn(self._admit(sock, addr[0]))

    async def _ask_firewall(self, src: str) -> str:
        loop = asyncio.get_running_loop()
        try:
            verdict = await loop.run_in_executor(self.context.executor, self.firewall, src)
        except Exception as exc:
            self.context.record_error(exc)
            return "REJECT"
        if not isinstance(verdict, str) or verdict.upper() not in FIREWALL_VERDICTS:
            self.context.record_error(ValueError(f"firewall returned {verdict!r} for {src}"))
            return "REJECT"
        return verdict.upper()

    async def _admit(self, sock: socket.socket, src: str) -> None:
        try:
            # Nothing is sent before the verdict: a dropped client never sees a banner.
            verdict = await self._ask_firewall(src)
            if self._stopping:
                sock.close()
            elif self.partitioned or verdict == "DROP":
                await self._hold(sock)
            elif verdict == "ACCEPT":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await self._serve(sock)
            else:
                reset(sock)
        finally:
            if sock.fileno() == -1:  # closed here; otherwise a transport still uses it
                self._socks.discard(sock)

    async def _hold(self, sock: socket.socket) -> None:
        """Read and discard until the client gives up; never answer."""
        loop = asyncio.get_running_loop()
        try:
            while await loop.sock_recv(sock, CHUNK):
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
        if self.sandbox is not None:
            # Its init's death ends every process of the robot; off the loop, it waits.
            await asyncio.get_running_loop().run_in_executor(None, self.sandbox.stop)
            for pid in (self.sandbox.pid, self.sandbox.bwrap_pid):
                self.context.leftovers.pids.discard(pid)
        await kill_marked(self.marker)
        self.context.leftovers.markers.discard(self.marker)
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove private files; the host's directory stays."""
