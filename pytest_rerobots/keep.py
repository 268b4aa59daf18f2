"""Instances kept after the run: for debugging a failed test, or for the next run to reuse.

Two options keep an instance instead of terminating it (docs/contract.md,
"Configuration"):

* ``--rerobots-keep-on-failure``: an instance used by a failing test stays rented until
  its lease ends or ``pytest --rerobots-sweep``; the terminal prints an ``ssh`` command
  that logs in to it.
* ``--rerobots-reuse MINUTES``: session instances stay rented at the end of a run, and the
  next run of the same checkout, against the same API origin and token, attaches to one
  of the same type (and deployment) instead of renting. One that no run attaches to for
  MINUTES is terminated.
* ``pytest --rerobots-rent-ahead`` (:mod:`.ahead`): instances rented before the test run,
  kept here while still in INIT, ``kind`` "ahead". The next run of the same checkout
  attaches to them whether or not it reuses (CI included) and waits only for what is not
  READY yet. One that no run attaches to within its idle limit is terminated.

A kept instance lives in a directory of its own under the :class:`KeptStore`, named after
the ledger (``ledger.jsonl.kept/`` beside ``ledger.jsonl``, so under pytest's cache
directory by default): ``record.json`` (what it is, where it listens, who kept it, and a
SHA-256 of the token, never the token), ``key`` (the login key) and ``known_hosts`` (the
host key the API reported, pinned for OpenSSH), each mode 0600 in directories of mode 0700.
A store that is a symbolic link, belongs to another user or is writable by group or others
is refused, and every file in it is reached without following links (:mod:`.safefiles`).

The server ends an instance 60 s after its last keepalive ping, so a kept instance needs
something that outlives the run to ping it: one *keeper* process per kept instance
(``python -m pytest_rerobots.keep keeper``). It gets its settings and the token on a pipe
(never argv or the environment), detaches (its own session, not a child of the run),
pings the instance, ends it when it was kept for reuse and stayed idle too long, and
exits when the instance is gone, when a run attached to it (its directory is gone), or on
SIGTERM (it then leaves the instance as it is). Its pid is in ``record.json``;
``pytest --rerobots-sweep`` stops it, ends the instance and removes the files.

Nothing here imports pytest; the client loads in the keeper process only, and the
instances never. ``pytest --rerobots-sweep`` (:mod:`.sweep`) ends what is kept here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import procs, safefiles
from .ending import end
from .errors import ConfigurationError, NotFound, RerobotsError
from .ledger import Ledger
from .settings import Secret
from .wire import epoch

if TYPE_CHECKING:
    from .client import RerobotsClient
    from .instance import Instance

__all__ = ["KeptStore", "check_ledger", "describe", "kept_dir", "ssh_command", "stop_keeper"]

log = logging.getLogger("pytest_rerobots.keep")

#: Kinds of kept instance: kept after a failure, kept for reuse, rented ahead of a run.
FAILURE, REUSE, AHEAD = "failure", "reuse", "ahead"


def purpose(kind: str | None) -> str:
    """What a kind of kept instance is kept for, in the words the terminal, the summary
    and the sweep use ("debugging", "reuse", "the next run (rented ahead)")."""
    if kind == AHEAD:
        return "the next run (rented ahead)"
    return "debugging" if kind == FAILURE else str(kind)

#: A kept instance whose lease ends sooner than this (s) is not attached to: it could end
#: under the run. It is ended instead, so that its robot is free for a new rental.
LEASE_MARGIN = 600.0

#: How long :meth:`KeptStore.stop_keepers` waits for a keeper to exit (s).
STOP_WAIT = 5.0


#: What the store is called in errors.
WHAT = "kept directory"


def kept_dir(ledger_path: str | os.PathLike[str]) -> Path:
    """Where the instances kept by the runs of a ledger live: beside it, named after it
    (two ledgers in one directory never share it)."""
    path = Path(ledger_path)
    return path.with_name(path.name + ".kept")


def legacy_kept_dir(ledger_path: str | os.PathLike[str]) -> Path:
    """Where earlier versions kept them: ``kept/`` beside the ledger (only swept)."""
    return Path(ledger_path).parent / "kept"


def check_ledger(ledger_path: str | os.PathLike[str]) -> str | None:
    """Refuse (:class:`.ConfigurationError`) a ledger or kept directory that another user
    could have planted or could write (:meth:`.Ledger.check`); the ledger directory's
    one-line warning, if any. Creates nothing."""
    warning = Ledger(ledger_path).check()
    with contextlib.suppress(FileNotFoundError):
        os.close(safefiles.open_dir(kept_dir(ledger_path), WHAT))
    return warning


def _parse(data: bytes | None) -> dict[str, Any] | None:
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _known_hosts_line(host: str, port: int, hostkey: str) -> str:
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {' '.join(hostkey.split()[:2])}\n"


def ssh_command(record: Mapping[str, Any]) -> str:
    """The ``ssh`` command line that logs in to a kept instance, ready to paste: its own key,
    and its host key pinned through the known-hosts file beside it."""
    directory = Path(record["dir"])
    argv = ["ssh", "-i", str(directory / "key"), "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={directory / 'known_hosts'}",
            "-p", str(record["port"]), f"root@{record['host']}"]
    return shlex.join(argv)


def describe(record: Mapping[str, Any], now: float | None = None) -> list[str]:
    """What the terminal says of a kept instance: what it is, how to log in, when its lease
    ends and how to end it."""
    now = time.time() if now is None else now
    ident = record["id"]
    where = (f"{record.get('wtype') or '?'}, deployment {record.get('deployment') or '?'}"
             + (f", region {record['region']}" if record.get("region") else ""))
    lease_end = record.get("lease_end")
    if isinstance(lease_end, (int, float)):
        stamp = datetime.fromtimestamp(lease_end, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        lease = f"its lease ends {stamp} (in {max(0.0, lease_end - now) / 60:.0f} min)"
    else:
        lease = "its lease end is unknown"
    keeper = record.get("keeper")
    if record.get("kind") in (AHEAD, REUSE):
        idle = float(record.get("idle") or 0)
        meanwhile = f"process {keeper} keeps it alive meanwhile" if keeper else ""
        if record.get("kind") == AHEAD:
            title, then = "rented ahead", f", {meanwhile}" if keeper else ""
        else:
            title, then = "kept for reuse", f"; {lease}" + (f"; {meanwhile}" if keeper else "")
        return [
            f"rerobots: {title}: {ident} ({where})",
            f"  the next run of this checkout within {idle / 60:g} min attaches to it{then}",
            "  end it now: pytest --rerobots-sweep",
        ]
    kept_by = f"; process {keeper} keeps it alive until then" if keeper else ""
    return [
        f"rerobots: kept for debugging: {ident} ({where})",
        f"  log in: {ssh_command(record)}",
        f"  {lease}{kept_by}",
        "  end it: pytest --rerobots-sweep",
    ]


class KeptStore:
    """The directory of the instances kept by the runs of one checkout.

    ``api_url`` and ``token_sha256`` say whose instances a run may attach to: a kept
    instance of another origin or token is never taken. ``checkout`` names the checkout
    (a ledger given by path may be shared by several). Every change is made under one
    ``flock`` on ``.lock`` in the directory, which the keepers take too.
    """

    def __init__(self, directory: str | os.PathLike[str], *, api_url: str = "",
                 token_sha256: str | None = None, checkout: str | None = None) -> None:
        self.directory = Path(directory)
        self.api_url = api_url
        self.token_sha256 = token_sha256
        self.checkout = checkout if checkout is not None else os.getcwd()

    def __repr__(self) -> str:
        return f"KeptStore({str(self.directory)!r})"

    @contextlib.contextmanager
    def lock(self) -> Iterator[int]:
        """Hold the store's ``flock``; the store's directory descriptor (checked), through
        which everything in it is reached."""
        with self.opened(create=True) as fd:
            lock = safefiles.open_file(".lock", WHAT + " lock", os.O_RDWR | os.O_CREAT,
                                       dir_fd=fd)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released by close()
                yield fd
            finally:
                os.close(lock)

    @contextlib.contextmanager
    def opened(self, create: bool = False) -> Iterator[int]:
        """The store's directory, opened and checked (made, mode 0700, if ``create``)."""
        if create:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
        with safefiles.opened_dir(self.directory, WHAT, create=create) as fd:
            if create and not _exists(".gitignore", fd):
                # Never committed, even where the cache directory is not ignored.
                safefiles.write_atomic(".gitignore", b"# made by pytest-rerobots: instances "
                                       b"kept after a run, and their keys\n*\n", fd)
            yield fd

    def _entry(self, ident: str, fd: int) -> int:
        """Kept instance ``ident``'s directory in the store ``fd``, opened and checked."""
        return safefiles.open_dir(ident, WHAT, dir_fd=fd)

    def read_record(self, ident: str, fd: int) -> dict[str, Any] | None:
        """``ident``'s record, if it has one: a regular file of this user, of bounded size,
        naming ``ident`` (a record never names another directory)."""
        try:
            sub = self._entry(ident, fd)
        except (OSError, ConfigurationError):
            return None
        try:
            record = _parse(safefiles.read_regular("record.json", sub))
        finally:
            os.close(sub)
        if record is None or record.get("id") != ident:
            return None
        record["dir"] = str(self.directory / ident)
        return record

    def records(self) -> list[dict[str, Any]]:
        """Every kept instance's record, oldest first."""
        try:
            with self.opened() as fd:
                found = [r for r in map(lambda n: self.read_record(n, fd), os.listdir(fd))
                         if r is not None]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda r: float(r.get("kept_at") or 0))

    def mine(self, record: Mapping[str, Any]) -> bool:
        """Kept by this checkout, against this API origin and token."""
        return (record.get("api_url") == self.api_url
                and record.get("token_sha256") == self.token_sha256
                and record.get("checkout") == self.checkout)

    def ours(self, record: Mapping[str, Any]) -> bool:
        """Of this origin and, when the store knows its token, of this token."""
        return (record.get("api_url") == self.api_url
                and (self.token_sha256 is None
                     or record.get("token_sha256") == self.token_sha256))

    # -- keeping ----------------------------------------------------------------

    def keep(self, inst: Instance, kind: str, *, secret: Secret | None, interval: float,
             idle: float | None = None, ledger: Ledger | None = None) -> dict[str, Any]:
        """Write ``inst``'s record, key and known-hosts file and start its keeper (which
        gets the token, ``secret``, on its pipe); the record (with the keeper's pid). The
        instance itself is left to the caller (:meth:`.Instance.detach` with
        ``Outcome.KEPT``)."""
        ident, text = inst.id, inst.private_key_text
        if ident is None or inst.host is None or inst.port is None or not inst.hostkeys:
            raise ValueError(f"instance {ident} is not up: nothing to keep")
        if not text:
            raise ValueError(f"instance {ident}: its login key is not known in full")
        expires = epoch(inst.details.get("expires"))
        lease_end = expires if math.isfinite(expires) else None
        record: dict[str, Any] = {
            "id": ident, "kind": kind, "wtype": inst.wtype, "deployment": inst.deployment,
            "region": inst.region, "target": inst.target, "host": inst.host,
            "port": inst.port, "hostkeys": list(inst.hostkeys), "api_url": self.api_url,
            "token_sha256": self.token_sha256, "checkout": self.checkout,
            "kept_at": time.time(), "idle": idle if kind == REUSE else None,
            "lease_end": lease_end, "keeper": None, "pid": os.getpid(),
        }
        known_hosts = "".join(_known_hosts_line(inst.host, inst.port, k) for k in inst.hostkeys)
        return self._store(record, text, known_hosts, secret=secret, interval=interval,
                           ledger=ledger)

    def keep_ahead(self, ident: str, *, target: str, wtype: str | None,
                   deployment: str | None, key_text: str, secret: Secret | None,
                   interval: float, idle: float, lease_end: float | None,
                   ledger: Ledger | None = None, visible_by: float | None = None
                   ) -> dict[str, Any]:
        """Keep ``ident``, rented ahead of a run and perhaps still in INIT (so with no
        address or host key yet): write its record and login key and start its keeper,
        which ends it after ``idle`` seconds unclaimed. ``visible_by``: until then the
        keeper takes a 404 for an instance the server has not listed yet."""
        record: dict[str, Any] = {
            "id": ident, "kind": AHEAD, "wtype": wtype, "deployment": deployment,
            "region": None, "target": target, "host": None, "port": None, "hostkeys": [],
            "api_url": self.api_url, "token_sha256": self.token_sha256,
            "checkout": self.checkout, "kept_at": time.time(), "idle": idle,
            "lease_end": lease_end, "keeper": None, "pid": os.getpid(),
        }
        return self._store(record, key_text, "", secret=secret, interval=interval,
                           ledger=ledger, visible_by=visible_by)

    def _store(self, record: dict[str, Any], key_text: str, known_hosts: str, *,
               secret: Secret | None, interval: float, ledger: Ledger | None,
               visible_by: float | None = None) -> dict[str, Any]:
        """Write a kept instance's files and start its keeper; the record."""
        ident, text, lease_end = record["id"], key_text, record["lease_end"]
        with self.lock() as fd:
            with contextlib.suppress(FileExistsError):
                os.mkdir(ident, 0o700, dir_fd=fd)
            sub = self._entry(ident, fd)
            try:
                safefiles.write_atomic("key", text.encode(), sub)
                safefiles.write_atomic("known_hosts", known_hosts.encode(), sub)
                self._write(sub, record)
            finally:
                os.close(sub)
        header = {"id": ident, "dir": str(self.directory), "api_url": self.api_url,
                  "interval": interval, "idle": record["idle"],
                  "lease_end": lease_end, "ledger": None, "visible_by": visible_by}
        if ledger is not None:
            header["ledger"] = {"path": os.path.abspath(ledger.path), "run": ledger.run_id,
                                "api_url": ledger.api_url}
        try:
            pid = spawn_keeper(header, secret)
        except BaseException:
            with self.lock() as fd:
                safefiles.remove_tree(ident, fd)
            raise
        with self.lock() as fd:
            if self.read_record(ident, fd) is not None:
                record["keeper"] = pid
                sub = self._entry(ident, fd)
                try:
                    self._write(sub, record)
                finally:
                    os.close(sub)
        record["dir"] = str(self.directory / ident)
        return record

    @staticmethod
    def _write(fd: int, record: Mapping[str, Any]) -> None:
        """Write ``record.json`` in the kept instance's directory ``fd``."""
        data = {k: v for k, v in record.items() if k != "dir"}
        safefiles.write_atomic("record.json", json.dumps(data, sort_keys=True).encode(), fd)

    # -- attaching ----------------------------------------------------------------

    def claim(self, wtype: str | None, deployment: str | None = None, *,
              client: RerobotsClient | None = None,
              kinds: tuple[str, ...] = (REUSE,)) -> tuple[dict[str, Any], str] | None:
        """Take a kept instance of ``wtype`` (on ``deployment``, if given; a ``wtype`` of
        None matches any type) kept as one of ``kinds``, for this run: its record and its
        key's text; its directory is removed, so its keeper stops. Rented-ahead ones
        first, then the newest. One whose lease is nearly over is ended (with ``client``)
        and skipped. A store that does not exist is not made."""
        if not self.directory.is_dir():
            return None
        with self.lock() as fd:
            found = sorted(reversed(self.records()), key=lambda r: r.get("kind") != AHEAD)
            for record in found:
                if (record.get("kind") not in kinds or not self.mine(record)
                        or (wtype is not None and record.get("wtype") != wtype)
                        or (wtype is None and deployment is None)
                        or (deployment is not None and record.get("deployment") != deployment)):
                    continue
                ident = record["id"]
                try:
                    sub = self._entry(ident, fd)
                except (OSError, ConfigurationError):
                    continue
                try:
                    key = (safefiles.read_regular("key", sub) or b"").decode(errors="replace")
                finally:
                    os.close(sub)
                safefiles.remove_tree(ident, fd)
                lease_end = record.get("lease_end")
                if not key or (isinstance(lease_end, (int, float))
                               and lease_end - time.time() < LEASE_MARGIN):
                    if client is not None:
                        _end_quietly(client, record["id"])
                    continue
                return record, key
        return None

    # -- sweeping -------------------------------------------------------------------

    def stop_keepers(self, write: Callable[[str], Any] | None = None) -> list[dict[str, Any]]:
        """Stop the keepers of every kept instance of this API origin and token (SIGTERM,
        by pid, if that process is this user's keeper of that instance); the records. The
        instances stay as they are (ended by the sweep)."""
        stopped = []
        for record in self.records():
            if not self.ours(record):
                continue
            pid = record.get("keeper")
            if isinstance(pid, int) and stop_keeper(pid, record["id"]) and write is not None:
                write(f"rerobots sweep: {record['id']} ({record.get('wtype') or '?'}) "
                      f"kept for {purpose(record.get('kind'))}: its keeper {pid} stopped")
            stopped.append(record)
        return stopped

    def forget(self, ident: str) -> None:
        """Remove a kept instance's record, key and known-hosts file."""
        with self.lock() as fd:
            safefiles.remove_tree(ident, fd)


