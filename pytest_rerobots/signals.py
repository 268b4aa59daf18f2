"""The signal guard: SIGTERM and SIGHUP end a run as Ctrl-C does, and repeats wait while
instances are being terminated (layer 2 of docs/contract.md, "Termination").

Nothing here imports pytest or anything of this package.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SignalGuard"]


def _tell_the_terminal(text: str) -> None:
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
    """

    SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")

    def __init__(self, grace: float = 30.0,
                 write: Callable[[str], Any] | None = None) -> None:
        self.grace = grace
        self.first_at: float | None = None
        self._write = write or _tell_the_terminal
        self._previous: dict[int, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> bool:
        """Install the handlers; False (and nothing changed) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self._previous:
            return True
        self.first_at = None
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

    def _handle(self, signum: int, frame: Any) -> None:
        __tracebackhide__ = True  # pytest reports where the run was, not this handler
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.first_at is not None and now - self.first_at < self.grace:
            # Teardown is under way: a second signal must not abort it.
            with contextlib.suppress(Exception):
                self._write(f"\nrerobots: {name} ignored while instances are being "
                            "terminated\n")
            return
        self.first_at = now
        previous = self._previous.get(signum)
        if callable(previous) and previous not in (signal.default_int_handler, self._handle):
            previous(signum, frame)
        raise KeyboardInterrupt(f"received {name}")
