"""The ledger: JSON lines recording every instance rented from a checkout, and how each ended.

It is what ``pytest --rerobots-sweep`` (:mod:`.sweep`) ends instances from when every
other layer failed (docs/contract.md, "Termination"), and what an xdist controller ends a
dead worker's instances from. Nothing here imports pytest, the client or the instances
(but for annotations).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import safefiles
from .outcome import ENDED_OUTCOMES, Outcome

if TYPE_CHECKING:
    from .client import RerobotsClient
    from .instance import FailedRental, Instance

__all__ = ["Ledger"]


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
