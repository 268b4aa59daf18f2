"""Termination layers that hold when the run itself is killed.

The five layers (SPEC "Termination is guaranteed"), and where each lives:

1. ``try/finally`` from the moment ``POST /new`` answers: :class:`.instance.Instance`.
2. SIGTERM and SIGHUP become ``KeyboardInterrupt``; repeats are ignored while
   teardown runs: :class:`SignalGuard`. Under xdist the controller also ends
   every live instance of the run that the ledger holds: :func:`end_all`.
3. A detached :class:`Watchdog` process, fed through a pipe, ends whatever was
   not released when the pipe closes (SIGKILL, ``os._exit``, a crashed worker).
4. Server side: ``keepalive: true`` and ``expire_d`` on every ``POST /new``
   (:class:`.instance.Instance`).
5. The :class:`Ledger` and ``pytest --rerobots-sweep`` (:func:`sweep`).

Every layer is idempotent: ending an instance twice is success the second time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import RerobotsError

if TYPE_CHECKING:
    from .client import RerobotsClient
    from .instance import Instance

__all__ = ["Ledger", "SignalGuard", "Watchdog", "end_all", "sweep"]

log = logging.getLogger("pytest_rerobots.guard")


# -- layer 5: the ledger ------------------------------------------------------------


class Ledger:
    """JSON lines recording every instance rented from this checkout, and how it ended.

    Each event is one ``write`` to a file opened with ``O_APPEND`` under an
    exclusive ``flock`` and fsynced, so concurrent xdist workers never
    interleave lines and a SIGKILL right after ``POST /new`` loses nothing.
    Also an instance listener (``rented``/``ended``).
    """

    def __init__(self, path: str | os.PathLike[str], *, run_id: str = "",
                 api_url: str = "") -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.api_url = api_url

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def record_rented(self, instance_id: str, target: str) -> None:
        self._append({"event": "rented", "id": instance_id, "target": target,
                      "api_url": self.api_url, "run": self.run_id, "pid": os.getpid(),
                      "time": time.time()})

    def record_ended(self, instance_id: str, outcome: str) -> None:
        self._append({"event": "ended", "id": instance_id, "outcome": outcome,
                      "run": self.run_id, "time": time.time()})

    # The instance-listener protocol.
    def rented(self, instance: Instance) -> None:
        if instance.id:
            self.record_rented(instance.id, instance.target)

    def progress(self, instance: Instance) -> None:
        pass

    def ended(self, instance: Instance) -> None:
        # Only a confirmed end takes it off the ledger; a failed terminate stays live.
        if instance.id and instance.outcome in ("terminated", "already ended", "not found"):
            self.record_ended(instance.id, instance.outcome)

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, oldest first (a torn last line is skipped)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    out.append(item)
        return out

    def live(self, *, run_id: str | None = None) -> list[dict[str, Any]]:
        """Rented records with no ``ended`` record after them (of one run, if given)."""
        rented: dict[str, dict[str, Any]] = {}
        for item in self.records():
            if item.get("event") == "rented":
                rented[item["id"]] = item
            elif item.get("event") == "ended":
                rented.pop(item["id"], None)
        return [r for r in rented.values() if run_id is None or r.get("run") == run_id]


# -- ending many at once ------------------------------------------------------------


def end_all(
    client: RerobotsClient,
    ids: Iterable[str],
    *,
    deadline: float = 120.0,
    ledger: Ledger | None = None,
) -> dict[str, str]:
    """Terminate every id in parallel; ``{id: outcome}`` where a failure's outcome
    starts with ``"failed:"``. Each success is recorded in ``ledger``. Never raises
    for one instance's trouble."""
    from .instance import end

    def one(ident: str) -> tuple[str, str]:
        try:
            outcome = end(client, ident, deadline=deadline)
        except RerobotsError as exc:
            outcome = f"failed: {exc}"
        if ledger is not None and not outcome.startswith("failed"):
            ledger.record_ended(ident, outcome)
        return ident, outcome

    ids = list(dict.fromkeys(ids))
    if not ids:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
        return dict(pool.map(one, ids))


