"""Fault injection: what the simulator does wrong on purpose.

A :class:`FaultInjector` holds the ``[faults]`` settings of the catalog (changed at run time
through ``World.configure``), the per-endpoint errors and latency, the pending failures of
:meth:`FaultInjector.fail_next` and of :meth:`FaultInjector.lose_new_responses`, and the
seedable random generator behind every draw (including the fate of new instances). The HTTP
layer asks it before each request; the world asks it when an instance is made.
"""

from __future__ import annotations

import dataclasses
import random
import threading

from ..errors import ConfigurationError
from .catalog import EndpointFault, Faults, check_endpoint

__all__ = ["FaultInjector"]


class FaultInjector:
    """The run-time fault state of one simulator; thread-safe."""

    def __init__(self, settings: Faults) -> None:
        #: The ``[faults]`` settings, a copy of the catalog's (so run-time changes stay here).
        self.settings = dataclasses.replace(
            settings,
            endpoints={k: dataclasses.replace(v) for k, v in settings.endpoints.items()},
        )
        self._lock = threading.Lock()
        self._rng = random.Random(self.settings.seed)
        self._lost_new_responses = 0
        self._forced_failures: dict[str, list[int]] = {}

    def reseed(self, seed: int | None) -> None:
        """Restart the random draws from ``seed``."""
        with self._lock:
            self._rng.seed(seed)

    def draw(self, probability: float) -> bool:
        """A biased coin from the (seedable) random generator; no draw at all for 0."""
        if probability <= 0:
            return False
        with self._lock:
            return self._rng.random() < probability

    def set_endpoint_fault(
        self,
        endpoint: str,
        *,
        error_rate: float = 0.0,
        error_status: int = 500,
        latency: float = 0.0,
    ) -> None:
        """Make ``endpoint`` (a name of :data:`~.endpoints.ENDPOINT_NAMES`, or ``"*"``) fail
        with ``error_status`` at ``error_rate`` and answer ``latency`` seconds late."""
        check_endpoint(endpoint, "set_endpoint_fault")
        if not 0.0 <= error_rate <= 1.0:
            raise ConfigurationError(f"set_endpoint_fault: error_rate must be in [0, 1], "
                                     f"got {error_rate!r}")
        if not 500 <= error_status <= 599:
            raise ConfigurationError(f"set_endpoint_fault: error_status must be 5xx, "
                                     f"got {error_status!r}")
        if latency < 0:
            raise ConfigurationError(f"set_endpoint_fault: latency must be >= 0, got {latency!r}")
        with self._lock:
            self.settings.endpoints[endpoint] = EndpointFault(error_rate, error_status, latency)

    def endpoint_fault(self, endpoint: str) -> EndpointFault | None:
        """The fault set for ``endpoint``, or else the one for ``"*"``."""
        with self._lock:
            endpoints = self.settings.endpoints
            return endpoints.get(endpoint) or endpoints.get("*")

    def fail_next(self, endpoint: str, count: int = 1, status: int = 503) -> None:
        """The next ``count`` calls of ``endpoint`` (or of any endpoint, for ``"*"``) answer
        ``status`` without acting: a deterministic alternative to an error rate."""
        check_endpoint(endpoint, "fail_next")
        if not 500 <= status <= 599:
            raise ConfigurationError(f"fail_next: status must be 5xx, got {status!r}")
        with self._lock:
            self._forced_failures.setdefault(endpoint, []).extend([status] * count)

    def take_forced_failure(self, endpoint: str) -> int | None:
        """The status of a pending :meth:`fail_next` failure for ``endpoint``, consumed."""
        with self._lock:
            for name in (endpoint, "*"):
                pending = self._forced_failures.get(name)
                if pending:
                    return pending.pop(0)
            return None

    def lose_new_responses(self, count: int = 1) -> None:
        """The next ``count`` successful POST /new act, then drop the connection unanswered."""
        with self._lock:
            self._lost_new_responses += count

    def take_lost_response(self) -> bool:
        """Whether the answer to the POST /new that just succeeded should be lost."""
        with self._lock:
            if self._lost_new_responses > 0:
                self._lost_new_responses -= 1
                return True
            rate = self.settings.lose_new_response
            return rate > 0 and self._rng.random() < rate

    def clear(self) -> None:
        """Turn off the faults held here (endpoint errors and latency, pending failures,
        404 window, stuck INIT, lost responses, held robots lost)."""
        with self._lock:
            self.settings.endpoints.clear()
            self.settings.not_found_window = 0.0
            self.settings.stuck_init = 0.0
            self.settings.lose_new_response = 0.0
            self.settings.lose_held = ""
            self._lost_new_responses = 0
            self._forced_failures.clear()
