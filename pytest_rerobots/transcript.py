"""What a test did on its robots: commands, file transfers and live processes.

A :class:`Transcript` is a thread-safe list of :class:`Entry` records. A
:class:`~pytest_rerobots.ssh.Connection` with a ``transcript`` records every
``run``, ``put``, ``get`` and spawned process into it; the plugin takes the
entries of each test (:meth:`Transcript.take`) and shows them in the test's
report. Entries hold only the tails of output (:func:`tail`), so a chatty
command cannot make a report, or the memory of a long run, grow without bound.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .textsafe import block_lines, one_line

__all__ = ["Entry", "Transcript", "tail"]

TAIL_LINES = 20
TAIL_CHARS = 2000


def tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last ``lines`` lines of ``text``, at most ``chars`` characters, with a
    first line saying how much was left out when something was."""
    # Measured on the lines joined by LF, as they are shown: a CRLF line end is one
    # line break, not a character left out.
    every = text.rstrip("\r\n").splitlines()
    whole = "\n".join(every)
    out = "\n".join(every[-lines:] if lines else [])
    if len(out) > chars:
        out = out[-chars:]
    if len(out) < len(whole):
        dropped = len(whole) - len(out)
        out = f"[... {dropped} characters before ...]\n{out}"
    return out


@dataclass(frozen=True)
class Entry:
    """One thing a test did on a robot.

    ``kind`` is ``"run"``, ``"put"``, ``"get"`` or ``"spawn"``; ``status`` the
    exit status, ``None`` when there was none (timed out, failed to start, a
    transfer); ``note`` what went wrong, if anything (``"timed out after 5 s"``,
    ``"no such file"``). ``stdout`` and ``stderr`` are tails.
    """

    at: float
    kind: str
    command: str
    instance: str
    status: int | None
    duration: float
    stdout: str = ""
    stderr: str = ""
    note: str = ""

    def render(self) -> str:
        """The entry as the lines a report shows: the robot's output as it printed it,
        but with its control characters shown as escapes (``\\x1b[2J``), so that a
        terminal that shows the report acts on none (textsafe)."""
        stamp = time.strftime("%H:%M:%S", time.localtime(self.at))
        facts = [] if self.status is None else [f"exit {self.status}"]
        facts.append(f"{self.duration:.2f} s")
        if self.note:
            facts.append(self.note)
        head = f"{stamp} [{self.instance}] {self.kind}: {self.command}  [{', '.join(facts)}]"
        lines = [one_line(head)]
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                lines.append(f"  {name}:")
                lines.extend(f"    {line}" for line in block_lines(text))
        return "\n".join(lines)


class Transcript:
    """A thread-safe list of entries, taken out by whoever reports them."""

    def __init__(self, limit: int = 1000) -> None:
        self._entries: list[Entry] = []
        self._dropped = 0
        self._limit = limit
        self._lock = threading.Lock()

    def record(self, entry: Entry) -> None:
        """Add ``entry``; past ``limit`` entries the oldest are dropped (and counted)."""
        with self._lock:
            self._entries.append(entry)
            if len(self._entries) > self._limit:
                del self._entries[0]
                self._dropped += 1

    def take(self) -> tuple[list[Entry], int]:
        """The entries recorded since the last ``take`` and how many were dropped; empties it."""
        with self._lock:
            entries, self._entries = self._entries, []
            dropped, self._dropped = self._dropped, 0
        return entries, dropped

    @staticmethod
    def render(entries: list[Entry], dropped: int = 0) -> str:
        """Entries as the text of a report section."""
        lines = [f"[{dropped} earlier entries dropped]"] if dropped else []
        lines.extend(entry.render() for entry in entries)
        return "\n".join(lines)
