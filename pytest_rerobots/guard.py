"""Termination layers that hold when the run itself is killed.

The five layers (docs/contract.md, "Termination"), and where each lives:

1. ``try/finally`` from the moment ``POST /new`` answers: :class:`.instance.Instance`.
2. SIGTERM and SIGHUP become ``KeyboardInterrupt``; repeats are ignored while
   teardown runs: :class:`SignalGuard`. Under xdist the controller also ends
   every live instance of the run that the ledger holds: :func:`end_all`.
3. A detached :class:`Watchdog` process, fed through a pipe, ends whatever was
   not released when the pipe closes (SIGKILL, ``os._exit``, a crashed worker).
4. Server side: ``keepalive: true`` and ``expire_d`` on every ``POST /new``
   (:class:`.instance.Instance`).
5. The :class:`Ledger` and ``pytest --rerobots-sweep`` (:func:`.sweep.sweep`).

Every layer is idempotent: ending an instance twice is success the second time.
Nothing here imports pytest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import procs, safefiles
from .ending import end
from .errors import ConfigurationError
from .outcome import ENDED_OUTCOMES, Outcome
from .settings import Secret
from .xdist_pool import SharedPool

if TYPE_CHECKING:
    from .client import RerobotsClient
    from .instance import FailedRental, Instance

__all__ = ["ENDED_OUTCOMES", "Ledger", "SignalGuard", "Watchdog", "end_all"]

log = logging.getLogger("pytest_rerobots.guard")



# -- layer 5: the ledger ------------------------------------------------------------


class Ledger:
    """JSON lines recording every instance rented from this checkout, and how it ended.

    Each event is one ``write`` to a file opened with ``O_APPEND`` under an
    exclusive ``flock`` and fsynced, so concurrent xdist workers never
    interleave lines and a SIGKILL right after ``POST /new`` loses nothing.
    An ``ended`` record says which layer ended the instance (``by``).
    Also an instance listener (``rented``/``ended``).

    The file is opened without following a symbolic link and used only if it is a
    regular file of this user that group and others cannot write (:mod:`.safefiles`):
    otherwise :class:`.ConfigurationError`. A ``rented`` record carries the SHA-256 of
    the token that rented it, so that a sweep with another token leaves it alone.
    """

    def __init__(self, path: str | os.PathLike[str], *, run_id: str = "",
                 api_url: str = "") -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.api_url = api_url

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, run_id={self.run_id!r})"

    def check(self) -> str | None:
        """Refuse (:class:`.ConfigurationError`) a ledger that another user could have
        planted or could write, or a directory of it that another user owns; a one-line
        warning if that directory is writable by others (such as ``/tmp``), else None.
        Nothing is created."""
        with contextlib.suppress(FileNotFoundError):
            os.close(safefiles.open_file(self.path, "ledger", os.O_RDONLY))
        try:
            st = os.stat(self.path.parent)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            raise safefiles.refuse("ledger's directory", self.path.parent, "is not a directory")
        if st.st_uid not in (0, os.geteuid()):
            raise safefiles.refuse("ledger's directory", self.path.parent,
                                   f"is owned by uid {st.st_uid}, not by this user "
                                   f"(uid {os.geteuid()}) or root")
        if st.st_mode & stat.S_IWOTH:
            sticky = " (sticky)" if st.st_mode & stat.S_ISVTX else ""
            return (f"rerobots: warning: the ledger's directory {self.path.parent} is writable "
                    f"by others{sticky}: another user may plant files beside the ledger "
                    "(refused if seen); a ledger in a directory of your own is safer "
                    "(--rerobots-ledger)")
        return None

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = safefiles.open_file(self.path, "ledger", os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close()
            size = os.fstat(fd).st_size
            # A line torn by a crash (or a full disk) must not swallow ours too.
            # (O_APPEND writes at the end wherever this read leaves the offset.)
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":
                    data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def record_rented(self, instance_id: str, target: str, *,
                      token_sha256: str | None = None) -> None:
        record = {"event": "rented", "id": instance_id, "target": target,
                  "api_url": self.api_url, "run": self.run_id, "pid": os.getpid(),
                  "time": time.time()}
        if token_sha256:
            record["token_sha256"] = token_sha256
        self._append(record)

    def record_ended(self, instance_id: str, outcome: str, *, by: str = "teardown",
                     wtype: str | None = None, deployment: str | None = None) -> None:
        """``by`` names the layer: teardown, controller, watchdog or sweep; or "replaced"
        (a start that failed, ended before another rental took its place)."""
        record = {"event": "ended", "id": instance_id, "outcome": str(outcome), "by": by,
                  "run": self.run_id, "pid": os.getpid(), "time": time.time()}
        # What it ran on: a later rental of that robot may find it still being released.
        record.update({k: v for k, v in (("wtype", wtype), ("deployment", deployment)) if v})
        self._append(record)

    def record_kept(self, instance_id: str, kind: str | None, *, wtype: str | None = None,
                    deployment: str | None = None) -> None:
        """Left running on purpose (for debugging, or for the next run): still live, so
        that ``--rerobots-sweep`` ends it, but no leftover of its run."""
        record = {"event": "kept", "id": instance_id, "outcome": str(Outcome.KEPT),
                  "kind": kind, "run": self.run_id, "pid": os.getpid(), "time": time.time()}
        record.update({k: v for k, v in (("wtype", wtype), ("deployment", deployment)) if v})
        self._append(record)

    # The instance-listener protocol.
    def rented(self, instance: Instance) -> None:
        if instance.id:
            self.record_rented(instance.id, instance.target,
                               token_sha256=_token_sha256(instance.client))

    def progress(self, instance: Instance) -> None:
        pass

    def ended(self, instance: Instance) -> None:
        # Only a confirmed end takes it off the ledger; a failed terminate stays live.
        if instance.id and instance.outcome == Outcome.KEPT:
            self.record_kept(instance.id, instance.keep_for, wtype=instance.wtype,
                             deployment=instance.deployment)
        elif instance.id and instance.outcome in ENDED_OUTCOMES:
            self.record_ended(instance.id, instance.outcome, wtype=instance.wtype,
                              deployment=instance.deployment)

    def replaced(self, instance: Instance, failed: FailedRental) -> None:
        if failed.outcome in ENDED_OUTCOMES:
            self.record_ended(failed.id, failed.outcome, by="replaced", wtype=instance.wtype,
                              deployment=failed.deployment)

    def reserved(self, instance: Instance, reservation: str) -> None:
        self.record_rented(reservation, instance.target,
                           token_sha256=_token_sha256(instance.client))

    def unreserved(self, instance: Instance, reservation: str) -> None:
        self.record_ended(reservation, "cancelled", by="teardown")

    def records(self) -> list[dict[str, Any]]:
        """Every readable record, oldest first (a torn line is skipped)."""
        try:
            fd = safefiles.open_file(self.path, "ledger", os.O_RDONLY)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as fh:
            text = fh.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    out.append(item)
        return out

    def live(self, *, run_id: str | None = None,
             include_kept: bool = True) -> list[dict[str, Any]]:
        """The ``rented`` records with no ``ended`` record after them, oldest first
        (of one run, if ``run_id`` is given; without those kept after their run
        unless ``include_kept``). A kept one carries ``"kept": True``."""
        rented: dict[str, dict[str, Any]] = {}
        for item in self.records():
            if item.get("event") == "rented":
                rented.pop(item["id"], None)  # rented again: it moves to the end
                rented[item["id"]] = item
            elif item.get("event") == "kept" and item["id"] in rented:
                rented[item["id"]] = {**rented[item["id"]], "kept": True}
            elif item.get("event") == "ended":
                rented.pop(item["id"], None)
        return [r for r in rented.values() if (run_id is None or r.get("run") == run_id)
                and (include_kept or not r.get("kept"))]


def _token_sha256(client: RerobotsClient) -> str | None:
    return client.token_sha256() if client.has_token else None


# -- ending many at once ------------------------------------------------------------


def end_all(
    client: RerobotsClient,
    ids: Iterable[str],
    *,
    deadline: float = 120.0,
    notfound_grace: float = 0.0,
    ledger: Ledger | None = None,
    by: str = "controller",
) -> dict[str, str]:
    """Terminate every id in parallel, waiting out INIT for up to ``deadline`` s.

    Returns ``{id: outcome}``, an outcome of :data:`ENDED_OUTCOMES` or one starting
    with ``"failed:"``. Each success is recorded in ``ledger`` as ended ``by`` that
    layer. Never raises for one instance's trouble.
    """
    def one(ident: str) -> tuple[str, str]:
        try:
            outcome: str = end(client, ident, deadline=deadline, notfound_grace=notfound_grace)
        except Exception as exc:  # one instance's trouble must not stop the others
            outcome = f"failed: {exc}"
        if ledger is not None and outcome in ENDED_OUTCOMES:
            try:
                ledger.record_ended(ident, outcome, by=by)
            except (OSError, ConfigurationError) as exc:
                log.warning("rerobots ledger %s: cannot record the end of %s: %s",
                            ledger.path, ident, exc)
        return ident, outcome

    unique = list(dict.fromkeys(ids))
    if not unique:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(unique)),
                            thread_name_prefix="rerobots-end") as pool:
        return dict(pool.map(one, unique))


# -- layer 2: signals ----------------------------------------------------------------


def _tell_the_terminal(text: str) -> None:
    """Write to the controlling terminal: pytest captures stderr, and whoever pressed
    Ctrl-C twice is looking at the terminal. Without one (CI), stderr."""
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(text)
    except OSError:
        sys.stderr.write(text)


class SignalGuard:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread, as SIGINT does,
    so pytest runs teardown. Once one arrived, repeats (SIGINT included) are ignored for
    ``grace`` seconds so that teardown can finish terminating instances; after that a
    signal interrupts again (an operator who insists gets their way).

    Installed only from the main thread. A signal whose handler was not set from
    Python, or is ``SIG_IGN`` (``nohup``), is left alone, and so is SIGINT unless
    Python's default handler owns it. Previous Python handlers are called (chained)
    on the first signal and restored by :meth:`uninstall`. An ignored signal is
    reported through ``write`` (default: the controlling terminal, else stderr).
    """

    SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")

    def __init__(self, grace: float = 30.0,
                 write: Callable[[str], Any] | None = None) -> None:
        self.grace = grace
        self.first_at: float | None = None
        self._write = write or _tell_the_terminal
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Install the handlers; False (and nothing changed) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self._previous:
            return True
        self.first_at = None
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            previous = signal.getsignal(signum)
            if previous is None or previous is signal.SIG_IGN:
                continue  # set from C (cannot be restored) or deliberately ignored
            if signum == signal.SIGINT and previous is not signal.default_int_handler:
                continue  # somebody else owns SIGINT; leave it alone
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        """Restore the previous handlers (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            # Only undo our own handler: whoever replaced it since keeps theirs.
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        __tracebackhide__ = True  # pytest reports where the run was, not this handler
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first_at is not None and now - self.first_at < self.grace:
            # Teardown is under way: a second signal must not abort it.
            with contextlib.suppress(Exception):
                self._write(f"\nrerobots: {name} ignored while instances are being "
                            "terminated\n")
            return
        self.first_at = now
        previous = self._previous.get(signum)
        if callable(previous) and previous not in (signal.default_int_handler, self._handle):
            previous(signum, frame)
        raise KeyboardInterrupt(f"received {name}")


# -- layer 3: the watchdog -----------------------------------------------------------


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
        self.process = procs.spawn("pytest_rerobots.guard", "watchdog")
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
        results = end_all(client, rented, deadline=float(header.get("deadline", 180.0)),
                          notfound_grace=max(0.0, grace), ledger=ledger, by="watchdog")
    return 0 if all(o in ENDED_OUTCOMES for o in results.values()) else 1


def _main(argv: list[str]) -> int:
    if argv[:1] == ["watchdog"]:
        procs.ignore_terminal_signals()
        return _watchdog_main(sys.stdin.buffer)
    print("usage: python -m pytest_rerobots.guard watchdog", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
