"""The signal guard: SIGTERM and SIGHUP end a run as Ctrl-C does, and repeats wait while
instances are being terminated (layer 2 of docs/contract.md, "Termination"). Once a signal
arrived, an end that must wait (an instance still in INIT) says so at once, with how long
at most (:func:`waiting_to_end`), and so does each repeat that is ignored.

Nothing here imports pytest or anything of this package.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

__all__ = ["SignalGuard", "tell_the_terminal", "waiting_to_end"]


def tell_the_terminal(text: str) -> None:
    """Write to the controlling terminal: pytest captures stderr, and whoever pressed
    Ctrl-C twice is looking at the terminal. Without one (CI), stderr."""
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(text)
    except OSError:
        sys.stderr.write(text)


class SignalGuard:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread, as SIGINT does,
    so pytest runs teardown. Once one arrived, repeats (SIGINT included) are ignored for
    ``grace`` seconds so that teardown can finish terminating instances; after that a
    signal interrupts again (an operator who insists gets their way).

    Installed only from the main thread. A signal whose handler was not set from
    Python, or is ``SIG_IGN`` (``nohup``), is left alone, and so is SIGINT unless
    Python's default handler owns it. Previous Python handlers are called (chained)
    on the first signal and restored by :meth:`uninstall`. An ignored signal is
    reported through ``write`` (default: the controlling terminal, else stderr).

    ``on_first`` are called (with the signal's name) when the first signal arrives, before
    ``KeyboardInterrupt`` is raised: e.g. the plugin's embedded simulator stops making ends
    wait for INIT, since it stops with the run. The installed guard is
    :attr:`SignalGuard.active`; :func:`waiting_to_end` reports through it.
    """

    SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")

    #: The guard whose handlers are installed (one at a time: the main thread's).
    active: ClassVar[SignalGuard | None] = None

    def __init__(self, grace: float = 30.0,
                 write: Callable[[str], Any] | None = None) -> None:
        self.grace = grace
        self.first_at: float | None = None
        #: The name of the first signal (``"SIGINT"``...), once one arrived.
        self.first_name: str | None = None
        self.on_first: list[Callable[[str], Any]] = []
        self._write = write or tell_the_terminal
        self._previous: dict[int, Any] = {}
        # What teardown waits for: a number -> (what, when that wait gives up).
        self._waits: dict[int, tuple[str, float]] = {}
        self._wait_numbers = itertools.count()
        self._waits_lock = threading.RLock()  # (the handler may run while we hold it)

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Install the handlers; False (and nothing changed) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self._previous:
            return True
        self.first_at = self.first_name = None
        for name in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            previous = signal.getsignal(signum)
            if previous is None or previous is signal.SIG_IGN:
                continue  # set from C (cannot be restored) or deliberately ignored
            if signum == signal.SIGINT and previous is not signal.default_int_handler:
                continue  # somebody else owns SIGINT; leave it alone
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        SignalGuard.active = self
        return True

    def uninstall(self) -> None:
        """Restore the previous handlers (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            # Only undo our own handler: whoever replaced it since keeps theirs.
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        self._previous.clear()
        if SignalGuard.active is self:
            SignalGuard.active = None

    @property
    def interrupted(self) -> bool:
        """Whether a signal arrived since the guard was installed."""
        return self.first_at is not None

    def say(self, text: str) -> None:
        """Tell whoever sent the signal (``write``); never raises."""
        with contextlib.suppress(Exception):
            self._write(text)

    def waiting(self, what: str, seconds: float) -> Callable[[], None]:
        """Teardown waits up to ``seconds`` for ``what`` (after a signal): say so at once,
        and in each ignored repeat; returns what to call when that wait is over."""
        key = next(self._wait_numbers)
        with self._waits_lock:
            self._waits[key] = (what, time.monotonic() + seconds)
        self.say(f"\nrerobots: {self.first_name or 'interrupted'}: waiting for {what}, "
                 f"at most {seconds:.0f} s, then terminating it (the API does not end an "
                 "instance that is still starting)\n")

        def over() -> None:
            with self._waits_lock:
                self._waits.pop(key, None)
        return over

    def _ignored(self, name: str, now: float) -> str:
        """The line for a repeat ignored during the grace: with what teardown still waits
        for, if anything, and for how long a repeat is still ignored."""
        line = f"\nrerobots: {name} ignored while instances are being terminated"
        with self._waits_lock:
            waits = sorted((deadline, what) for what, deadline in self._waits.values())
        if not waits:
            return line + "\n"
        assert self.first_at is not None
        deadline, what = waits[-1]
        more = f" and {len(waits) - 1} more" if len(waits) > 1 else ""
        grace_left = max(0.0, self.first_at + self.grace - now)
        return (f"{line} (waiting for {what}{more}, at most {max(0.0, deadline - now):.0f} s "
                f"more; a signal after {grace_left:.0f} s more stops the wait)\n")

    def _handle(self, signum: int, frame: Any) -> None:
        __tracebackhide__ = True  # pytest reports where the run was, not this handler
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first_at is not None and now - self.first_at < self.grace:
            # Teardown is under way: a second signal must not abort it.
            self.say(self._ignored(name, now))
            return
        first = self.first_at is None
        self.first_at = now
        if first:
            self.first_name = name
            for hook in self.on_first:
                with contextlib.suppress(Exception):  # a hook must not stop the interrupt
                    hook(name)
        previous = self._previous.get(signum)
        if callable(previous) and previous not in (signal.default_int_handler, self._handle):
            previous(signum, frame)
        raise KeyboardInterrupt(f"received {name}")


def waiting_to_end(what: str, seconds: float) -> Callable[[], None]:
    """An end is about to wait up to ``seconds`` for ``what`` (an instance to leave INIT):
    if a signal interrupted this process, its guard says so at once. Returns what to call
    when the wait is over. Without an installed, interrupted guard (a watchdog, a sweep,
    a run that was not interrupted), nothing is said."""
    guard = SignalGuard.active
    if guard is None or not guard.interrupted:
        return _nothing
    return guard.waiting(what, seconds)


def _nothing() -> None:
    pass
