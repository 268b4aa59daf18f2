"""How often to poll the API while waiting (for READY, or in a queue).

The real API's budget is 3600 calls an hour per token, shared by every job using it:
polls are frugal, slow down further when the ``X-RateLimit-*`` budget cannot pay for
them, and stop (with a line saying so) while it is spent. A local simulator, where
calls are free, is polled every 50 ms.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["FAST_POLL", "RATE_STEP", "poll_interval", "rate_wait"]

#: Seconds between status polls under ``fast_polling`` (a simulator, where calls are free).
FAST_POLL = 0.05


def poll_interval(waited: float, time_left: float, rate: Any, now: float,
                  fast: bool = False) -> float:
    """Seconds until the next status poll, ``waited`` s into a wait with ``time_left`` s.

    The real API's budget is 3600 calls an hour per token, shared by every job
    using it, so polls are frugal: at 0.25 s and 1 s (a quick host), then every
    2 s so that READY is noticed within 2 s. If the ``X-RateLimit-*`` budget
    (``rate``, keeping 20 calls for teardown) cannot pay for that until the wait
    ends or the window resets, polls are spread evenly over what is left.
    ``fast`` polls every 50 ms instead (the embedded simulator).
    """
    if fast:
        base = FAST_POLL
    else:
        base = 0.25 if waited < 0.25 else 0.75 if waited < 1.0 else 2.0
    if rate is not None and rate.reset > now:
        horizon = max(0.0, min(rate.reset - now, time_left))
        spare = rate.remaining - 20
        if spare <= 0:
            # Spent (or down to the teardown's share): wait for the reset in steps, so that
            # the progress line says so and the ready timeout still bounds the wait.
            return max(FAST_POLL, min(horizon, RATE_STEP))
        if spare * base < horizon:
            base = max(base, horizon / max(spare, 1))
    return base


#: The longest single sleep while the rate-limit budget is spent.
RATE_STEP = 5.0


def rate_wait(rate: Any, now: float) -> str | None:
    """What the progress line says while the budget is spent (``Remaining: 0`` with a
    ``Reset`` to come), or None while there is budget."""
    if rate is None or rate.remaining > 0 or rate.reset <= now:
        return None
    at = time.strftime("%H:%M:%S", time.gmtime(rate.reset))
    return f"API rate limit spent: waiting for its reset at {at} UTC, in {rate.reset - now:.0f} s"
