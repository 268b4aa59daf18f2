"""Robots a run holds itself (issue 22 items 1, 3 and 13): a wait for them fails at once
with the holders named, a wait for a robot another worker holds for one test shows a
progress line under xdist, a robot kept by this checkout is named in the progress line;
and two races of renting (13b, 13c)."""

from __future__ import annotations

import textwrap
import threading
from collections.abc import Iterator

import pytest

from pytest_rerobots import RerobotsClient, acquire, keep
from pytest_rerobots.errors import InstanceError
from pytest_rerobots.instance import Instance
from pytest_rerobots.renting import Renter
from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]

KOBUKI_B34 = "b34d1ee4-2a7b-445a-824a-ba4a30759f7f"
MISTY = "38496d28-386c-4cad-8daf-ef8a86616687"  # fixed_misty2's only deployment

#: The suite of issue 22 item 1: a module fixture on rerobots_run holds a Kobuki in each
#: worker, and tests ask for another one.
ISSUE_SUITE = textwrap.dedent(
    """
    import pytest

    @pytest.fixture(scope="module")
    def robot(rerobots_run):
        with rerobots_run.acquire("basic_kobuki") as r:
            yield r

    @pytest.mark.parametrize("n", range(4))
    def test_uses_module_robot(robot, n):
        assert robot.run("echo hi").stdout == "hi\\n"

    @pytest.mark.parametrize("n", range(4))
    def test_acquires_another(rerobots_acquire, n):
        other = rerobots_acquire("basic_kobuki")
        assert other.run("echo hi").stdout == "hi\\n"
    """
)


def _live(sim: Simulator) -> list[str]:
    return [s.id for s in sim.live_instances()]


def test_under_xdist_a_wait_for_robots_the_run_holds_fails_at_once_naming_its_workers(
        pytester: pytest.Pytester):
    pytester.makepyfile(test_fw=ISSUE_SUITE)
    # A queue timeout far longer than the run may take: only the new rule ends the waits.
    result = pytester.runpytest_subprocess(
        "-n", "2", "--rerobots-sim", "--rerobots-queue-timeout", "60",
        "-p", "no:cacheprovider")
    # Which tests pass depends on how xdist spreads them: a test that waits while the
    # other worker runs its own tests gets that worker's robot when it finishes; a test
    # whose robots are held by this worker, or by a worker that waits too, errors at once.
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 4 and outcomes.get("passed", 0) + outcomes.get(
        "errors", 0) == 8, outcomes
    assert outcomes.get("errors", 0) >= 1, outcomes  # the two workers did meet
    out = result.stdout.str()
    assert "still busy after waiting" not in out
    result.stdout.fnmatch_lines([
        "E * basic_kobuki: every robot that could serve it is held by this run itself (*"
        "[[]gw?[]] (this worker), rented in test_fw.py::test_uses_module_robot*"
        "Change one of: hold the robot for a narrower scope*run fewer xdist workers (-n)*",
    ])


PROGRESS_SUITE = textwrap.dedent(
    f"""
    import pathlib, time
    import pytest

    pytestmark = pytest.mark.rerobots("basic_kobuki")

    def _wait_for(cond, what):
        deadline = time.monotonic() + 60
        while not cond():
            if time.monotonic() > deadline:
                pytest.fail("gave up waiting for " + what)
            time.sleep(0.05)

    def test_holder(rerobots_acquire, rerobots_run):
        rerobots_acquire("basic_kobuki", deployment="{KOBUKI_B34}")
        pathlib.Path("held").write_text("")
        # Held, for this test only, until the other worker has waited for it a while.
        def waited():
            return any(w.get("since") and time.time() - w["since"] > 2
                       for w in rerobots_run.board.waits())
        _wait_for(waited, "the other worker's wait")
        time.sleep(2.0)  # the controller looks every 0.5 s

    def test_waiter(rerobots_acquire):
        _wait_for(lambda: pathlib.Path("held").exists(), "the holder")
        robot = rerobots_acquire("basic_kobuki", deployment="{KOBUKI_B34}")
        assert robot.run("echo ok").stdout == "ok\\n"
    """
)


