"""What the pytest plugin tells its user: live progress, short failure reports, the
terminal summary, JUnit properties and the GitHub step summary. Never the token.

The pytest half of reporting, beside :mod:`.plugin`, its only user; what it reports
on is the run's :class:`~pytest_rerobots.records.Records`, which the engine keeps
without pytest.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

import _pytest
import pluggy
import pytest

from .board import Board, wait_line
from .outcome import ENDED_OUTCOMES, Outcome
from .records import Records
from .textsafe import commands_stopped, md_cell, md_code, one_line

try:  # junitxml has no public way to add a system-out element
    from _pytest.junitxml import bin_xml_escape, xml_key
except ImportError:  # pragma: no cover (a pytest that moved it)
    bin_xml_escape = xml_key = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

    from .camera import Pictures
    from .instance import FailedRental, Instance

__all__ = ["TRANSCRIPT_KEY", "BoardWatcher", "Progress", "Tally", "annotate", "cost_markdown",
           "github_step_summary", "junit_run_properties", "junit_transcript",
           "record_properties", "redact", "rows", "setup_error_annotation", "short_failure",
           "terminal_summary"]

#: In a CI log (no terminal), print a progress line at most this often.
CI_PROGRESS_EVERY = 10.0


def _line(instance: Instance, waited: float) -> str:
    return f"rerobots: {wait_line(instance, waited)}"


class Progress:
    """An instance listener that shows a wait of more than a second for an instance:
    one line rewritten in place on a terminal, a plain line every 10 s in CI logs, and
    a last line when the wait ends."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._begun: dict[int, float] = {}
        self._last_print: dict[int, float] = {}
        self._shown: set[int] = set()

    def _reporter(self) -> TerminalReporter | None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.option.verbose < 0:
            return None
        return reporter

    def _show(self, text: str, *, in_place: bool, first: bool = False,
              last: bool = False) -> None:
        reporter = self._reporter()
        if reporter is None:
            return
        text = one_line(text)  # the API's status, in a line rewritten in place
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        # Fixture setup runs under output capture; step outside it to reach the terminal.
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            if first:
                reporter.ensure_newline()
            if in_place:
                reporter.rewrite(text)
                if last:
                    reporter.write("\n")
            else:
                reporter.write_line(text)

    def _tty(self) -> bool:
        reporter = self._reporter()
        return bool(reporter and reporter.isatty and os.environ.get("CI") is None)

    def rented(self, instance: Instance) -> None:
        self._begun[id(instance)] = time.monotonic()

    def progress(self, instance: Instance) -> None:
        if threading.current_thread() is not threading.main_thread():
            # Robots readied in the background (several at once, or a session's prefetch)
            # must not suspend output capture under a test that runs meanwhile: the
            # thread that waits for them shows their progress (Instance.show_progress).
            return
        key = id(instance)
        now = time.monotonic()
        waited = now - self._begun.setdefault(key, now)
        done = instance.status == "READY"
        if done:
            if key in self._shown:
                self._show(_line(instance, waited), in_place=self._tty(), last=True)
                self._shown.discard(key)
            return
        if waited < 1.0:
            return  # a quick start is not worth a line
        first = key not in self._shown
        self._shown.add(key)
        if self._tty():
            self._show(_line(instance, waited), in_place=True, first=first)
        elif now - self._last_print.get(key, now - CI_PROGRESS_EVERY) >= CI_PROGRESS_EVERY:
            self._last_print[key] = now
            self._show(_line(instance, waited), in_place=False, first=first)

    def reserved(self, instance: Instance, reservation: str) -> None:
        pass  # the queue's progress lines say it

    def unreserved(self, instance: Instance, reservation: str) -> None:
        pass

    def replaced(self, instance: Instance, failed: FailedRental) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # (the summary lists it)
        self._show(f"rerobots: {instance.label} {failed.id} {failed.status}: ended, "
                   "renting another", in_place=False, first=True)

    def ended(self, instance: Instance) -> None:
        key = id(instance)
        # Ended while waiting (failed, interrupted); from the main thread only, as above.
        if key in self._shown and threading.current_thread() is threading.main_thread():
            self._show(_line(instance, time.monotonic() - self._begun.get(key, 0.0)),
                       in_place=self._tty(), last=True)
            self._shown.discard(key)
        self._begun.pop(key, None)
        self._last_print.pop(key, None)