def _exists(name: str, fd: int) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _end_quietly(client: RerobotsClient, ident: str) -> str:
    try:
        return str(end(client, ident, deadline=30.0))
    except Exception as exc:  # the keepalive window ends it all the same
        log.warning("could not end kept instance %s: %s", ident, exc)
        return f"failed: {exc}"


#: The keeper's module: ``python -m pytest_rerobots.keep keeper ID``.
MODULE = "pytest_rerobots.keep"


def stop_keeper(pid: int, ident: str | None = None, wait: float = STOP_WAIT) -> bool:
    """Stop keeper ``pid`` (of kept instance ``ident``, if given; SIGTERM) and wait for it
    to exit; whether one was stopped (not if ``pid`` is no keeper of this user: some other
    process may have got its number since)."""
    return procs.stop_helper(pid, MODULE, ident, wait)


# -- the keeper process ----------------------------------------------------------------


def spawn_keeper(header: Mapping[str, Any], secret: Secret | None = None,
                 timeout: float = 30.0) -> int:
    """Start a keeper for ``header["id"]``; its pid. The launcher (:func:`.procs.spawn`)
    reads the header, with the token (``secret``), from its pipe, as the watchdog does;
    it forks the keeper into a session of its own, prints its pid and exits, so the keeper
    is nobody's child and outlives the run."""
    launcher = procs.spawn(MODULE, "keeper", str(header["id"]), stdout=subprocess.PIPE)
    with launcher:  # (its pipes closed and it waited for, whatever happens)
        try:
            # The token goes down the pipe only: not on the command line, not in the
            # child's environment. (No local variable holds it: pytest's -l would print it.)
            out, _ = launcher.communicate(
                json.dumps({**header, "token": secret.reveal() if secret else None}).encode(),
                timeout=timeout)
        except BaseException:
            launcher.kill()
            raise
    try:
        return int(out.decode().strip())
    except ValueError:
        raise RuntimeError(f"the keeper did not start (exit status {launcher.returncode})"
                           ) from None


