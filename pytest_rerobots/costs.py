"""What a run cost and where its time went: instance-minutes, the timeline, the replay line.

Pure Python (no pytest): the plugin's reports (:mod:`.plugin_report`) read it, and xdist
workers send its plain dicts to the controller.

**What counts as an instance-minute.** The service bills an instance from its creation to
its end. Here an instance's billable time runs from the moment ``POST /new`` answered with
its id (a reservation's wait in a queue is not billed: nothing exists yet) to the moment the
service accepted its terminate or said it had already ended; while the run still holds it,
to now. An instance attached to from another process (shared by xdist workers) is billed
to the process that rented it; one an earlier run kept counts from the moment this run took
it over to the moment it ended or was kept again. A rental that failed to start and was
replaced counts from the replacement's answer (the failed one's seconds are not added).

A **span** is one instance's timeline as a dict of JSON values (``span()``); a **use** is
one test on one instance: ``{"test", "instance", "start", "stop", "failed"}`` (wall-clock
seconds).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .outcome import Outcome
from .textsafe import mermaid_text

if TYPE_CHECKING:
    from .instance import Instance

__all__ = ["MANY_TESTS", "billed_seconds", "duration", "each_id", "gantt", "replay_command",
           "span", "summary_line", "totals"]

#: Above this many tests on robots, the timeline shows one bar per module on each robot.
MANY_TESTS = 40


def billed_seconds(instance: Instance, now: float | None = None) -> float:
    """The instance's billable seconds so far (see the module's docstring); 0 for one this
    process did not rent."""
    t = instance.timings
    if t.rented_at is None:
        return 0.0
    end = t.ended_at if t.ended_at is not None else (now if now is not None else time.time())
    return max(0.0, end - t.rented_at)


def span(instance: Instance, now: float | None = None) -> dict[str, Any]:
    """The instance's timeline and cost, as JSON values."""
    t = instance.timings
    return {
        "id": instance.id, "wtype": instance.wtype or instance.target,
        "deployment": instance.deployment, "region": instance.region,
        "requested": t.requested_at, "rented": t.rented_at, "ready": t.ready_at,
        "ending": t.ending_at, "ended": t.ended_at,
        "queued": t.queued, "to_ready": t.to_ready,
        "billed": billed_seconds(instance, now),
        "leaked": instance.outcome is None or instance.outcome == Outcome.TERMINATE_FAILED,
    }


def totals(spans: Iterable[Mapping[str, Any]], used: float) -> dict[str, float]:
    """The run's sums: instances rented, instance-minutes, seconds queued, starting and
    used by tests (``used``, summed by the caller from the tests)."""
    rented = [s for s in spans if s.get("rented") is not None]
    return {
        "instances": float(len(rented)),
        "minutes": sum(float(s.get("billed") or 0) for s in rented) / 60.0,
        "queued": sum(float(s.get("queued") or 0) for s in rented),
        "starting": sum(float(s.get("to_ready") or 0) for s in rented),
        "tests": used,
    }


def duration(seconds: float) -> str:
    """``0.3 s``, ``41 s``, ``2 min``, ``2.5 min``, ``1.5 h``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}".removesuffix(".0") + " min"
    return f"{seconds / 3600:.1f}".removesuffix(".0") + " h"


def summary_line(spans: Iterable[Mapping[str, Any]], used: float) -> str:
    """``rerobots: 4 instances, 3.20 instance-minutes; 41 s queued, 28 s starting, 2 min on
    tests``."""
    t = totals(spans, used)
    n = int(t["instances"])
    return (f"rerobots: {n} instance{'s' if n != 1 else ''}, {t['minutes']:.2f} "
            f"instance-minutes; {duration(t['queued'])} queued, {duration(t['starting'])} "
            f"starting, {duration(t['tests'])} on tests")


def _shell_quote(text: str) -> str:
    """``text`` in single quotes for a POSIX shell (always quoted, so it reads the same)."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def replay_command(nodeid: str, deployment: str, reuse: float | None = None) -> str:
    """The command that runs test ``nodeid`` again on ``deployment`` (and attaches to the
    robot this run kept for reuse, if ``reuse`` minutes are given), from the rootdir."""
    line = f"pytest {_shell_quote(nodeid)} --rerobots-deployment {_shell_quote(deployment)}"
    if reuse is not None:
        line += f" --rerobots-reuse {reuse:g}"
    return line