class BoardWatcher:
    """The xdist controller's view of its workers' waits: workers cannot write to the
    terminal, so each posts its wait on the run's board (:mod:`.board`) and this thread
    of the controller prints it, ``rerobots [gw1]: basic_kobuki ... BUSY 12s (...)``:
    when it has lasted a second, then every 10 s while it lasts."""

    def __init__(self, config: pytest.Config, board: Board, every: float = 0.5) -> None:
        self.config = config
        self.board = board
        self.every = every
        self._stop = threading.Event()
        self._printed: dict[tuple[Any, Any], float] = {}
        self._thread = threading.Thread(target=self._loop, name="rerobots-board",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # a progress line is a courtesy
                self.look()

    def look(self) -> None:
        """Print the waits due now."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or self.config.option.verbose < 0:
            return
        now = time.time()
        seen = set()
        for wait in self.board.waits():
            key = (wait.get("worker"), wait.get("since"))
            seen.add(key)
            if now - float(wait.get("posted") or 0) > 5.0:
                continue  # stale: that worker has stopped posting
            last = self._printed.get(key)
            if last is not None and now - last < CI_PROGRESS_EVERY:
                continue
            self._printed[key] = now
            reporter.ensure_newline()
            reporter.write_line(one_line(f"rerobots [{wait.get('worker') or '?'}]: "
                                         f"{wait.get('line')}"))
        for key in set(self._printed) - seen:
            del self._printed[key]


#: The most lines of an error's message an annotation carries.
ANNOTATION_LINES = 20


def _command_data(text: str) -> str:
    """``text`` as the data of a workflow command: one line (``%``, CR and LF encoded)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _command_property(text: str) -> str:
    """``text`` as a property of a workflow command (``:`` and ``,`` encoded too)."""
    return _command_data(text).replace(":", "%3A").replace(",", "%2C")


def setup_error_annotation(item: pytest.Item, exc: BaseException) -> str:
    """The ``::error`` workflow command for a test whose setup failed on rerobots trouble
    (no robot free in time, a start that failed, an unknown type): at the test's line,
    with the error's message (its first lines), all of it one line the runner cannot read
    another command in."""
    path, lineno, _ = item.location
    message = f"{type(exc).__name__}: {exc}".splitlines()[:ANNOTATION_LINES]
    title = f"rerobots: setup error in {item.name}"
    return (f"::error file={_command_property(path)},line={(lineno or 0) + 1},"
            f"title={_command_property(title)}::{_command_data(chr(10).join(message))}")


#: The two kinds of a test that fails on a robot (JUnit property ``rerobots_failure``).
FAILURE_KINDS = ("infrastructure", "product")


def failure_annotation(item: pytest.Item, when: str, exc: BaseException) -> str:
    """The ``::error`` workflow command for a test that ended in infrastructure trouble
    (its robot lost, SSH, the API): at the test's line, saying it is not the product."""
    path, lineno, _ = item.location
    message = f"{type(exc).__name__}: {exc}".splitlines()[:ANNOTATION_LINES]
    title = (f"rerobots: infrastructure trouble, not the product ({when}) in {item.name}")
    return (f"::error file={_command_property(path)},line={(lineno or 0) + 1},"
            f"title={_command_property(title)}::{_command_data(chr(10).join(message))}")


def annotate(config: pytest.Config, command: str) -> None:
    """Print a workflow command on a line of its own, outside any capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        sys.stdout.write(command + "\n")
        return
    reporter.ensure_newline()
    tw = getattr(reporter, "_tw", None)
    if getattr(tw, "width_of_current_line", 0):  # after progress characters (xdist's too)
        reporter.write("\n")
    reporter.write_line(command)


def record_properties(item: pytest.Item, instance: Instance) -> None:
    """Add the instance's identity to a test's JUnit XML properties."""
    for name, value in (("rerobots_instance", instance.id), ("rerobots_wtype", instance.wtype),
                        ("rerobots_deployment", instance.deployment),
                        ("rerobots_region", instance.region)):
        if value and (name, value) not in item.user_properties:
            item.user_properties.append((name, value))


#: Outcomes after which nothing is left running on our account (or someone else ends it).
ENDED_OK = (*ENDED_OUTCOMES, Outcome.HANDED_OVER, Outcome.NEVER_RENTED, Outcome.KEPT)

def ended_ok(cell: str) -> bool:
    """Whether a summary row's "ended" cell means nothing is left running."""
    return cell.partition(" (")[0] in ENDED_OK


HEADERS = ("instance", "type", "deployment", "region", "queued", "to READY", "held", "ended")


def rows(records: Records) -> list[tuple[str, ...]]:
    """One row per instance of the run (``HEADERS``), workers' rows included, and one
    per rental that failed to start and was replaced."""
    out = list(records.remote_rows)
    for i in records.instances:
        for f in i.failed_rentals:
            out.append((f.id, i.wtype or i.target, (f.deployment or "-")[:8], f.region or "-",
                        "-", "-", "-", f"{f.outcome or 'NOT TERMINATED'} ({f.status}, replaced)"))
        t = i.timings
        out.append((i.id or "-", i.wtype or i.target, (i.deployment or "-")[:8], i.region or "-",
                    f"{t.queued:.1f}s", f"{t.to_ready:.1f}s", f"{t.held:.1f}s",
                    _ended(i)))
    return out


def _ended(instance: Instance) -> str:
    if instance.outcome is None:
        return "NOT TERMINATED"
    if instance.outcome == Outcome.TERMINATE_FAILED:
        return f"{instance.outcome}: {instance.failure}"
    # Kept after the run, or attached to from an earlier run (--rerobots-keep-on-failure,
    # --rerobots-reuse): e.g. "kept (for reuse; reused)".
    notes = []
    if instance.outcome == Outcome.KEPT:
        from .keep import purpose  # lazily: only a run that kept an instance needs the store

        notes.append(f"for {purpose(instance.keep_for)}")
    if instance.reused:
        notes.append("reused")
    if instance.lost is not None:
        notes.append(f"lost: {instance.lost.reason}")
    return f"{instance.outcome} ({'; '.join(notes)})" if notes else str(instance.outcome)


def terminal_summary(reporter: TerminalReporter, records: Records,
                     skipped_for_token: int) -> None:
    """The rerobots section of pytest's terminal summary (controller only)."""
    if skipped_for_token:
        reporter.write_line(
            f"rerobots: {skipped_for_token} test(s) skipped: no API token "
            "(set REROBOTS_API_TOKEN, or run with --rerobots-sim)", yellow=True)
    for ident, outcome in records.leftovers.items():
        reporter.write_line(f"rerobots: instance {ident} left by a worker: {outcome}",
                            red=outcome.startswith("failed"))
    table_rows = rows(records)
    if not table_rows:
        return
    reporter.section("rerobots instances")
    # Cells hold the API's strings (region, status, an error's text): one line each, no
    # control character; and under GitHub Actions, no workflow command the runner reads
    # (it reads the legacy ``##[command]`` anywhere in a line).
    table = [HEADERS, *([one_line(cell) for cell in row] for row in table_rows)]
    widths = [max(len(r[c]) for r in table) for c in range(len(HEADERS))]
    with commands_stopped(reporter.write_line):
        for row in table:
            line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
            reporter.write_line(line.rstrip())
        for row in table[1:]:
            if not ended_ok(row[-1]):
                reporter.write_line(
                    f"LEAKED: instance {row[0]} ({row[1]}) was not terminated: {row[-1]}. "
                    "Run `pytest --rerobots-sweep`.", red=True, bold=True)


@dataclass(frozen=True)
class Tally:
    """How the tests of a run ended, as pytest's summary line counts them."""

    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    failed_names: tuple[str, ...] = ()
    errored_names: tuple[str, ...] = ()
    extra: Mapping[str, int] = field(default_factory=dict)
    #: Tests that failed on a robot, by kind (``rerobots_failure``): infrastructure
    #: trouble and product failures.
    kinds: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, stats: Mapping[str, Sequence[Any]]) -> Tally:
        """From ``TerminalReporter.stats`` (category -> reports)."""
        def names(key: str) -> tuple[str, ...]:
            seen = dict.fromkeys(str(getattr(r, "nodeid", "")) for r in stats.get(key, ()))
            return tuple(n for n in seen if n)

        counted = ("passed", "failed", "error", "skipped")
        extra = {k: len(v) for k, v in stats.items()
                 if k in ("xfailed", "xpassed", "deselected", "rerun") and v}
        kinds: dict[str, int] = {}
        for key in ("failed", "error"):
            for rep in stats.get(key, ()):
                kind = getattr(rep, "rerobots_failure", None)
                if isinstance(kind, str):
                    kinds[kind] = kinds.get(kind, 0) + 1
        return cls(len(stats.get("passed", ())), len(stats.get("failed", ())),
                   len(stats.get("error", ())), len(stats.get("skipped", ())),
                   names(counted[1]), names(counted[2]), extra, kinds)

    @property
    def line(self) -> str:
        parts = [f"{self.passed} passed", f"{self.failed} failed", f"{self.errors} errors",
                 f"{self.skipped} skipped", *(f"{n} {k}" for k, n in self.extra.items())]
        line = ", ".join(parts)
        if self.kinds:
            line += " (on robots: " + ", ".join(
                f"{self.kinds.get(k, 0)} {k}" for k in FAILURE_KINDS) + ")"
        return line


