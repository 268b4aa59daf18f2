"""The watchdog: a detached process that ends what its pytest process did not release
(layer 3 of docs/contract.md, "Termination"), and the :class:`Watchdog` that feeds it.

The process is ``python -m pytest_rerobots.watchdog`` (started by :func:`.procs.spawn`).
Nothing here imports pytest; the client loads in the watchdog process only when it has
something to end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

from . import procs
from .ending import end_ids
from .ledger import Ledger
from .outcome import ENDED_OUTCOMES, Outcome
from .settings import Secret
from .xdist_pool import SharedPool

if TYPE_CHECKING:
    from .instance import FailedRental, Instance

__all__ = ["Watchdog"]

log = logging.getLogger("pytest_rerobots.watchdog")


class Watchdog:
    """A detached process that terminates what this process did not release.

    Started with the first instance (one per pytest process), in its own session
    so that signals to our process group do not reach it, and in this package's
    directory so that nothing in the user's working directory shadows an import.
    It reads JSON lines from a pipe: a header (API origin, token, ledger), then
    ``{"rent": id}`` and ``{"release": id}``. When the pipe closes (we exited,
    cleanly or not) it terminates every id still rented, waiting out INIT for up
    to ``deadline`` s, records the ends in the ledger, and exits. The token travels
    through the pipe, never on a command line. Also an instance listener.
    """

    def __init__(self, api_url: str, token: str | None, *, ledger: Ledger | None = None,
                 deadline: float = 180.0, notfound_grace: float = 30.0) -> None:
        self.api_url = api_url
        self._token = Secret(token) if token else None  # vars(watchdog) never shows it
        self.ledger = ledger
        self.deadline = deadline
        self.notfound_grace = notfound_grace
        self.process: subprocess.Popen[bytes] | None = None
        self._rented: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Watchdog(api_url={self.api_url!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def rent(self, instance_id: str, shared: tuple[str, str] | None = None) -> None:
        """Protect ``instance_id``: it is terminated if this process dies holding it,
        unless it is ``shared`` (a SharedPool directory and key) and other users live."""
        with self._lock:
            message = {"rent": instance_id, "at": time.time(), "shared": shared}
            self._rented[instance_id] = message
            if self.process is None or self.process.poll() is not None:
                self._spawn()  # also re-sends what an earlier watchdog held
            else:
                self._write(message)

    def release(self, instance_id: str) -> None:
        """``instance_id`` ended: the watchdog forgets it."""
        with self._lock:
            self._rented.pop(instance_id, None)
            if self.process is not None and self.process.poll() is None:
                self._write({"release": instance_id})

    def _spawn(self) -> None:
        if self.process is not None:  # it died (killed by someone); poll() reaped it
            if self.process.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.process.stdin.close()
        self.process = procs.spawn("pytest_rerobots.watchdog")
        ledger = None
        if self.ledger is not None:
            ledger = {"path": os.path.abspath(self.ledger.path), "run": self.ledger.run_id,
                      "api_url": self.ledger.api_url}
        # (No local variable holds the token: pytest's -l would print it.)
        self._write({"api_url": self.api_url,
                     "token": self._token.reveal() if self._token else None,
                     "deadline": self.deadline,
                     "notfound_grace": self.notfound_grace, "ledger": ledger,
                     "parent": os.getpid()})
        for message in self._rented.values():
            self._write(message)

    def _write(self, message: dict[str, Any]) -> None:
        assert self.process is not None and self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except (OSError, ValueError) as exc:  # it died: the next rent starts another
            log.warning("rerobots watchdog %s is gone: %s", self.process.pid, exc)

    # The instance-listener protocol.
    def rented(self, instance: Instance) -> None:
        if instance.id:
            self.rent(instance.id, shared=instance.shared_key)

    def progress(self, instance: Instance) -> None:
        pass

    def ended(self, instance: Instance) -> None:
        # "handed over": another process uses it now and ends it (xdist shared mode);
        # "kept": a keeper process holds it (pytest_rerobots.keep).
        if instance.id and (instance.outcome in ENDED_OUTCOMES
                            or instance.outcome in (Outcome.HANDED_OVER, Outcome.KEPT)):
            self.release(instance.id)

    def replaced(self, instance: Instance, failed: FailedRental) -> None:
        if failed.outcome in ENDED_OUTCOMES:
            self.release(failed.id)

    def reserved(self, instance: Instance, reservation: str) -> None:
        self.rent(reservation)  # ends it by cancelling it, or ends what it became

    def unreserved(self, instance: Instance, reservation: str) -> None:
        self.release(reservation)

    def close(self, timeout: float = 5.0) -> None:
        """Close the pipe: the watchdog ends what is unreleased, then exits. Waits for
        it (bounded) so that no watchdog outlives a clean run."""
        with self._lock:
            proc, self.process = self.process, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Still terminating something: it finishes on its own (it is detached).
            # A thread waits for it so that it leaves no zombie, and so that this
            # Popen is not dropped while its process runs (Popen warns about that).
            log.warning("rerobots watchdog %s is still ending instances", proc.pid)
            threading.Thread(target=proc.wait, name="rerobots-watchdog-reaper",
                             daemon=True).start()


def _others_hold(directory: str, key: str, dead: int, instance_id: str) -> bool:
    """Whether live processes other than ``dead`` still use shared ``instance_id``."""
    try:
        return SharedPool(directory).abandon(key, dead, instance_id)
    except OSError:
        return False  # the run's directory is gone: nobody is left to end it


def _watchdog_main(stream: IO[bytes]) -> int:
    """The watchdog process: read the pipe until it closes, then end what is left."""
    # Loaded here: a watchdog that has nothing left to end never loads requests.
    from .client import RerobotsClient

    try:
        header = json.loads(stream.readline() or b"{}")
    except ValueError:
        return 2
    rented: dict[str, float] = {}
    shared: dict[str, tuple[str, str]] = {}
    for raw in iter(stream.readline, b""):
        try:
            message = json.loads(raw)
        except ValueError:
            continue  # a line torn by the writer's death
        if "rent" in message:
            rented[str(message["rent"])] = float(message.get("at") or time.time())
            if message.get("shared"):
                shared[str(message["rent"])] = tuple(message["shared"])
        elif "release" in message:
            rented.pop(str(message["release"]), None)
    # A shared instance that other live workers still use is theirs to end.
    parent = int(header.get("parent") or 0)
    for ident, (directory, key) in shared.items():
        if ident in rented and _others_hold(directory, key, parent, ident):
            rented.pop(ident)
    if not rented:
        return 0
    ledger = None
    if header.get("ledger"):
        info = header["ledger"]
        ledger = Ledger(info["path"], run_id=info.get("run", ""), api_url=info.get("api_url", ""))
    # The server may not list an instance for a while after POST /new answered:
    # a 404 counts as "not yet" until the newest rent is that old.
    grace = float(header.get("notfound_grace", 30.0)) - (time.time() - max(rented.values()))
    with RerobotsClient(header.get("token"), header.get("api_url"), ignore_env=True) as client:
        results = end_ids(client, rented, deadline=float(header.get("deadline", 180.0)),
                          notfound_grace=max(0.0, grace), ledger=ledger, by="watchdog")
    return 0 if all(o in ENDED_OUTCOMES for o in results.values()) else 1


def _main(argv: list[str]) -> int:
    if argv:
        print("usage: python -m pytest_rerobots.watchdog   (settings on stdin)",
              file=sys.stderr)
        return 2
    procs.ignore_terminal_signals()
    return _watchdog_main(sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
