"""Every retry policy of pytest-rerobots, built on tenacity.

Each policy takes a ``sleep`` callable so tests run at full speed, and stops
by a deadline rather than by a count where waiting is the point. Which calls
are safe to retry is decided here, in one place:

* idempotent API calls (GET, DELETE, terminate, keepalive, firewall) retry on
  :class:`~pytest_rerobots.errors.TransportError` and
  :class:`~pytest_rerobots.errors.ServerError`;
* ``POST /new`` is never retried blindly: the client reconciles a lost answer
  through ``GET /instances`` (see ``client.py``), and only a 5xx after which that
  look found nothing is sent again (:func:`renting`);
* terminate also waits out ``BusyWorkspaceInstance`` (an instance in INIT
  cannot be terminated yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import tenacity
from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from .errors import BusyWorkspaceInstance, RateLimited, ServerError, TransportError

Sleep = Callable[[float], Any]


def _backoff(first: float, cap: float) -> Any:
    """Exponential backoff from ``first`` to ``cap`` seconds, with jitter of up to ``first``
    so that many clients retrying at once spread out."""
    return wait_exponential(multiplier=first, max=cap) + wait_random(0, first)

#: Errors after which repeating an idempotent request is safe.
TRANSIENT = (TransportError, ServerError)


def idempotent(
    *, attempts: int = 4, sleep: Sleep = time.sleep, max_wait: float = 8.0
) -> Retrying:
    """Policy for idempotent API calls: a few attempts, exponential backoff with jitter."""
    # RateLimited too: the client's pacing then sleeps until the budget resets.
    return Retrying(
        retry=retry_if_exception_type((*TRANSIENT, RateLimited)),
        stop=stop_after_attempt(max(1, attempts)),
        wait=_backoff(0.25, max_wait),
        sleep=sleep,
        reraise=True,
    )


#: How many transient errors (5xx, no answer) one instance's terminate tolerates before it
#: gives up (then the LEAKED line): an API that keeps answering 503 must not hold teardown.
TERMINATE_ERRORS = 8


class _stop_after_errors(stop_base):
    """Stop once ``limit`` attempts have failed with a transient error (INIT's refusals,
    which end by themselves, are not counted)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is not None and isinstance(outcome.exception(), TRANSIENT):
            self.seen += 1
        return self.seen >= self.limit


def terminating(*, deadline: float = 120.0, sleep: Sleep = time.sleep,
                max_errors: int = TERMINATE_ERRORS) -> Retrying:
    """Policy for terminate: keep trying through INIT until ``deadline`` s, and through
    transient errors until ``max_errors`` of them (each call is sent once: see
    ``RerobotsClient.terminate(once=True)``)."""
    return Retrying(
        retry=retry_if_exception_type((*TRANSIENT, BusyWorkspaceInstance)),
        stop=stop_after_delay(deadline) | _stop_after_errors(max_errors),
        # Capped at 2 s: an instance leaving INIT should be ended without delay.
        wait=_backoff(0.2, 2.0),
        sleep=sleep,
        reraise=True,
    )


def connecting(
    *,
    deadline: float,
    retry_on: tuple[type[BaseException], ...],
    attempts: int | None = None,
    sleep: Sleep = time.sleep,
) -> Retrying:
    """Policy for reaching a host that is still coming up: short steps until ``deadline`` s
    have passed or, when given, ``attempts`` attempts were made."""
    stop: stop_base = stop_after_delay(deadline)
    if attempts is not None:
        stop = stop | stop_after_attempt(max(1, attempts))
    return Retrying(
        retry=retry_if_exception_type(retry_on),
        stop=stop,
        wait=_backoff(0.05, 1.0),
        sleep=sleep,
        reraise=True,
    )


def renting(*, fast: bool = False, attempts: int = 3, sleep: Sleep = time.sleep) -> Retrying:
    """Policy for ``POST /new`` after a 5xx that the client's reconciliation showed
    created nothing (so sending it again cannot rent twice): ``attempts`` more tries
    with backoff from 2 s (50 ms with ``fast``, a local simulator)."""
    first = 0.05 if fast else 2.0
    return Retrying(
        retry=retry_if_exception_type(ServerError),
        stop=stop_after_attempt(attempts + 1),
        wait=_backoff(first, 16 * first),
        sleep=sleep,
        reraise=True,
    )


def polling(
    *,
    deadline: float,
    interval: Callable[[tenacity.RetryCallState], float],
    keep_going: Callable[[Any], bool],
    retry_on: tuple[type[BaseException], ...] = TRANSIENT,
    sleep: Sleep = time.sleep,
    before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
) -> Retrying:
    """Policy for waiting on a state: repeat while ``keep_going(result)`` or a
    ``retry_on`` error, sleeping ``interval(state)`` between calls, until ``deadline`` s.

    On the deadline tenacity raises :class:`tenacity.RetryError`; the caller
    turns it into its own error carrying the last result.
    """
    return Retrying(
        retry=tenacity.retry_if_result(keep_going) | retry_if_exception_type(retry_on),
        stop=stop_after_delay(deadline),
        wait=interval,
        sleep=sleep,
        before_sleep=before_sleep,
    )
