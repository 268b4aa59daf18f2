"""What a run cost and where its time went (issue 24): instance-minutes in the terminal
summary, the step summary and JUnit; the Mermaid timeline; the replay line of a failed test;
the budget; each_deployment. Plugin runs against the simulator."""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET

import pytest

from pytest_rerobots.budget import Budget
from pytest_rerobots.costs import MANY_TESTS, each_id, gantt, replay_command
from pytest_rerobots.errors import BudgetReached
from pytest_rerobots.sim import Simulator
from pytest_rerobots.textsafe import mermaid_text

pytest_plugins = ["pytester"]

KOBUKI = {"b34d1ee4-2a7b-445a-824a-ba4a30759f7f": "us:cali",
          "df013a45-f40f-451e-a911-2465a8c24f1a": "eu:de"}

TWO_TESTS = """
import pytest
pytestmark = pytest.mark.rerobots("basic_kobuki")

def test_good(rerobots_instance):
    assert rerobots_instance.run("true").exit_status == 0

def test_bad(rerobots_instance):
    assert rerobots_instance.run("false").exit_status == 0
"""

#: The words a line of the chart may begin with (so no test id can start a directive).
CHART_WORDS = ("gantt", "title", "dateFormat", "axisFormat", "section", "queued", "starting",
               "tests", "pass", "FAIL", "terminating")


def _chart(markdown: str) -> list[str]:
    body = markdown.split("```mermaid\n", 1)[1].split("\n```", 1)[0]
    return body.splitlines()


def test_instance_minutes_timeline_and_junit(pytester: pytest.Pytester, sim_env: Simulator,
                                              monkeypatch: pytest.MonkeyPatch):
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makepyfile(TWO_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "--rerobots-scope", "function",
                                "--junitxml", "junit.xml")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines([r"rerobots: 2 instances, \d+\.\d\d instance-minutes; "
                                  r"[\d.]+ s queued, [\d.]+ s starting, [\d.]+ s on tests"])
    text = summary.read_text()
    assert re.search(r"rerobots\\: 2 instances, \d+\.\d\d instance-minutes", text)
    chart = _chart(text)
    assert chart[0] == "gantt" and "    dateFormat x" in chart
    assert all(line.split()[0] in CHART_WORDS for line in chart), chart
    assert sum(line.startswith("    section basic_kobuki") for line in chart) == 2
    for phase in ("queued", "starting", "tests", "terminating"):
        assert any(line.startswith(f"    {phase} :") for line in chart), phase
    fail = [line for line in chart if line.startswith("    FAIL ")]
    assert len(fail) == 1 and ":crit, " in fail[0] and "test_bad" in fail[0]
    assert any(line.startswith("    pass ") and "test_good" in line for line in chart)
    # Every task's times: two instants in ms, the end not before the start.
    for line in chart:
        if re.match(r"    (queued|starting|tests|pass|FAIL|terminating)", line):
            start, end = (int(x) for x in re.findall(r"(\d{10,}),? ?", line.split(":")[-1]))
            assert end >= start

    root = ET.parse(pytester.path / "junit.xml").getroot()  # noqa: S314 (written by this test)
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    run_props = {p.get("name"): p.get("value") for p in suite.find("properties") or []}
    assert run_props["rerobots_instances"] == "2"
    assert float(run_props["rerobots_instance_minutes"]) > 0
    per_instance = [n for n in run_props if n.startswith("rerobots_instance_minutes.")]
    assert len(per_instance) == 2
    for case in suite.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert float(props["rerobots_wait_s"]) > 0, case.get("name")
        assert float(props["rerobots_use_s"]) >= 0, case.get("name")


