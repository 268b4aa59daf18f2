"""Starting the ``rerobots-sim`` command in a process of its own and reading where it serves.

:func:`start_process` runs ``python -m pytest_rerobots.sim --port 0 ...``, waits for the two
lines it prints once it serves (``REROBOTS_API_URL=...``, ``REROBOTS_API_TOKEN=...``) and
returns a :class:`SimProcess`; :meth:`SimProcess.stop` ends that one process, by its id
(SIGTERM, then SIGKILL if it outlives the grace period). For benchmarks and tests that need
the simulator outside their own process; in-process use is :class:`~pytest_rerobots.sim.Simulator`.
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["SimProcess", "read_lines", "start_process"]


@dataclass
class SimProcess:
    """A running ``rerobots-sim``: its process, the API's ``url`` and ``token``, and the
    ``lines`` it printed first."""

    proc: subprocess.Popen[bytes]
    url: str
    token: str
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status.
        Idempotent."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        status = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return status

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_process(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    nofile: int | None = None,
    timeout: float = 30.0,
    **popen: Any,
) -> SimProcess:
    """Start ``python -m pytest_rerobots.sim --port 0 *args``; return once it serves.

    ``env`` and ``cwd`` are the process's (by default this one's); ``stderr`` where its
    errors go; ``nofile`` lowers its limit of open files; ``popen`` passes further keywords
    to :class:`subprocess.Popen` (``start_new_session=True``, ...). Raises
    :class:`RuntimeError` (after stopping it) if it exits or stays silent for ``timeout``
    seconds before both lines.
    """
    preexec = None
    if nofile is not None:
        limit = nofile

        def preexec() -> None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))

    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_rerobots.sim", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=stderr, env=None if env is None else dict(env),
        cwd=cwd, preexec_fn=preexec, **popen,
    )
    try:
        lines = read_lines(proc, 2, timeout)
        seen = dict(line.partition("=")[::2] for line in lines)
        return SimProcess(proc, seen["REROBOTS_API_URL"], seen["REROBOTS_API_TOKEN"], lines)
    except BaseException:
        SimProcess(proc, "", "").stop()
        raise


def read_lines(proc: subprocess.Popen[Any], count: int, timeout: float) -> list[str]:
    """The first ``count`` lines of the process's output, read unbuffered: a buffered reader
    could take both lines at once and leave the selector nothing to report."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while data.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(timeout=remaining):
                raise RuntimeError(f"the simulator printed no address in {timeout} s; "
                                   f"got {data!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the simulator exited ({proc.poll()}); got {data!r}")
            data += chunk
    return data.decode().splitlines()[:count]