def test_under_xdist_the_controller_shows_a_workers_wait(pytester: pytest.Pytester,
                                                          sim_env: Simulator):
    pytester.makepyfile(test_wait=PROGRESS_SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "--rerobots-queue-timeout", "120",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    # Held by the other worker for one test: waited for, and shown while waited for.
    result.stdout.fnmatch_lines([
        "rerobots [[]gw?[]]: basic_kobuki * QUEUED *s *(b34d1ee4 held by this run: "
        "[[]gw?[]], rented in test_wait.py::test_holder, held for that test)",
    ])
    assert _live(sim_env) == []


PINNED_SUITE = textwrap.dedent(
    f"""
    import pytest

    @pytest.mark.rerobots("fixed_misty2", deployment="{MISTY}")
    def test_pinned(rerobots_instance):
        assert rerobots_instance.deployment == "{MISTY}"

    @pytest.mark.rerobots("fixed_misty2")
    def test_unpinned(rerobots_instance):
        pass

    def test_acquires(rerobots_acquire):
        rerobots_acquire("fixed_misty2")
    """
)


def test_a_session_holding_the_only_robot_of_a_type_says_so_at_once(
        pytester: pytest.Pytester):
    pytester.makepyfile(test_pin=PINNED_SUITE)
    result = pytester.runpytest_subprocess(
        "--rerobots-sim", "--rerobots-queue-timeout", "60", "--rerobots-prefetch", "off",
        "-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=2)
    out = result.stdout.str()
    assert "still busy after waiting" not in out
    # Counted in the errors' reports: the short summary repeats the message in full only
    # where pytest does not shorten it (with CI set, or on a wide terminal).
    reports = out.split("short test summary info", 1)[0]
    assert reports.count("fixed_misty2: every robot that could serve it is held by this run "
                     "itself (38496d28 by this process, rented in test_pin.py::test_pinned, "
                     "held for the session)") == 2


@pytest.fixture
def kept_sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    with Simulator(ready_delay=0.05, terminate_delay=0.05) as sim:
        monkeypatch.setenv("REROBOTS_API_URL", sim.url)
        monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)
        monkeypatch.delenv("CI", raising=False)
        yield sim
        assert sim.live_instances() == [], "a test left instances alive"


def test_a_robot_kept_by_this_checkout_is_named_while_waiting_for_it(
        pytester: pytest.Pytester, kept_sim: Simulator):
    pytester.makepyfile(test_kept=textwrap.dedent(f"""
        import pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki", deployment="{KOBUKI_B34}")
        def test_fails(rerobots_instance):
            assert rerobots_instance.run("echo 1").stdout == "2\\n"
        """))
    store = pytester.path / ".pytest_cache" / "d" / "rerobots" / "ledger.jsonl.kept"
    try:
        first = pytester.runpytest("--rerobots-keep-on-failure")
        first.assert_outcomes(failed=1)
        [record] = keep.KeptStore(store).records()
        second = pytester.runpytest("--rerobots-queue-timeout", "1")
        second.assert_outcomes(errors=1)
        second.stdout.fnmatch_lines([
            f"*b34d1ee4 held by {record['id'][:8]}, which this checkout kept for "
            "debugging; end what this checkout kept with pytest --rerobots-sweep)*",
        ])
    finally:
        for record in keep.KeptStore(store).records():
            if isinstance(record.get("keeper"), int):
                keep.stop_keeper(record["keeper"])
        pytester.runpytest("--rerobots-sweep")


def test_terminate_while_a_failed_start_is_replaced_leaves_nothing_live(
        fast_sim: Simulator, monkeypatch: pytest.MonkeyPatch):
    fast_sim.set_init_fail_rate(1.0)
    original = Instance._terminate_remote
    calls = []

    def terminate_remote(self: Instance):
        calls.append(self.id)
        if len(calls) == 1:  # the failed start's end, by the replacement
            fast_sim.set_init_fail_rate(0.0)
            other = threading.Thread(target=self.terminate)
            other.start()
            other.join()
        return original(self)

    monkeypatch.setattr(Instance, "_terminate_remote", terminate_remote)
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        inst = acquire(api, "basic_kobuki", init_retries=1, fast_polling=True)
        try:
            with pytest.raises(InstanceError, match="terminated while"):
                inst.start()
        finally:
            inst.terminate()
        assert _live(fast_sim) == []


def test_ctrl_c_right_after_post_new_answered_ends_what_it_made(
        fast_sim: Simulator, monkeypatch: pytest.MonkeyPatch):
    original = Renter._new

    def interrupted(self, target, **kw):
        original(self, target, **kw)
        raise KeyboardInterrupt  # after the answer, before the caller recorded it

    monkeypatch.setattr(Renter, "_new", interrupted)
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        inst = acquire(api, "basic_kobuki", fast_polling=True)
        with pytest.raises(KeyboardInterrupt):
            inst.start()
        assert inst.id is not None and inst.outcome is not None
        assert _live(fast_sim) == []