def github_step_summary(records: Records, tally: Tally | None = None, *,
                        skipped_for_token: int = 0, token: bool = True,
                        extra: Sequence[str] = ()) -> None:
    """Append the run's outcome in Markdown to ``$GITHUB_STEP_SUMMARY``, when set: the
    counts, the failed tests, then the instance table; or, when nothing was rented for
    want of a token (a fork's pull request gets no secrets), one line saying so."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    table_rows = rows(records)
    no_token = not table_rows and not token and skipped_for_token > 0
    if not path or not (table_rows or no_token):
        return
    lines = []
    if tally is not None:
        lines += [f"### rerobots: {tally.line}", ""]
        for title, names in (("Failed", tally.failed_names), ("Errors", tally.errored_names)):
            if names:
                lines += [f"{title}:", "", *(f"- {md_code(name)}" for name in names), ""]
    if no_token:
        lines.append(f"No robot was rented: no API token (REROBOTS_API_TOKEN is not set; a "
                     f"pull request from a fork gets no secrets), so {skipped_for_token} "
                     "test(s) were skipped.")
    else:
        lines += ["### rerobots instances", "", "| " + " | ".join(HEADERS) + " |",
                  "|" + "---|" * len(HEADERS)]
        # The API's strings, rendered by GitHub: no image, link, HTML, or "|" that
        # breaks the table; what the API sent is shown as text.
        lines += ["| " + " | ".join(md_cell(cell) for cell in row) + " |"
                  for row in table_rows]
        lines += ["", *extra]  # (what the run cost: cost_markdown)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    except OSError as exc:
        print(f"rerobots: cannot write GITHUB_STEP_SUMMARY: {exc}", file=sys.stderr)


def cost_markdown(lines: Sequence[str], chart: Sequence[str],
                  replays: Mapping[str, str]) -> list[str]:
    """The step summary's part on what the run cost (:mod:`.costs`): its summary lines, the
    timeline as a Mermaid gantt chart (GitHub draws it), and the replay line of each failed
    test, as code blocks (verbatim, copyable)."""
    out = [f"{md_cell(line)}  " for line in lines]
    if len(chart) > 4:  # (more than its header: something was rented)
        out += ["", "#### rerobots timeline", "", "```mermaid", *chart, "```"]
    if replays:
        out += ["", "#### rerobots: run a failed test again on its robot's deployment", ""]
        for nodeid, line in replays.items():
            out += [f"{md_code(nodeid)}:", "", "```sh", one_line(line).replace("`", "'"),
                    "```", ""]
    return out


def junit_run_properties(config: pytest.Config, properties: Sequence[tuple[str, str]]) -> None:
    """Add the run's properties (its instance-minutes) to the JUnit XML's test suite."""
    xml = config.stash.get(xml_key, None) if xml_key is not None else None
    if xml is None:
        return
    for name, value in properties:
        xml.add_global_property(name, value)


def redact(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` replaced by ``***``."""
    return text.replace(token, "***") if token else text


