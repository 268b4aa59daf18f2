"""How an instance's use ended: one small module, so that the ledger, the watchdog and
the reports can name outcomes without loading the SSH and HTTP machinery."""

from __future__ import annotations

from enum import Enum

__all__ = ["ENDED_OUTCOMES", "Outcome"]


class Outcome(str, Enum):
    """How an instance's use ended (``Instance.outcome``); equal to its text."""

    TERMINATED = "terminated"
    ALREADY_ENDED = "already ended"
    NOT_FOUND = "not found"
    #: Left running for another process that uses it (xdist shared mode).
    HANDED_OVER = "handed over"
    #: ``POST /new`` never answered with an id: there is nothing to end.
    NEVER_RENTED = "never rented"
    #: Left running on purpose after the run: for debugging a failed test
    #: (``--rerobots-keep-on-failure``) or for the next run to reuse
    #: (``--rerobots-reuse``); a keeper process holds it (``pytest_rerobots.keep``).
    KEPT = "kept"
    #: The API did not confirm the end; ``Instance.failure`` says why.
    TERMINATE_FAILED = "terminate failed"

    def __str__(self) -> str:
        return self.value


#: Outcomes that mean the instance is over (anything else may still run).
ENDED_OUTCOMES = (Outcome.TERMINATED, Outcome.ALREADY_ENDED, Outcome.NOT_FOUND)