def each_id(deployment: str, region: str | None) -> str:
    """The test id of one deployment of ``each_deployment``: its short id and region
    (``df013a45-eu:de``), in characters a node id and a shell take as they are."""
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_.:-") else "_"
                   for ch in (region or "unknown"))
    return f"{deployment[:8]}-{safe}"


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _task(name: str, start: float, end: float, tag: str = "") -> str:
    end = max(end, start)
    return f"    {name} :{tag + ', ' if tag else ''}{_ms(start)}, {_ms(end)}"


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _test_tasks(uses: Sequence[Mapping[str, Any]], grouped: bool) -> list[str]:
    if not grouped:
        return [_task(f"{'FAIL' if u.get('failed') else 'pass'} {mermaid_text(str(u['test']))}",
                      float(u["start"]), float(u["stop"]), "crit" if u.get("failed") else "")
                for u in uses]
    lines = []
    modules: dict[str, list[Mapping[str, Any]]] = {}
    for u in uses:
        modules.setdefault(_module(str(u["test"])), []).append(u)
    for module, group in modules.items():
        failed = sum(1 for u in group if u.get("failed"))
        what = f"{len(group)} tests" + (f", {failed} failed" if failed else "")
        lines.append(_task(f"{'FAIL' if failed else 'pass'} {mermaid_text(module)} ({what})",
                           min(float(u["start"]) for u in group),
                           max(float(u["stop"]) for u in group), "crit" if failed else ""))
    return lines


def gantt(spans: Sequence[Mapping[str, Any]], uses: Sequence[Mapping[str, Any]],
          now: float | None = None) -> list[str]:
    """The run's timeline as the lines of a Mermaid gantt chart (without the Markdown
    fence): a section per robot, its phases (queued, starting, tests, terminating) and the
    tests that ran on it, failures marked ``crit``; one bar per module on each robot when
    the run had more than :data:`MANY_TESTS` tests on robots. Every name is made safe
    (:func:`.textsafe.mermaid_text`); every line begins with a word of this function's."""
    now = now if now is not None else time.time()
    by_instance: dict[str, list[Mapping[str, Any]]] = {}
    for u in uses:
        by_instance.setdefault(str(u.get("instance")), []).append(u)
    grouped = len(uses) > MANY_TESTS
    lines = ["gantt", "    title rerobots: where the run's time went", "    dateFormat x",
             "    axisFormat %H:%M:%S"]
    for s in spans:
        ident = str(s.get("id") or "")
        requested = s.get("requested") or s.get("rented") or s.get("ready")
        if not ident or requested is None:
            continue
        where = " ".join(str(x) for x in (s.get("wtype"), ident[:8],
                                           str(s.get("deployment") or "")[:8],
                                           s.get("region")) if x)
        minutes = float(s.get("billed") or 0) / 60.0
        lines.append(f"    section {mermaid_text(where)} ({minutes:.2f} min)")
        rented, ready = s.get("rented"), s.get("ready")
        ending, ended = s.get("ending"), s.get("ended")
        if rented is not None and float(rented) - float(requested) >= 0.001:
            lines.append(_task("queued", float(requested), float(rented)))
        start_from = rented if rented is not None else requested
        if ready is not None:
            lines.append(_task("starting", float(start_from), float(ready)))
            held_until = ending if ending is not None else ended if ended is not None else now
            lines.append(_task("tests", float(ready), float(held_until), "active"))
        mine = sorted(by_instance.get(ident, ()), key=lambda u: float(u["start"]))
        lines += _test_tasks(mine, grouped)
        if ending is not None:
            lines.append(_task("terminating", float(ending),
                               float(ended if ended is not None else now),
                               "crit" if s.get("leaked") else "done"))
    return lines
