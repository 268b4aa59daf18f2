"""The health record: what went wrong with each deployment, for this checkout.

A small JSON file beside the ledger (``health.json`` in pytest's cache directory) keeps, per
deployment, the recent troubles of its robots with their times: a start that failed
(INIT_FAIL, or INIT past the ready timeout), a robot lost during a test (ended by the
service, its host unreachable) and SSH that never answered after READY. Entries older than
:data:`KEEP_FOR` are dropped when the file is written.

A rental of a workspace type with several deployments avoids the deployments with trouble
in the last :data:`AVOID_FOR` seconds (one hour) by naming the others in ``POST /new``
(``wds``), as long as one is left; a pinned deployment is rented all the same.
``pytest --rerobots-list`` shows each deployment's record; ``pytest --rerobots-sweep``
forgets it. Every process of a run (each xdist worker) adds to the same file, under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .safefiles import open_file, opened_dir, read_regular, write_atomic

__all__ = ["AVOID_FOR", "KEEP_FOR", "KINDS", "Health"]

#: Seconds during which a deployment's trouble makes a rental of its type avoid it.
AVOID_FOR = 3600.0
#: Seconds an entry is kept in the record.
KEEP_FOR = 24 * 3600.0
#: What an entry can say.
KINDS = ("failed start", "lost", "ssh never answered")
_NAME = "health.json"
_LOCK = ".health.lock"
_MAX_PER_DEPLOYMENT = 20


class Health:
    """The health record in ``directory`` (the ledger's), for the service at ``origin``
    (its API origin, or ``"embedded simulator"``): entries of other services are kept
    but neither shown nor avoided; ``None`` reads them all."""

    def __init__(self, directory: str | os.PathLike[str], origin: str | None = None) -> None:
        self.directory = Path(directory)
        self.origin = origin

    @contextlib.contextmanager
    def _locked(self, create: bool) -> Iterator[int]:
        if create:  # (pytest's cache dir may not exist yet; opened_dir checks the last)
            self.directory.parent.mkdir(parents=True, exist_ok=True)
        with opened_dir(self.directory, "rerobots cache directory", create=create) as dfd:
            lock = open_file(_LOCK, "health lock", os.O_RDWR | os.O_CREAT, dir_fd=dfd)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield dfd
            finally:
                os.close(lock)

    def _read(self, dfd: int) -> dict[str, list[dict[str, Any]]]:
        raw = read_regular(_NAME, dfd)
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): [e for e in v if isinstance(e, dict)]
                for k, v in data.items() if isinstance(v, list)}

    def record(self, deployment: str | None, kind: str, instance: str | None = None,
               at: float | None = None, detail: str = "") -> None:
        """Add one trouble of ``deployment`` (one of :data:`KINDS`)."""
        if not deployment:
            return
        now = time.time() if at is None else at
        entry = {"at": now, "kind": kind, "instance": instance or "", "detail": detail[:200],
                 "origin": self.origin or ""}
        with self._locked(create=True) as dfd:
            data = self._read(dfd)
            data.setdefault(deployment, []).append(entry)
            cutoff = time.time() - KEEP_FOR
            data = {d: [e for e in es if float(e.get("at", 0)) >= cutoff][-_MAX_PER_DEPLOYMENT:]
                    for d, es in data.items()}
            write_atomic(_NAME, json.dumps({d: es for d, es in data.items() if es},
                                           indent=1).encode(), dfd)

    def recent(self, within: float = KEEP_FOR) -> dict[str, list[dict[str, Any]]]:
        """Each deployment's entries of the last ``within`` seconds, oldest first."""
        try:
            with opened_dir(self.directory, "rerobots cache directory") as dfd:
                data = self._read(dfd)
        except (OSError, ValueError):
            return {}
        cutoff = time.time() - within
        out = {d: [e for e in es if float(e.get("at", 0)) >= cutoff
                   and (self.origin is None or e.get("origin") == self.origin)]
               for d, es in data.items()}
        return {d: es for d, es in out.items() if es}

    def unhealthy(self, within: float = AVOID_FOR) -> list[str]:
        """The deployments with trouble in the last ``within`` seconds."""
        return sorted(self.recent(within))

    def forget(self) -> int:
        """Forget every entry; how many deployments had one."""
        try:
            with self._locked(create=False) as dfd:
                count = len(self._read(dfd))
                write_atomic(_NAME, b"{}", dfd)
        except FileNotFoundError:
            return 0
        return count

    @staticmethod
    def describe(entries: Iterable[Mapping[str, Any]]) -> str:
        """``2 troubles: lost 12:03:04, failed start 12:10:00``."""
        items = list(entries)
        shown = ", ".join(
            f"{e.get('kind')} {time.strftime('%H:%M:%S', time.localtime(float(e['at'])))}"
            for e in items[-3:] if "at" in e)
        return f"{len(items)} trouble{'s' if len(items) != 1 else ''} in 24 h: {shown}"