def sweep(client: RerobotsClient, ledger: Ledger, write: Callable[[str], None]) -> int:
    """Terminate every live instance in the ledger, writing one line per id.

    Returns the number that could not be ended (0 = all done).
    """
    live = ledger.live()
    if not live:
        write(f"rerobots sweep: no live instances in {ledger.path}")
        return 0
    results = end_all(client, [r["id"] for r in live], ledger=ledger)
    for ident, outcome in results.items():
        write(f"rerobots sweep: {ident} {outcome}")
    return sum(1 for o in results.values() if o.startswith("failed"))


# -- layer 2: signals ----------------------------------------------------------------


class SignalGuard:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread, as SIGINT does,
    so pytest runs teardown. Once one arrived, repeats (SIGINT included) are ignored for
    ``grace`` seconds so that teardown can finish terminating instances.

    Installed only from the main thread; previous handlers are restored by
    :meth:`uninstall` and called (chained) when they were Python callables.
    """

    SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")

    def __init__(self, grace: float = 30.0) -> None:
        self.grace = grace
        self.first_at: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            previous = signal.getsignal(signum)
            if signum == signal.SIGINT and previous is not signal.default_int_handler:
                continue  # somebody else owns SIGINT; leave it alone
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.first_at is not None and now - self.first_at < self.grace:
            # Teardown is under way: a second signal must not abort it.
            sys.stderr.write(f"\nrerobots: {signal.Signals(signum).name} ignored while "
                             "instances are being terminated\n")
            return
        self.first_at = now
        previous = self._previous.get(signum)
        if callable(previous) and previous not in (signal.default_int_handler, self._handle):
            previous(signum, frame)
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


# -- layer 3: the watchdog -----------------------------------------------------------


class Watchdog:
    """A detached process that terminates what this process did not release.

    Started with the first instance (one per pytest process), in its own session
    so signals to our process group do not reach it. It reads JSON lines from a
    pipe: ``{"rent": id}`` and ``{"release": id}``. When the pipe closes (we
    exited, cleanly or not) it terminates every id still rented, waiting out INIT,
    and exits. The token travels through the pipe, never argv.
    Also an instance listener.
    """

    def __init__(self, api_url: str, token: str | None, *, deadline: float = 180.0) -> None:
        self.api_url = api_url
        self._token = token
        self.deadline = deadline
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:
            if self.process is None:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "pytest_rerobots.guard", "watchdog"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    start_new_session=True, close_fds=True,
                )
                self._write({"api_url": self.api_url, "token": self._token,
                             "deadline": self.deadline})
            self._write(message)

    def _write(self, message: dict[str, Any]) -> None:
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except OSError as exc:  # the watchdog died: the other layers still stand
            log.warning("rerobots watchdog is gone: %s", exc)

    def rented(self, instance: Instance) -> None:
        if instance.id:
            self._send({"rent": instance.id})

    def progress(self, instance: Instance) -> None:
        pass

    def ended(self, instance: Instance) -> None:
        if instance.id and instance.outcome in ("terminated", "already ended", "not found"):
            self._send({"release": instance.id})

    def close(self, timeout: float = 5.0) -> None:
        """Close the pipe; the watchdog ends what is unreleased, then exits. Waits for it
        (bounded) so no watchdog outlives a clean run."""
        with self._lock:
            proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Still terminating something: let it finish on its own (it is detached).
            log.warning("rerobots watchdog %s still ending instances", proc.pid)


def _watchdog_main(stream: IO[bytes]) -> int:
    """The watchdog process: read the pipe until it closes, then end what is left."""
    from .client import RerobotsClient

    header = json.loads(stream.readline() or b"{}")
    rented: dict[str, None] = {}
    for raw in iter(stream.readline, b""):
        with contextlib.suppress(ValueError):
            message = json.loads(raw)
            if "rent" in message:
                rented[message["rent"]] = None
            elif "release" in message:
                rented.pop(message["release"], None)
    if not rented:
        return 0
    with RerobotsClient(header.get("token"), header.get("api_url"), ignore_env=True) as client:
        results = end_all(client, rented, deadline=float(header.get("deadline", 180.0)))
    return 0 if all(not o.startswith("failed") for o in results.values()) else 1


def _main(argv: list[str]) -> int:
    if argv[:1] == ["watchdog"]:
        # Ignore the signals a dying run's process group may still receive.
        # (SIGTERM still stops it, for an operator who means it.)
        for name in ("SIGINT", "SIGHUP"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        return _watchdog_main(sys.stdin.buffer)
    print("usage: python -m pytest_rerobots.guard watchdog", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
