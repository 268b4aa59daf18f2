"""The world's work off its lock: effects queued under the lock and run when the outermost
transaction ends, the ticker thread, and the workers that start SSH hosts.

Starting and stopping hosts and posting eurl notifications must not run while the world's
lock is held; the world queues them with :meth:`Background.defer` (or
:meth:`Background.offload` for slow work) inside :meth:`Background.transaction`. An
unexpected exception of any of this work is kept in :attr:`Background.errors`, never lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

__all__ = ["Background"]

log = logging.getLogger(__name__)


class _Depth(threading.local):
    """How deeply the current thread is nested in :meth:`Background.transaction`."""

    n = 0


class Background:
    """The effects queue, the ticker (calling ``tick`` every ``interval`` seconds) and the
    host workers of one world whose lock is ``lock``.

    Without :meth:`start`, nothing runs in the background: offloaded work runs as an
    ordinary effect and time moves only by explicit ticks.
    """

    def __init__(self, lock: threading.RLock, tick: Callable[[], None],
                 interval: float) -> None:
        self.lock = lock
        self.interval = interval
        #: Unexpected exceptions from background work, first first.
        self.errors: list[BaseException] = []
        self._tick = tick
        self._effects: list[Callable[[], None]] = []
        self._depth = _Depth()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: Waits, at most the seconds given, until the HTTP server answers no request (the
        #: simulator sets its server's): a host worker calls it before stopping a host.
        self.wait_quiet: Callable[[float], None] = lambda timeout: None

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called: nothing new should start."""
        return self._stop.is_set()

    def start(self) -> None:
        """Start the host workers and the ticker (once)."""
        if self._ticker is not None:
            return
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="rerobots-sim-host")
        self._ticker = threading.Thread(target=self._tick_loop, name="rerobots-sim-ticker",
                                        daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        """Stop the ticker, and the workers once their current work is done. Idempotent."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except Exception as exc:
                log.exception("simulator tick failed")
                self.errors.append(exc)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Hold the lock; when the outermost transaction ends, run the queued effects."""
        with self.lock:
            depth = self._depth.n
            self._depth.n = depth + 1
            try:
                yield
            finally:
                self._depth.n = depth
        if depth == 0:
            self._run_effects()

    def defer(self, effect: Callable[[], None]) -> None:
        """Run ``effect`` when the outermost transaction ends (call it under the lock)."""
        self._effects.append(effect)

    def offload(self, work: Callable[[], None]) -> None:
        """Hand ``work`` to a worker when the outermost transaction ends; without workers
        (not started), run it then instead."""
        pool = self._pool
        self.defer(work if pool is None else partial(self._submit, pool, work))

    def _submit(self, pool: ThreadPoolExecutor, work: Callable[[], None]) -> None:
        try:
            pool.submit(work)
        except RuntimeError:
            # The world is closing; nothing more is started.
            log.debug("not starting work: the simulator is closing")

    def _run_effects(self) -> None:
        while True:
            with self.lock:
                effects, self._effects = self._effects, []
            if not effects:
                return
            for effect in effects:
                try:
                    effect()
                except Exception as exc:
                    log.exception("simulator effect failed")
                    self.errors.append(exc)