def test_replay_line_runs_that_one_test_on_that_deployment(pytester: pytest.Pytester,
                                                           sim_env: Simulator):
    pytester.makepyfile(test_replay=TWO_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    lines = [line for line in result.outlines if line.startswith("pytest '")]
    assert len(lines) == 1, result.outlines
    line = lines[0]
    assert line.startswith("pytest 'test_replay.py::test_bad' --rerobots-deployment '")
    deployment = shlex.split(line)[3]
    assert deployment in KOBUKI
    before = sim_env.request_count("new")
    again = pytester.runpytest("-p", "no:cacheprovider", *shlex.split(line)[1:])
    again.assert_outcomes(failed=1)  # that one test, and only it
    assert sim_env.request_count("new") - before == 1
    again.stdout.re_match_lines([rf".*basic_kobuki\s+{deployment[:8]}\s+.*terminated"])


def test_replay_command_quotes_for_the_shell():
    line = replay_command("tests/test_x.py::test_y[it's; rm -rf /]", "9f70", reuse=30)
    assert shlex.split(line) == ["pytest", "tests/test_x.py::test_y[it's; rm -rf /]",
                                 "--rerobots-deployment", "9f70", "--rerobots-reuse", "30"]


def test_chart_names_cannot_break_mermaid():
    hostile = "tests/t.py::test_x[a:b;c#d%%e<br>`f`\ng{h}]"
    name = mermaid_text(hostile)
    assert not set(name) & set(":;#%<>`{}\n")
    span = {"id": "1" * 36, "wtype": "basic_kobuki", "deployment": "d" * 36,
            "region": "eu:de;#", "requested": 100.0, "rented": 101.0, "ready": 102.0,
            "ending": 110.0, "ended": 111.0, "billed": 10.0, "leaked": False}
    uses = [{"test": hostile, "instance": "1" * 36, "start": 103.0, "stop": 104.0,
             "failed": True}]
    chart = gantt([span], uses)
    assert all(line.split()[0] in CHART_WORDS for line in chart)
    task_lines = [line for line in chart if line.startswith("    FAIL")]
    assert len(task_lines) == 1 and task_lines[0].count(":") == 1
    assert "eu.de__" in chart[4]


def test_many_tests_are_grouped_by_module():
    span = {"id": "i" * 36, "wtype": "basic_kobuki", "requested": 0.0, "rented": 1.0,
            "ready": 2.0, "ending": 500.0, "ended": 501.0, "billed": 500.0}
    uses = [{"test": f"tests/test_{n % 3}.py::test_{n}", "instance": "i" * 36,
             "start": 3.0 + n, "stop": 3.5 + n, "failed": n == 7}
            for n in range(MANY_TESTS + 1)]
    chart = gantt([span], uses)
    tests = [line for line in chart if line.startswith(("    pass", "    FAIL"))]
    assert len(tests) == 3
    assert any("test_1.py (14 tests, 1 failed)" in line and "crit" in line for line in tests)


def test_each_id_is_short_id_and_region():
    assert each_id("df013a45-f40f-451e-a911-2465a8c24f1a", "eu:de") == "df013a45-eu:de"
    assert each_id("df013a45-f40f", "eu de]::x") == "df013a45-eu_de_::x"


# -- the budget -------------------------------------------------------------------


class _Fake:
    def __init__(self, ident: str, rented: float) -> None:
        from pytest_rerobots.instance import Timings

        self.id, self.existing, self.timings = ident, None, Timings(rented_at=rented)


def test_budget_counts_held_robots_and_says_what_stopped_it(tmp_path):
    now = [1000.0]
    budget = Budget(0.5, tmp_path, clock=lambda: now[0])
    other_worker = Budget(0.5, tmp_path, clock=lambda: now[0])
    budget.check("basic_kobuki")
    inst = _Fake("a", 1000.0)
    budget.rented(inst)  # type: ignore[arg-type]
    now[0] = 1031.2  # held, not ended: it still costs
    with pytest.raises(BudgetReached) as info:
        other_worker.check("basic_kobuki")  # the whole run's budget, through the board
    assert str(info.value) == ("budget of 0.5 instance-minutes reached (0.52 spent); "
                               "not renting basic_kobuki")
    inst.timings.ended_at = 1020.0
    budget.ended(inst)  # type: ignore[arg-type]
    assert other_worker.spent() == pytest.approx(20 / 60)
    other_worker.check("basic_kobuki")


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--rerobots-budget=-1"], {}, "must be a number of instance-minutes, 0 or more"),
    (["--rerobots-budget=lots"], {}, "'lots' is not a number of instance-minutes"),
    ([], {"REROBOTS_BUDGET": "x"}, "environment variable REROBOTS_BUDGET"),
])
def test_bad_budget_is_a_usage_error(pytester: pytest.Pytester, monkeypatch, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


BUDGET_TESTS = """
import time, pytest
pytestmark = pytest.mark.rerobots("basic_kobuki")

@pytest.mark.parametrize("n", range(4))
def test_robot(rerobots_instance, n):
    time.sleep(1.2)  # every rental costs at least 1.2 s of the 1.8 s budget
"""


def test_budget_stops_renting(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(BUDGET_TESTS)
    before = sim_env.request_count("new")
    result = pytester.runpytest("-p", "no:cacheprovider", "--rerobots-scope", "function",
                                "--rerobots-budget", "0.03")
    rentals = sim_env.request_count("new") - before
    assert 1 <= rentals < 4
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) == 4 - rentals
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.re_match_lines([r".*BudgetReached: budget of 0.03 instance-minutes reached "
                                  r"\(0\.\d\d spent\); not renting basic_kobuki"])
    assert sim_env.live_instances() == []


def test_budget_is_for_the_whole_xdist_run(pytester: pytest.Pytester, sim_env: Simulator):
    pytest.importorskip("xdist")
    pytester.makepyfile(BUDGET_TESTS)
    before = sim_env.request_count("new")
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider",
                                           "--rerobots-scope", "function",
                                           "--rerobots-budget", "0.03")
    # Per worker, each would rent twice (1.2 s < 1.8 s): four. For the run, at most three.
    assert 1 <= sim_env.request_count("new") - before < 4
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*budget of 0.03 instance-minutes reached*"])
    assert sim_env.live_instances() == []


