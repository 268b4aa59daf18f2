"""``pytest --rerobots-rent-ahead``: robots rented before the test run, held by keepers
while they start, attached to by the next run of the checkout (CI included).

Each case runs pytest through pytester against a simulator served by this process as if
it were the real API (so the runs have their ledger and keepers). The ready delay is long
enough that a robot rented ahead is still in INIT when the command returns: that is what
shows it does not wait for READY (no test measures this machine's speed). Every test ends
with no live instance and no keeper left.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from helpers import records, store, wait_until

from pytest_rerobots import procs
from pytest_rerobots.ledger import Ledger
from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]

KEEPALIVE_WINDOW = 1.0
PING = "0.2"
READY_DELAY = 1.5
LIVE = ("INIT", "READY")

SUITE = '''
import pathlib
import pytest

@pytest.mark.rerobots("basic_kobuki")
def test_kobuki(rerobots_instance):
    with pathlib.Path("ids.txt").open("a") as fh:
        fh.write(rerobots_instance.id + "\\n")
    assert rerobots_instance.run("echo ok").stdout == "ok\\n"

@pytest.mark.rerobots("fixed_misty2")
def test_misty(rerobots_instance):
    with pathlib.Path("ids.txt").open("a") as fh:
        fh.write(rerobots_instance.id + "\\n")
    assert rerobots_instance.run("echo ok").stdout == "ok\\n"
'''


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    """A simulator whose robots take READY_DELAY s to start, with a short keepalive
    window, the plugin pointed at it, under CI=true; nothing of it alive afterwards."""
    with Simulator(ready_delay=READY_DELAY, terminate_delay=0.05,
                   keepalive_timeout=KEEPALIVE_WINDOW) as sim:
        monkeypatch.setenv("REROBOTS_API_URL", sim.url)
        monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)
        monkeypatch.setenv("CI", "true")
        yield sim
        assert wait_until(lambda: sim.live_instances() == [], 10), "instances left alive"



def ledger(pytester: pytest.Pytester) -> Ledger:
    return Ledger(pytester.path / ".pytest_cache" / "d" / "rerobots" / "ledger.jsonl")



def status(sim: Simulator, ident: str) -> str:
    return next(s.status for s in sim.world.snapshots() if s.id == ident)



def rent_ahead(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("--rerobots-rent-ahead", f"--rerobots-keepalive-interval={PING}",
                              *args)


def test_rent_ahead_then_the_suite_under_ci_one_rental_per_type_nothing_left(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(SUITE)
    # A conftest that needs what is not installed yet: rent-ahead does not load it.
    pytester.makeconftest("import not_installed_yet_dependency\n")
    ahead = rent_ahead(pytester, "basic_kobuki", "fixed_misty2")
    assert ahead.ret == 0, ahead.stdout.str() + ahead.stderr.str()
    ahead.stdout.fnmatch_lines(["rerobots: rented ahead * (basic_kobuki)*",
                                "rerobots: rented ahead * (fixed_misty2)*"])
    kept = records(pytester)
    assert sorted(r["wtype"] for r in kept) == ["basic_kobuki", "fixed_misty2"]
    assert all(r["kind"] == "ahead" for r in kept)
    # It returned without waiting for READY: both still start.
    assert {status(sim, r["id"]) for r in kept} == {"INIT"}
    assert sim.request_count("new") == 2
    # The job installs meanwhile (longer than the server's keepalive window: the
    # keepers ping them).
    time.sleep(2 * KEEPALIVE_WINDOW)
    assert {status(sim, r["id"]) for r in kept} <= {"INIT", "READY"}

    (pytester.path / "conftest.py").unlink()
    run = pytester.runpytest(f"--rerobots-keepalive-interval={PING}")
    run.assert_outcomes(passed=2)
    assert sim.request_count("new") == 2  # one rental per type: the ones rented ahead
    used = (pytester.path / "ids.txt").read_text().split()
    assert sorted(used) == sorted(r["id"] for r in kept)
    run.stdout.fnmatch_lines(["*attached to * rented ahead*"])
    assert sim.live_instances() == []
    assert records(pytester) == [] and ledger(pytester).live() == []
    assert wait_until(lambda: all(procs.exited(r["keeper"]) for r in kept), 5)


def test_what_no_run_claims_is_ended_at_its_idle_limit(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    ahead = rent_ahead(pytester, "--rerobots-wtype=basic_kobuki",
                       "--rerobots-rent-ahead-idle=0.04")
    assert ahead.ret == 0, ahead.stdout.str()
    [record] = records(pytester)
    # 0.04 min = 2.4 s idle (past READY_DELAY and the keepalive window), then it ends.
    assert wait_until(lambda: status(sim, record["id"]) not in LIVE, 15)
    assert wait_until(lambda: procs.exited(record["keeper"]), 5)
    assert records(pytester) == [] and ledger(pytester).live() == []
    assert [r["by"] for r in ledger(pytester).records() if r["event"] == "ended"] == ["reaper"]


def test_the_sweep_ends_what_was_rented_ahead(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    assert rent_ahead(pytester, "--rerobots-wtype=basic_kobuki").ret == 0
    [record] = records(pytester)
    swept = pytester.runpytest("--rerobots-sweep")
    assert swept.ret == 0, swept.stdout.str()
    swept.stdout.fnmatch_lines([f"*{record['id']}*rented ahead*: its keeper * stopped"])
    assert status(sim, record["id"]) not in LIVE
    # (The keeper was signalled; on a busy machine it may take a moment to go.)
    assert wait_until(lambda: procs.exited(record["keeper"]), 10)
    assert records(pytester) == [] and ledger(pytester).live() == []


def test_a_failed_start_is_replaced_by_the_test_run(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(SUITE)
    sim.set_init_fail_rate(1.0)
    assert rent_ahead(pytester, "basic_kobuki").ret == 0
    [record] = records(pytester)
    sim.set_init_fail_rate(0.0)
    run = pytester.runpytest(f"--rerobots-keepalive-interval={PING}", "-k", "kobuki")
    run.assert_outcomes(passed=1, deselected=1)
    [used] = (pytester.path / "ids.txt").read_text().split()
    assert used != record["id"] and status(sim, record["id"]) == "INIT_FAIL"
    assert sim.request_count("new") == 2
    assert records(pytester) == [] and ledger(pytester).live() == []


def test_a_deployment_rented_ahead_is_claimed_by_its_type(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(SUITE)
    deployment = next(d.id for d in sim.world.deployments.values() if d.type == "fixed_misty2")
    assert rent_ahead(pytester, f"--rerobots-deployment={deployment}").ret == 0
    [record] = records(pytester)
    assert record["wtype"] == "fixed_misty2" and record["deployment"] == deployment
    run = pytester.runpytest(f"--rerobots-keepalive-interval={PING}", "-k", "misty")
    run.assert_outcomes(passed=1, deselected=1)
    assert (pytester.path / "ids.txt").read_text().split() == [record["id"]]
    assert sim.request_count("new") == 1


@pytest.mark.parametrize(("args", "message"), [
    ((), "*--rerobots-rent-ahead: no workspace type to rent*nothing rented*"),
    (("no_such_robot",), "*no workspace type 'no_such_robot' (on offer: *basic_kobuki*"
                         "nothing rented*"),
    (("basic_kobuki", "no_such_robot"), "*no workspace type 'no_such_robot'*nothing rented*"),
    (("--rerobots-deployment=4d6e1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b",),
     "*no deployment 4d6e1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b; nothing rented*"),
])
def test_no_type_or_an_unknown_one_is_one_error_and_nothing_is_rented(
        pytester: pytest.Pytester, sim: Simulator, args: tuple[str, ...], message: str):
    result = rent_ahead(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert sim.request_count("new") == 0 and not store(pytester).exists()


def test_rent_ahead_needs_an_api_that_outlives_it(pytester: pytest.Pytester,
                                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("REROBOTS_API_TOKEN", raising=False)
    result = rent_ahead(pytester, "basic_kobuki")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--rerobots-rent-ahead: no rerobots API token*"])
    result = rent_ahead(pytester, "--rerobots-sim", "basic_kobuki")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*embedded simulator*ends with its process*"])