_PACKAGE = Path(__file__).resolve().parent


def _in(path: object, directory: Path) -> bool:
    try:
        return Path(str(path)).resolve().is_relative_to(directory)
    except (OSError, ValueError):
        return False


def short_failure(excinfo: pytest.ExceptionInfo[BaseException], config: pytest.Config
                  ) -> Any | None:
    """A report of one of this package's errors that shows the test's own frames and
    the message: not the package's frames beneath them, nor the foreign exceptions
    they were raised from. None (pytest's own report) under ``--full-trace``, and for
    ``--tb`` styles that show no frames anyway (``line``, ``no``, ``native``)."""
    if config.getoption("fulltrace", False):
        return None
    style = config.getoption("tbstyle", "auto")
    if style in ("line", "no", "native"):
        return None
    internal = [Path(m.__file__ or "").resolve().parent for m in (_pytest, pluggy)]
    kept = []
    for entry in excinfo.traceback:
        if _in(entry.path, _PACKAGE):
            break  # from here down it is this package (and what it called)
        if not any(_in(entry.path, d) for d in internal) and not entry.ishidden(excinfo):
            kept.append(entry)
    mine = excinfo.traceback.filter(lambda entry: any(entry is k for k in kept))
    return excinfo.getrepr(
        style="short" if style == "short" else "long",
        showlocals=bool(config.getoption("showlocals", False)),
        tbfilter=lambda _info: mine, chain=False, funcargs=True)


