"""Users, their tokens and their request budgets.

Users exist through their tokens (a token maps to a user name). A revoked token is
remembered by its SHA-256, as on the server, so an unknown digest can be revoked ahead of
time. Every request is charged to a rate window: per token for a valid token, else per
caller address; the ``X-RateLimit-*`` headers show the window as :class:`RateState`. As on
the server, the request after the last one of the budget is still served (Remaining then
reads -1); the one after that is refused. The table of windows is bounded
(``max_windows``): expired windows go first, then the oldest.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import ConfigurationError
from .catalog import RateLimits

__all__ = ["Accounts", "RateState"]


@dataclass(frozen=True)
class RateState:
    """One rate-limit window as the ``X-RateLimit-*`` headers show it."""

    limit: int
    remaining: int
    reset: int
    allowed: bool


@dataclass
class _RateWindow:
    start: float
    count: int = 0


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Accounts:
    """Tokens, revocations and rate windows of one simulator; thread-safe.

    ``limits`` is copied, so run-time changes (``World.configure``) never touch the catalog.
    """

    def __init__(self, tokens: Mapping[str, str], limits: RateLimits,
                 clock: Callable[[], float]) -> None:
        self.limits = dataclasses.replace(limits)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, str] = dict(tokens)
        self._revoked: set[str] = set()
        self._windows: collections.OrderedDict[str, _RateWindow] = collections.OrderedDict()
        #: Most windows kept (callers seen within a window); see :meth:`charge`.
        self.max_windows = 10_000

    def add_token(self, user: str, token: str | None = None) -> str:
        """Give ``user`` (new or known) one more valid token (generated unless given);
        returns it. Users exist through their tokens, so this is also how one is created."""
        if not user or not isinstance(user, str):
            raise ConfigurationError(f"add_token: a user name is a non-empty string, got {user!r}")
        if token is not None and (not token or any(ch.isspace() for ch in token)):
            raise ConfigurationError("add_token: a token must be non-empty, without whitespace")
        token = token or secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = user
        return token

    def authenticate(self, token: str | None) -> str | None:
        """The user of a valid, unrevoked token; ``None`` otherwise (the caller is anonymous)."""
        if not token:
            return None
        with self._lock:
            user = self._tokens.get(token)
            if user is None or _sha256(token) in self._revoked:
                return None
            return user

    def revoke(self, user: str, digest: str) -> None:
        """Revoke the caller's token whose SHA-256 is ``digest``; an unknown digest is recorded.

        A digest of another user's token is ignored, as on the server.
        """
        digest = digest.lower()
        with self._lock:
            owners = {u for t, u in self._tokens.items() if _sha256(t) == digest}
            if not owners or user in owners:
                self._revoked.add(digest)

    def purge(self, user: str) -> None:
        """Revoke every token of ``user``."""
        with self._lock:
            self._revoked.update(_sha256(t) for t, u in self._tokens.items() if u == user)

    def window_for(self, user: str | None, token: str | None, address: str) -> tuple[str, int]:
        """The rate window a request is charged to, and its budget: the token's for a known
        user, else the caller address's."""
        if user is not None and token is not None:
            return f"token:{token}", self.limits.token_budget
        return f"ip:{address}", self.limits.ip_budget

    def charge(self, key: str, budget: int, *, count: bool = True) -> RateState:
        """Count one request against ``key``'s window (``count=False`` only looks)."""
        with self._lock:
            now = self._clock()
            window = self._windows.get(key)
            if window is None or now >= window.start + self.limits.rate_window:
                window = self._windows[key] = _RateWindow(start=now)
                # Oldest first: a new or restarted window goes to the end.
                self._windows.move_to_end(key)
                self._bound_windows(now)
            if count:
                window.count += 1
            remaining = budget - window.count
            return RateState(
                limit=budget,
                remaining=max(remaining, -1),
                reset=math.ceil(window.start + self.limits.rate_window),
                # The server refuses once its counter is below zero *before* this request:
                # its check is ``>``, so request number budget + 1 is still served.
                allowed=remaining >= -1,
            )

    def _bound_windows(self, now: float) -> None:
        """Drop expired windows (oldest first), then, past ``max_windows``, the oldest."""
        windows = self._windows
        if len(windows) <= self.max_windows:
            return
        span = self.limits.rate_window
        while windows:
            oldest = next(iter(windows.values()))
            if now < oldest.start + span:
                break
            windows.popitem(last=False)
        while len(windows) > self.max_windows:
            windows.popitem(last=False)

    def window_count(self) -> int:
        """How many rate windows are kept now."""
        with self._lock:
            return len(self._windows)
