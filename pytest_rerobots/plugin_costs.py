"""What a run cost, and each_deployment's verdicts, under pytest: the deployments a test
is parametrized over, what each test's reports say of its robots (noted on the report,
which travels to the xdist controller, and tallied there), the run's JUnit properties
and the summary's lines. The arithmetic is :mod:`.costs`'s, loaded only once a robot was
rented or each_deployment names a test (a run that rents nothing never needs it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from .errors import RerobotsError

if TYPE_CHECKING:
    from .instance import Instance
    from .records import Records
    from .settings import Secret

#: The parameter each_deployment gives a test: the deployment it runs on.
EACH_PARAM = "rerobots_each_deployment"


def each_of(item: pytest.Item) -> Any:
    """The deployment each_deployment gives ``item`` (its parameter), if any."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(EACH_PARAM) if callspec is not None else None


class RunCosts:
    """One process's tally: the workers' instances, and, from every test's reports, its
    uses of robots, the seconds tests used them, the replay lines of failed tests and
    each_deployment's verdicts."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.remote_spans: list[dict[str, Any]] = []
        self.uses: list[dict[str, Any]] = []
        self.used_seconds = 0.0
        self.replays: dict[str, str] = {}
        self.each: dict[str, dict[str, str]] = {}
        # each_deployment: {workspace type: [(deployment, region)]}, listed once.
        self._deployments: dict[str, list[tuple[str, str | None]]] = {}
        self.each_regions: dict[str, str | None] = {}

    def deployments_of(self, wtype: str, api_url: str, token: Secret | None
                       ) -> list[tuple[str, str | None]]:
        """The deployments of ``wtype`` (id, region), sorted; listed once per process, from
        this run's API (the public listing without a token); a collection error in one line
        if they cannot be listed or there are none."""
        if wtype in self._deployments:
            return self._deployments[wtype]
        from .client import RerobotsClient  # lazily: requests loads only when needed

        revealed = token.reveal() if token else None
        try:
            with RerobotsClient(token=revealed, api_url=api_url, ignore_env=True) as api:
                payload = api.deployments(types=[wtype], info=True)
        except RerobotsError as exc:
            raise pytest.Collector.CollectError(
                f"rerobots: each_deployment: cannot list the deployments of {wtype} at "
                f"{api_url}: {exc}") from None
        info = payload.get("info") or {}
        found = []
        for ident in payload.get("workspace_deployments", []):
            details = info.get(ident) or {}
            if details.get("type") not in (None, wtype):
                continue
            region = details.get("region")
            found.append((str(ident), str(region) if region else None))
        if not found:
            raise pytest.Collector.CollectError(
                f"rerobots: each_deployment: workspace type {wtype} has no deployments at "
                f"{api_url}; nothing was rented")
        found.sort(key=lambda d: (d[1] or "", d[0]))
        self._deployments[wtype] = found
        return found

    def note(self, item: pytest.Item, call: pytest.CallInfo[None], rep: pytest.TestReport,
             given: list[Instance], pooled: Instance | None, reuse: float | None) -> None:
        """On the report (it travels to the xdist controller): the test's uses of robots,
        the replay line of a failed test, and which deployment each_deployment ran it on."""
        if call.when == "call" and given:
            rep.rerobots_uses = [  # type: ignore[attr-defined]
                {"test": item.nodeid, "instance": inst.id, "start": call.start,
                 "stop": call.stop, "failed": rep.failed}
                for inst in dict.fromkeys(given) if inst.id]
        inst = pooled
        if rep.failed and inst is not None and inst.deployment:
            from . import costs  # lazily: only once a robot was rented

            line = costs.replay_command(item.nodeid, inst.deployment,
                                        reuse if inst.keep_for == "reuse" else None)
            rep.rerobots_replay = line  # type: ignore[attr-defined]
            rep.sections.append(("rerobots replay (run this test again on that robot's "
                                 "deployment)", line))
        each = each_of(item)
        if isinstance(each, str):
            from . import costs  # lazily: only each_deployment's tests

            eid = costs.each_id(each, self.each_regions.get(each))
            head, _, ids = item.nodeid.partition("[")
            others = "-".join(p for p in ids.removesuffix("]").split("-") if p) \
                if eid not in ids else ids.removesuffix("]").replace(eid, "", 1).strip("-")
            others = others.replace("--", "-")
            base = f"{head}[{others}]" if others else head
            rep.rerobots_each = [base, each, self.each_regions.get(each)]  # type: ignore[attr-defined]

    def collect(self, report: pytest.TestReport) -> None:
        """The controller's (or a run without xdist's) tally of each test's report."""
        self.uses.extend(getattr(report, "rerobots_uses", None) or [])
        if report.when == "call":
            for name, value in report.user_properties:
                if name == "rerobots_use_s":
                    self.used_seconds += float(str(value))
        replay = getattr(report, "rerobots_replay", None)
        if isinstance(replay, str):
            self.replays.setdefault(report.nodeid, replay)
        each = getattr(report, "rerobots_each", None)
        if isinstance(each, list | tuple) and len(each) == 3:
            key = f"{str(each[1])[:8]} {each[2] or '?'}"
            verdicts = self.each.setdefault(str(each[0]), {})
            if report.failed:
                verdicts[key] = "failed"
            elif report.when == "call" and report.passed and verdicts.get(key) != "failed":
                verdicts[key] = "passed"

    def spans(self) -> list[dict[str, Any]]:
        """Every instance of the run (workers' included), as :func:`.costs.span` has it."""
        if not self.records.instances:
            return list(self.remote_spans)
        from . import costs  # lazily: only once a robot was rented

        return [*self.remote_spans, *(costs.span(i) for i in self.records.instances)]

    def run_properties(self) -> list[tuple[str, str]]:
        """The run's JUnit properties: its instance-minutes, in total and per instance."""
        spans = [s for s in self.spans() if s.get("rented") is not None]
        if not spans:
            return []
        from . import costs  # lazily: only once a robot was rented

        t = costs.totals(spans, self.used_seconds)
        props = [("rerobots_instances", str(int(t["instances"]))),
                 ("rerobots_instance_minutes", f"{t['minutes']:.4f}"),
                 ("rerobots_queued_s", f"{t['queued']:.3f}"),
                 ("rerobots_starting_s", f"{t['starting']:.3f}"),
                 ("rerobots_tests_s", f"{t['tests']:.3f}")]
        props += [(f"rerobots_instance_minutes.{s['id']}", f"{float(s['billed']) / 60:.4f}")
                  for s in spans]
        return props

    def lines(self) -> list[str]:
        """The summary's lines of what the run cost and of each_deployment's verdicts."""
        lines = []
        spans = self.spans()
        if any(s.get("rented") is not None for s in spans):
            from . import costs  # lazily: only once a robot was rented

            lines.append(costs.summary_line(spans, self.used_seconds))
        for base, verdicts in self.each.items():
            ran = verdicts
            passed = [k for k, v in ran.items() if v == "passed"]
            failed = [k for k, v in ran.items() if v == "failed"]
            line = f"rerobots: {base} passes on {len(passed)} of {len(ran)} robots"
            if failed:
                line += ": fails on " + ", ".join(failed)
            lines.append(line)
        return lines
