"""Process utilities of the hosts: subprocesses on the event loop, signals, and cleanup by pid.

Everything a host starts carries a per-host marker (``REROBOTS_SIM_HOST=<marker>``) in its
environment, so that what a command left running in the background, which no parent or
process group leads to any more, is still found through ``/proc`` and killed by pid.
:class:`Leftovers` is the last resort of a manager that was never closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pathlib
import shutil
import signal
import struct
import termios
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHUNK",
    "MARKER_VAR",
    "Leftovers",
    "children",
    "cmdline",
    "descendants",
    "kill_marked",
    "kill_marked_now",
    "killpg",
    "reap",
    "set_window_size",
    "signal_all",
    "subprocess_exec",
    "take_terminal",
]

#: The environment variable that carries a host's marker.
MARKER_VAR = "REROBOTS_SIM_HOST"
#: Read size of pipes and sockets.
CHUNK = 65536


async def subprocess_exec(
    *argv: str, **kwargs: Any
) -> tuple[asyncio.SubprocessTransport, asyncio.subprocess.Process]:
    """``asyncio.create_subprocess_exec``, also returning the transport.

    The transport must be closed explicitly when a pipe was not read to EOF
    (a killed command, sshd's log): asyncio would warn about it otherwise.
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: asyncio.subprocess.SubprocessStreamProtocol(limit=CHUNK, loop=loop),
        *argv,
        **kwargs,
    )
    return transport, asyncio.subprocess.Process(transport, protocol, loop)


async def reap(transport: asyncio.SubprocessTransport, proc: asyncio.subprocess.Process) -> None:
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


def killpg(pid: int, signum: int = signal.SIGKILL) -> None:
    """Signal the process group led by ``pid``, if it still exists."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def take_terminal() -> None:
    """Make stdin, a terminal, the controlling terminal of this process, which must lead a
    session of its own without one: a ``preexec_fn`` after ``start_new_session``."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_window_size(fd: int, columns: int, rows: int, xpixels: int = 0,
                    ypixels: int = 0) -> None:
    """Set the size of the terminal ``fd`` (either side of a pty); the kernel sends
    ``SIGWINCH`` to the terminal's foreground process group when it changes."""
    clamped = (min(max(n, 0), 0xFFFF) for n in (rows, columns, xpixels, ypixels))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", *clamped))


def signal_all(pids: list[int], signum: int) -> None:
    """Signal each of ``pids`` that still exists."""
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


def cmdline(pid: int) -> str:
    """The command line of ``pid``, or ``""`` once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    return [child for child, parent in _proc_table().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree."""
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
class Leftovers:
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
        signal_all(list(self.pids), signal.SIGKILL)
        kill_marked_now(self.markers)
        for path in list(self.dirs):
            shutil.rmtree(path, ignore_errors=True)


def kill_marked_now(markers: Collection[str]) -> list[int]:
    """SIGKILL every process whose environment carries one of ``markers``; return their pids."""
    needles = [f"{MARKER_VAR}={marker}".encode() + b"\0" for marker in list(markers)]
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
    signal_all(victims, signal.SIGKILL)
    return victims


async def kill_marked(marker: str) -> None:
    """Kill every process of this host, by pid, until none is left (three rounds at most).

    The marker in their environment reaches what a command left running in the
    background after its session ended, which no parent or process group leads
    us to any more.
    """
    for _round in range(3):
        if not kill_marked_now([marker]):
            return
        await asyncio.sleep(0.05)
