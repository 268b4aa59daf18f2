"""The run's budget of instance-minutes (``--rerobots-budget``).

A :class:`Budget` is an instance listener that records when each instance this run rented
began and ended to be billed (see :mod:`.costs` for what counts), and
:meth:`Budget.check` refuses a rental once what was spent, counting the robots still held
(they go on costing until they end), has reached the budget.

Under pytest-xdist the budget is for the whole run: every process records its instances in
one file of the run's board directory (:mod:`.board`), read and written under an exclusive
``flock``, so each worker's check counts what the others spent and hold. Two workers that
check at the same moment may each still start one rental. Without a board the record is
in memory. Nothing here imports pytest, the client or the instances.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BudgetReached

if TYPE_CHECKING:
    from .instance import FailedRental, Instance

__all__ = ["Budget"]

#: The file of the shared record in the board directory, and its lock.
FILE = "budget.json"
LOCK = "budget.lock"


class Budget:
    """``minutes`` of instances for the run, shared through ``directory`` if given."""

    def __init__(self, minutes: float, directory: str | os.PathLike[str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.minutes = minutes
        self.directory = Path(directory) if directory is not None else None
        self.clock = clock
        self._lock = threading.Lock()
        self._memory: dict[str, list[float | None]] = {}

    @contextlib.contextmanager
    def _record(self) -> Iterator[dict[str, list[float | None]]]:
        """The record ``{instance id: [rented, ended or None]}``, to read or change."""
        with self._lock:
            if self.directory is None:
                yield self._memory
                return
            fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                path = self.directory / FILE
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    record = {}
                if not isinstance(record, dict):
                    record = {}
                before = dict(record)
                yield record
                if record != before:
                    tmp = path.with_name(f".{FILE}.{os.getpid()}")
                    tmp.write_text(json.dumps(record), encoding="utf-8")
                    tmp.replace(path)
            finally:
                os.close(fd)

    def spent(self) -> float:
        """Instance-minutes spent by the run so far, held robots counted up to now."""
        now = self.clock()
        with self._record() as record:
            entries = list(record.values())
        total = 0.0
        for entry in entries:
            try:
                begun, ended = float(entry[0] or 0), entry[1]
                total += max(0.0, (float(ended) if ended is not None else now) - begun)
            except (TypeError, ValueError, IndexError):
                continue
        return total / 60.0

    def check(self, label: str) -> None:
        """Raise :class:`.BudgetReached` if the budget is spent (before renting ``label``)."""
        spent = self.spent()
        if spent >= self.minutes:
            raise BudgetReached(
                f"budget of {self.minutes:g} instance-minutes reached ({spent:.2f} spent); "
                f"not renting {label}", budget=self.minutes, spent=spent)

    # -- an instance listener --------------------------------------------------

    def rented(self, instance: Instance) -> None:
        rented_at = instance.timings.rented_at
        if instance.id is None or rented_at is None or instance.existing is not None:
            return  # (attached to: another process rented it and counts it)
        with self._record() as record:
            record[instance.id] = [rented_at, None]

    def ended(self, instance: Instance) -> None:
        if instance.id is None or instance.timings.rented_at is None:
            return
        with self._record() as record:
            if instance.id in record:
                record[instance.id] = [instance.timings.rented_at,
                                       instance.timings.ended_at or self.clock()]

    def progress(self, instance: Instance) -> None:
        pass

    def replaced(self, instance: Instance, failed: FailedRental) -> None:
        # A rental that failed to start was ended; its seconds stay spent.
        with self._record() as record:
            entry = record.get(failed.id)
            if entry is not None and entry[1] is None:
                record[failed.id] = [entry[0], self.clock()]

    def reserved(self, instance: Instance, reservation: str) -> None:
        pass

    def unreserved(self, instance: Instance, reservation: str) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        """The budget and what was spent, for reports."""
        return {"budget": self.minutes, "spent": self.spent()}
