"""``Records``: the run's memory of every instance it rented or attached to, for the summary.

An instance listener (:class:`~pytest_rerobots.instance.InstanceListener`) that a
:class:`~pytest_rerobots.run.Run` always has: pure Python, no pytest, so the engine
imports it without the plugin. The plugin reads it for its terminal summary and its
GitHub step summary (:mod:`.plugin_report`), and sends its rows across xdist workers.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .instance import FailedRental, Instance

__all__ = ["Records"]


class Records:
    """An instance listener that remembers every instance of the run, for the summary."""

    def __init__(self) -> None:
        self.instances: list[Instance] = []
        self.leftovers: dict[str, str] = {}
        # Rows sent by xdist workers (their instances live in their processes).
        self.remote_rows: list[tuple[str, ...]] = []
        self._lock = threading.Lock()

    def rented(self, instance: Instance) -> None:
        with self._lock:
            if instance not in self.instances:
                self.instances.append(instance)

    def progress(self, instance: Instance) -> None:
        pass

    def ended(self, instance: Instance) -> None:
        # An instance attached to (shared under xdist) was never "rented" here.
        self.rented(instance)

    def replaced(self, instance: Instance, failed: FailedRental) -> None:
        pass  # the summary reads ``instance.failed_rentals``

    def reserved(self, instance: Instance, reservation: str) -> None:
        pass

    def unreserved(self, instance: Instance, reservation: str) -> None:
        pass

    def note_leftover(self, instance_id: str, outcome: str) -> None:
        """An instance a worker rented and never ended, ended (or not) by the controller."""
        self.leftovers[instance_id] = outcome