#: The key of the transcript's report section: pytest names it "Captured <key> <when>".
TRANSCRIPT_KEY = "rerobots transcript"


def junit_transcript(config: pytest.Config, rep: pytest.TestReport) -> None:
    """Put the test's transcript sections into its JUnit XML ``system-out`` (when
    ``--junitxml`` is on), whatever ``junit_logging`` says: it is what the test did
    on the robot, not the test's own output."""
    text = "\n".join(content for name, content in rep.sections
                     if name.startswith(f"Captured {TRANSCRIPT_KEY} "))
    if not text or xml_key is None:
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    node = ElementTree.Element("system-out")
    node.text = bin_xml_escape(text)
    xml.node_reporter(rep).append(node)


#: The report section that lists a test's camera pictures (camera.py).
CAMERA_KEY = "rerobots camera"


def attach_pictures(config: pytest.Config, rep: pytest.TestReport, pictures: Pictures) -> None:
    """Attach a test's camera pictures to its report: a section of the failure report with
    each path (and a line for each camera that gave none), the paths on the report for the
    JUnit XML and the step summary (``rerobots_pictures``, which travels to the xdist
    controller), and each image in pytest-html's report when pytest-html is there."""
    lines = [f"rerobots: camera picture: {path}" for path in pictures.saved]
    lines += pictures.notes
    if not lines:
        return
    if pictures.saved:
        lines.append(f"rerobots: the camera took {pictures.seconds:.1f} s")
    rep.sections.append((CAMERA_KEY, "\n".join(lines)))
    if not pictures.saved:
        return
    rep.rerobots_pictures = [str(path) for path in pictures.saved]  # type: ignore[attr-defined]
    if config.pluginmanager.hasplugin("html"):
        _html_images(rep, pictures.saved)


def _html_images(rep: pytest.TestReport, paths: Sequence[Path]) -> None:
    """Embed the pictures in pytest-html's report (its ``extras``), if it can be loaded."""
    import base64

    try:
        from pytest_html import extras  # type: ignore[import-not-found]  # optional
    except ImportError:
        return
    found = list(getattr(rep, "extras", []) or [])
    for path in paths:
        try:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except OSError:
            continue
        found.append(extras.jpg(data, name=path.name))
    rep.extras = found  # type: ignore[attr-defined]


def junit_attachments(config: pytest.Config, rep: pytest.TestReport,
                      pictures: Sequence[str]) -> None:
    """``[[ATTACHMENT|path]]`` lines in the test's JUnit XML ``system-out`` (Jenkins' JUnit
    attachments and GitLab read them), when ``--junitxml`` is on."""
    if xml_key is None:
        return
    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    node = ElementTree.Element("system-out")
    node.text = bin_xml_escape("\n".join(f"[[ATTACHMENT|{path}]]" for path in pictures))
    xml.node_reporter(rep).append(node)


def pictures_summary(terminalreporter: TerminalReporter, pictures: Sequence[str]) -> None:
    """The run's camera pictures: one line on the terminal, and their list in the GitHub
    step summary (the files themselves are in the workflow's uploaded artifact)."""
    if not pictures:
        return
    where = sorted({str(Path(p).parent) for p in pictures})
    terminalreporter.write_line(
        f"rerobots: {len(pictures)} camera picture(s) saved under {', '.join(where)}")
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    lines = ["### rerobots: camera pictures", "",
             "In the artifact the workflow uploads (see its summary page):", "",
             *(f"- {md_code(Path(p).name)}" for p in pictures), ""]
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    except OSError as exc:
        print(f"rerobots: cannot write GITHUB_STEP_SUMMARY: {exc}", file=sys.stderr)