# -- each_deployment ----------------------------------------------------------------

EACH = """
import pytest

@pytest.mark.rerobots("basic_kobuki", each_deployment=True)
def test_on_each(rerobots_instance, rerobots_each_deployment):
    assert rerobots_instance.deployment == rerobots_each_deployment
"""


def test_each_deployment_runs_once_on_each(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(test_each=EACH)
    result = pytester.runpytest("-p", "no:cacheprovider", "--rerobots-scope", "function",
                                "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random([
        "*test_each.py::test_on_each?b34d1ee4-us:cali? PASSED*",
        "*test_each.py::test_on_each?df013a45-eu:de? PASSED*",
        "rerobots: test_each.py::test_on_each passes on 2 of 2 robots"])
    assert sim_env.request_count("new") == 2


def test_each_deployment_says_where_it_fails(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(test_each="""
        def test_eu_only(rerobots_instance):
            assert rerobots_instance.region == "eu:de"
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--rerobots-each-deployment",
                                "--rerobots-wtype", "basic_kobuki")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "rerobots: test_each.py::test_eu_only passes on 1 of 2 robots: fails on b34d1ee4 us:cali"])


def test_each_deployment_in_parallel(pytester: pytest.Pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_each=EACH)
    result = pytester.runpytest_subprocess("-n", "2", "--rerobots-sim", "-p", "no:cacheprovider",
                                           "--rerobots-scope", "function")
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "b34d1ee4" in out and "df013a45" in out
    result.stdout.fnmatch_lines(["rerobots: test_each.py::test_on_each passes on 2 of 2 robots"])


def test_each_deployment_lists_without_a_token(pytester: pytest.Pytester, sim_env: Simulator,
                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("REROBOTS_API_TOKEN")
    pytester.makepyfile(test_each=EACH)
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q")
    result.stdout.fnmatch_lines_random(["test_each.py::test_on_each[[]b34d1ee4-us:cali[]]",
                                        "test_each.py::test_on_each[[]df013a45-eu:de[]]"])


def test_each_deployment_of_a_type_with_none(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(test_each=EACH.replace("basic_kobuki", "no_such_robot"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*each_deployment: workspace type no_such_robot has no "
                                 "deployments at*; nothing was rented"])
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert sim_env.request_count("new") == 0


def test_each_deployment_listing_unreachable(pytester: pytest.Pytester,
                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REROBOTS_API_URL", "http://127.0.0.1:9")
    pytester.makepyfile(test_each=EACH)
    result = pytester.runpytest("-p", "no:cacheprovider")
    lines = [line for line in result.outlines if "cannot list the deployments" in line]
    assert len(lines) == 1, result.outlines
    assert "each_deployment: cannot list the deployments of basic_kobuki" in lines[0]
