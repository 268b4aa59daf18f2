"""The run's board: what each process of one run holds, runs and waits for.

Under pytest-xdist the workers of one run rent from the same pool of robots, and a worker
that waits for a busy robot cannot see that the robot is held by another worker of the
same run for as long as that worker's module or session lasts. Each process of the run
therefore posts one small JSON file in a directory the controller made for the run: its
worker name and pid, the test it runs, the instances it holds (id, type, deployment, the
test it rented each in and how long it holds it: ``"test"`` or wider) and, while it waits
for a robot, the progress line of that wait. Other workers read it to tell "held by this
run, for good" from "busy" (:meth:`Board.holders`); the controller, which alone can write
to the terminal, shows the waits (:meth:`Board.waits`).

Each file is written whole and renamed into place, so that a reader never sees half of
one. A process that died is skipped (its pid is gone). Nothing here imports pytest, the
client or the instances.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import pid_alive

__all__ = ["Board", "Holder", "current_test"]


def current_test() -> str | None:
    """The node id of the test pytest runs in this process now, if any (pytest's
    ``PYTEST_CURRENT_TEST``, less the phase)."""
    value = os.environ.get("PYTEST_CURRENT_TEST")
    if not value:
        return None
    return value.rsplit(" (", 1)[0] if value.endswith(")") else value


@dataclass
class Holder:
    """Who holds an instance of the run, and for how long: ``scope`` "test" (ended with
    the test it was rented in), a wider pytest scope ("module", "session"...), or None
    (not known: a fixture of the user's that called ``Run.acquire``)."""

    worker: str | None = None
    pid: int = field(default_factory=os.getpid)
    thread: int | None = None
    test: str | None = None
    scope: str | None = None

    def describe(self, here: bool = False) -> str:
        """Who holds it, for messages: ``[gw1], rented in test_x.py::test_y for the
        module`` (``here``: this process)."""
        if self.worker:
            who = f"[{self.worker}]" + (" (this worker)" if here else "")
        else:
            who = "this process" if here else f"process {self.pid}"
        if self.test:
            who += f", rented in {self.test}"
        if self.scope:
            who += f", held for the {self.scope}" if self.scope != "test" else \
                ", held for that test"
        return who


class Board:
    """The files of one run's processes in ``directory`` (see the module's docstring)."""

    def __init__(self, directory: str | os.PathLike[str], worker: str | None = None) -> None:
        self.directory = Path(directory)
        self.worker = worker
        self._last: str | None = None

    def _path(self, pid: int) -> Path:
        return self.directory / f"{pid}.json"

    def post(self, *, test: str | None, held: Iterable[dict[str, Any]],
             waiting: dict[str, Any] | None) -> None:
        """Write this process's entry (nothing if it did not change)."""
        entry = {"worker": self.worker, "pid": os.getpid(), "test": test,
                 "held": list(held), "waiting": waiting}
        data = json.dumps(entry, sort_keys=True)
        if data == self._last:
            return
        self._last = data
        with contextlib.suppress(OSError):  # a board is a courtesy: never fail a rental
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{os.getpid()}.tmp"
            tmp.write_text(data)
            tmp.replace(self._path(os.getpid()))

    def entries(self, *, others_only: bool = False) -> list[dict[str, Any]]:
        """The entries of the run's live processes (this one's too, unless ``others_only``)."""
        out = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                entry = json.loads((self.directory / name).read_text())
            except (OSError, ValueError):
                continue
            pid = entry.get("pid") if isinstance(entry, dict) else None
            if not isinstance(pid, int) or not pid_alive(pid):
                continue
            if others_only and pid == os.getpid():
                continue
            out.append(entry)
        return out

    def holders(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(process entry, held instance) of every other live process of the run."""
        return [(entry, held) for entry in self.entries(others_only=True)
                for held in entry.get("held") or [] if isinstance(held, dict)]

    def waits(self) -> list[dict[str, Any]]:
        """What the run's processes wait for now: each ``waiting`` with its ``worker``."""
        return [{**entry["waiting"], "worker": entry.get("worker")}
                for entry in self.entries() if isinstance(entry.get("waiting"), dict)]

    def clear(self) -> None:
        """Remove this process's entry (at the end of its run)."""
        with contextlib.suppress(OSError):
            self._path(os.getpid()).unlink()


def waiting_entry(line: str, wtype: str | None, since: float) -> dict[str, Any]:
    """A ``waiting`` value for :meth:`Board.post`."""
    return {"line": line, "wtype": wtype, "since": since, "posted": time.time()}


def wait_line(instance: Any, waited: float) -> str:
    """What a wait for an instance looks like in a progress line (without the prefix):
    ``basic_kobuki (requesting) BUSY 12s queue position 1 (why)``."""
    where = f" queue position {instance.queue_position}" if instance.queue_position else ""
    why = f" ({instance.busy_reason})" if instance.busy_reason else ""
    return (f"{instance.label} {instance.id or '(requesting)'} "
            f"{instance.status or '...'} {waited:.0f}s{where}{why}")
