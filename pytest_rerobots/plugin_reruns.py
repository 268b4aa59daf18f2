"""Infrastructure trouble told apart from product failures, and its reruns
(``--rerobots-reruns``): the kind of a failed test on a robot, its status word, and the
runs again of a test that ended in infrastructure trouble.

Its hooks live in :class:`RerunHooks`, registered with the plugin manager next to the
plugin's state object (:class:`.plugin.RerobotsPlugin`), whose current test they read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .errors import is_infrastructure
from .textsafe import in_github_actions

if TYPE_CHECKING:
    from .instance import Instance
    from .plugin import RerobotsPlugin

#: The fixtures through which a test rents (a failure of such a test gets a kind).
RENTING_FIXTURES = frozenset({"rerobots_instance", "rerobots_ssh", "rerobots_sftp",
                              "rerobots_acquire", "rerobots_host", "rerobots_run"})


def on_robot(item: pytest.Item, given: list[Instance]) -> bool:
    """Whether ``item`` uses a robot: a fixture of ours that rents, or one it got."""
    names = getattr(item, "fixturenames", ())
    return bool(given) or any(n in RENTING_FIXTURES for n in names)


def label_failure(item: pytest.Item, rep: pytest.TestReport,
                  call: pytest.CallInfo[None]) -> None:
    """Record which kind of failure this is: infrastructure trouble or the product
    (``rerobots_failure``: on the report, which travels to the xdist controller, and a
    JUnit property of the test case), and annotate infrastructure trouble."""
    exc = call.excinfo.value if call.excinfo is not None else None
    kind = "infrastructure" if exc is not None and is_infrastructure(exc) else "product"
    rep.rerobots_failure = kind  # type: ignore[attr-defined]
    item.user_properties[:] = [p for p in item.user_properties
                               if p[0] != "rerobots_failure"]
    item.user_properties.append(("rerobots_failure", kind))
    if kind == "infrastructure" and rep.when == "call" and exc is not None \
            and in_github_actions():
        from . import plugin_report  # lazily: a run that rents nothing never loads it

        rep.rerobots_annotation = plugin_report.failure_annotation(  # type: ignore[attr-defined]
            item, rep.when, exc)


class RerunHooks:
    """The hooks of failure kinds and reruns (registered with the plugin's state object)."""

    def __init__(self, plugin: RerobotsPlugin) -> None:
        self.plugin = plugin

    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config
                                 ) -> tuple[str, str, str] | None:
        # A plain word, not (word, markup): pytest before 8.3 prints the pair's repr in
        # its short summary. The report failed, so pytest colours the word red anyway.
        if report.outcome == "rerun":
            return "rerun", "R", "RERUN"
        kind = getattr(report, "rerobots_failure", None)
        if report.when == "call" and getattr(report, "rerobots_infrastructure", False):
            return "error", "E", "ERROR (infrastructure)"
        if report.when == "setup" and report.failed and kind == "infrastructure":
            return "error", "E", "ERROR (infrastructure)"
        if report.when == "call" and report.failed and kind == "product":
            return "failed", "F", "FAILED (product)"
        return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None
                                ) -> bool | None:
        """With ``--rerobots-reruns N``: run a test on a robot again, up to N times, while it
        ends in infrastructure trouble; a product failure is never rerun. An attempt that
        is rerun is reported as ``rerun`` (R), as pytest-rerunfailures does; its error is
        kept as the JUnit property ``rerobots_rerun_<n>``."""
        reruns = self.plugin.settings.reruns
        if reruns <= 0 or not on_robot(item, self.plugin._given):
            return None
        from _pytest.runner import runtestprotocol

        item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for attempt in range(reruns + 1):
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
            trouble = next((r for r in reports if r.failed and getattr(
                r, "rerobots_failure", None) == "infrastructure"), None)
            if trouble is None or attempt == reruns:
                for rep in reports:
                    item.ihook.pytest_runtest_logreport(report=rep)
                break
            for rep in reports:
                if rep is trouble:
                    rep.outcome = "rerun"  # type: ignore[assignment]
                    item.ihook.pytest_runtest_logreport(report=rep)
                    break
                item.ihook.pytest_runtest_logreport(report=rep)
            self._prepare_rerun(item, attempt + 1, trouble)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def _prepare_rerun(self, item: pytest.Item, attempt: int, trouble: pytest.TestReport
                       ) -> None:
        """Keep the attempt's error for JUnit, and start the test afresh: its fixtures set
        up again, failed starts forgotten (a lost robot is dropped by the pool itself)."""
        crash = getattr(trouble.longrepr, "reprcrash", None)
        message = getattr(crash, "message", None) or str(trouble.longrepr).splitlines()[-1:]
        item.user_properties[:] = [p for p in item.user_properties
                                   if p[0] != "rerobots_failure"]
        item.user_properties.append((f"rerobots_rerun_{attempt}", str(message)))
        if self.plugin._run is not None:
            self.plugin._run.forget_failures()
        self.plugin._given = []
        fixtureinfo = getattr(item, "_fixtureinfo", None)
        for defs in (fixtureinfo.name2fixturedefs.values() if fixtureinfo else ()):
            for fixturedef in defs:
                cached = getattr(fixturedef, "cached_result", None)
                if cached is not None and cached[2] is not None:  # failed: set up again
                    fixturedef.cached_result = None
        init = getattr(item, "_initrequest", None)
        if callable(init):
            init()