def _launch(stream: IO[bytes]) -> int:
    """The launcher: read the header, fork the keeper, print its pid, exit."""
    try:
        header = json.loads(stream.read() or b"{}")
    except ValueError:
        return 2
    if not isinstance(header, dict) or not header.get("id"):
        return 2
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        return 0
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        with KeptStore(header["dir"]).opened() as store, \
                safefiles.opened_dir(str(header["id"]), WHAT, dir_fd=store) as sub:
            err = safefiles.open_file("keeper.log", "keeper log",
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, dir_fd=sub)
    except (OSError, ConfigurationError):
        err = devnull
    for fd, target in ((0, devnull), (1, devnull), (2, err)):
        os.dup2(target, fd)
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s keeper %(levelname)s %(message)s")
    try:
        code = _keeper_main(header)
    except BaseException:  # logged: a keeper has nobody to raise to
        log.exception("keeper of %s failed", header.get("id"))
        code = 1
    os._exit(code)


def _keeper_main(header: dict[str, Any]) -> int:
    """Keep one instance alive until it should end (see the module docstring)."""
    # Loaded here: the plugin loads this module in every run with a ledger, and a run
    # that rents nothing must not load requests (the keeper process always does).
    from .client import RerobotsClient

    # Held as a Secret from here on (the header keeps no copy), revealed to the client.
    secret = Secret(str(header.pop("token"))) if header.get("token") else None
    ident = str(header["id"])
    store = KeptStore(header["dir"])

    def current(fd: int | None = None) -> dict[str, Any] | None:
        """The instance's record, None once it is gone (or the store no longer safe)."""
        if fd is not None:
            return store.read_record(ident, fd)
        try:
            with store.opened() as fd:
                return store.read_record(ident, fd)
        except (OSError, ConfigurationError):
            return None

    interval = max(0.05, float(header.get("interval") or 40.0))
    idle = header.get("idle")
    ledger = None
    if header.get("ledger"):
        info = header["ledger"]
        ledger = Ledger(info["path"], run_id=info.get("run", ""), api_url=info.get("api_url", ""))
    me = os.getpid()
    next_ping = 0.0
    with RerobotsClient(secret.reveal() if secret else None, header.get("api_url"),
                        ignore_env=True, retries=1) as client:

        def over(fd: int, outcome: str, by: str) -> int:
            """Forget the instance (the caller holds the store's lock, ``fd``) and record
            its end."""
            safefiles.remove_tree(ident, fd)
            if ledger is not None and not outcome.startswith("failed"):
                ledger.record_ended(ident, outcome, by=by)
            return 0

        while True:
            record = current()
            if record is None or record.get("keeper") not in (None, me):
                return 0  # a run attached to it, a sweep took it, or another keeper did
            now = time.time()
            if idle is not None and now >= float(record.get("kept_at") or now) + float(idle):
                with store.lock() as fd:
                    if current(fd) is None:
                        return 0  # attached to at the last moment
                    return over(fd, _end_quietly(client, ident), "reaper")
            if now >= next_ping:
                next_ping = now + interval
                try:
                    client.keepalive(ident)
                except NotFound:
                    # Gone (its lease ended, someone terminated it), or READY without a
                    # keepalive monitor (an instance served from a reservation).
                    try:
                        status = client.instance(ident)["status"]
                    except NotFound:
                        # (Rented moments ago, the server may not list it yet.)
                        fresh = time.time() < float(header.get("visible_by") or 0)
                        status = "unknown" if fresh else "TERMINATED"
                    except RerobotsError:
                        status = "unknown"
                    if status in ("TERMINATING", "TERMINATED", "INIT_FAIL"):
                        with store.lock() as fd:
                            return over(fd, "already ended", "keeper")
                except RerobotsError as exc:
                    log.warning("keepalive of %s failed: %s", ident, exc)
                    next_ping = now + min(5.0, interval)
            time.sleep(max(0.02, min(0.5, interval / 4, next_ping - time.time())))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["keeper"]:
        procs.ignore_terminal_signals()  # SIGTERM stops it (and leaves the instance as it is)
        return _launch(sys.stdin.buffer)
    print("usage: python -m pytest_rerobots.keep keeper ID   (settings on stdin)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
