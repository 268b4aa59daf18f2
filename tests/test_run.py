"""``Run``: the termination layers without pytest, and under pytest as ``rerobots_run``."""

from __future__ import annotations

import _thread
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from helpers import wait_until

from pytest_rerobots import (
    BusyWorkspaceDeployment,
    InstanceFailed,
    InstanceNotFound,
    InstanceOptions,
    Outcome,
    RerobotsClient,
    Run,
    acquire,
)
from pytest_rerobots.run import DEFAULT_LEDGER
from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]


def status(api: RerobotsClient, ident: str) -> str | None:
    """The instance's status, or None while the server does not list it yet (the real
    server's window after POST /new, which the simulator has too)."""
    try:
        return api.instance(ident)["status"]
    except InstanceNotFound:
        return None


HOLDER = textwrap.dedent("""
    import sys, time
    from pytest_rerobots import Run
    with Run(sys.argv[1]) as run:             # token from REROBOTS_API_TOKEN, default ledger
        robot = run.acquire("basic_kobuki")
        print(robot.id, run.watchdog.pid, flush=True)
        time.sleep(60)
""")


def test_a_sigkilled_script_holding_a_robot_from_run_leaves_nothing_live(
        fast_sim: Simulator, tmp_path: Path):
    env = {**os.environ, "REROBOTS_API_TOKEN": fast_sim.token}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, fast_sim.url], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    try:
        ident, watchdog_pid = holder.stdout.readline().split()
        assert [i.id for i in fast_sim.live_instances()] == [ident]
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
    assert wait_until(lambda: fast_sim.live_instances() == [], 15)
    # The default ledger, under the script's working directory, holds the rental and the
    # watchdog's end of it.
    ledger = tmp_path / DEFAULT_LEDGER

    def records() -> list[dict]:
        return [json.loads(line) for line in ledger.read_text().splitlines()]

    # (The watchdog records the end just after the API confirmed it.)
    assert wait_until(lambda: len(records()) == 2, 10), records()
    rows = records()
    assert [(r["event"], r["id"]) for r in rows] == [("rented", ident), ("ended", ident)]
    assert rows[1]["by"] == "watchdog"
    assert (tmp_path / DEFAULT_LEDGER.parent / ".gitignore").read_text().endswith("*\n")
    assert wait_until(lambda: not Path(f"/proc/{watchdog_pid}").exists(), 10)


def test_leaving_a_run_ends_what_it_still_holds(fast_sim: Simulator, tmp_path: Path):
    ledger = tmp_path / "ledger.jsonl"
    with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=ledger,
             ready_timeout=30) as run:
        first = run.acquire("basic_kobuki")
        with run.acquire("fixed_misty2") as second:   # already started: not started twice
            assert second.run("echo hi").stdout == "hi\n"
        assert second.outcome == Outcome.TERMINATED and first.outcome is None
        assert first.options.ready_timeout == 30
        assert run.records.instances == [first, second]
    assert first.outcome == "terminated"
    assert run.ledger is not None and run.ledger.live() == []
    assert fast_sim.live_instances() == []


def test_a_failed_start_leaves_nothing_and_names_the_option(fast_sim: Simulator):
    with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=None, watchdog=False,
             fast_polling=True) as run:
        with pytest.raises(TypeError, match="unknown instance option 'ready_timout'"):
            run.acquire("basic_kobuki", ready_timout=5)
        fast_sim.configure(stuck_init=1.0, init_timeout=1.0)  # then INIT_FAIL
        with pytest.raises(Exception, match=r"not READY after 0\.3 s"):
            run.acquire("basic_kobuki", ready_timeout=0.3, init_retries=0)
        fast_sim.configure(stuck_init=0.0)
    # Ended at once: the server refuses to end an INIT instance, so the start's cleanup
    # waited out INIT (here until it failed).
    assert [r.outcome for r in run.records.instances] == [Outcome.ALREADY_ENDED]


def test_instance_options_are_frozen_and_checked():
    options = InstanceOptions(allow=["10.0.0.0/8"])
    assert options.allow == ("10.0.0.0/8",)
    with pytest.raises(AttributeError):
        options.ready_timeout = 1  # type: ignore[misc]
    assert options.updated(ready_timeout=5).ready_timeout == 5
    with pytest.raises(TypeError, match="known: allow, command_timeout, connect"):
        options.updated(nope=1)


def test_bare_client_acquire_keeps_the_wtype_of_a_deployment(fast_sim: Simulator):
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        deployment = api.deployments(types=["fixed_misty2"])["workspace_deployments"][0]
        robot = acquire(api, deployment, wtype="fixed_misty2", connect=False)
        assert (robot.wtype, robot.deployment, robot.target) == (
            "fixed_misty2", deployment, deployment)
        with robot:
            assert robot.status == "READY"


def test_a_module_fixture_on_rerobots_run_serves_two_tests_and_ends_with_its_module(
        pytester: pytest.Pytester, sim_env: Simulator, tmp_path: Path):
    pytester.makepyfile(
        test_a="""
        import pytest

        @pytest.fixture(scope="module")
        def robot(rerobots_run):
            with rerobots_run.acquire("fixed_misty2") as robot:
                yield robot

        def test_one(robot, record_property):
            assert robot.run("echo one").stdout == "one\\n"
            pytest.seen = robot.id

        def test_two(robot):
            assert robot.id == pytest.seen and robot.status == "READY"
        """,
        test_b="""
        import pytest

        def test_after_module_a(rerobots_client):
            status = rerobots_client.instance(pytest.seen)["status"]
            assert status in ("TERMINATING", "TERMINATED")
        """,
    )
    ledger = tmp_path / "ledger.jsonl"
    result = pytester.runpytest("-p", "no:randomly", f"--rerobots-ledger={ledger}")
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    assert "rerobots instances" in out
    live = [r for r in (json.loads(x) for x in ledger.read_text().splitlines())
            if r["event"] == "rented"]
    assert len(live) == 1
    ident = live[0]["id"]
    row = next(line for line in out.splitlines() if line.startswith(ident))
    assert "fixed_misty2" in row and row.rstrip().endswith("terminated")


# -- renting like the real service: busy robots, failed starts, 5xx ----------------------


class Heard:
    """A listener that keeps what the progress line would show."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.failures: list[str] = []

    def rented(self, instance) -> None:
        pass

    def progress(self, instance) -> None:
        if instance.busy_reason:
            self.reasons.append(instance.busy_reason)

    def ended(self, instance) -> None:
        pass

    def replaced(self, instance, failed) -> None:
        self.failures.append(failed.status)


def test_a_robot_this_run_is_still_releasing_is_waited_for_and_named(fast_sim: Simulator):
    fast_sim.configure(terminate_delay=0.6)
    heard = Heard()
    with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=None, watchdog=False,
             fast_polling=True, listeners=[heard]) as run:
        with run.acquire("fixed_misty2") as first:
            pass
        with run.acquire("fixed_misty2") as second:   # TERMINATING still holds the robot
            assert second.deployment == first.deployment
        assert second.timings.queued > 0.2
    assert heard.reasons and heard.reasons[0].startswith(f"this run just ended {first.id[:8]}")


def test_the_queue_timeout_error_says_what_was_busy_and_how_long(fast_sim: Simulator):
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        held = api.new_instance("fixed_misty2")
        robot = acquire(api, "fixed_misty2", queue_timeout=0.4, fast_polling=True)
        with pytest.raises(BusyWorkspaceDeployment,
                           match=r"fixed_misty2: still busy after waiting 0\.4 s; wait longer "
                                 r"with queue_timeout \(--rerobots-queue-timeout S, now 0\.4\)"):
            robot.start()
        assert api.reservations() == []
        wait_until(lambda: status(api, held.id) == "READY", 5)
        api.terminate(held.id)


def test_a_type_with_several_busy_robots_is_polled_until_one_frees(fast_sim: Simulator):
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        held = [api.new_instance("basic_kobuki").id for _ in range(2)]
        for ident in held:
            wait_until(lambda ident=ident: status(api, ident) == "READY", 5)
        robot = acquire(api, "basic_kobuki", queue_timeout=10, fast_polling=True)
        freed = threading.Timer(0.5, api.terminate, args=(held[1],))
        freed.start()
        with robot:
            assert robot.timings.queued > 0.3
            assert robot.deployment == api.instance(held[1])["deployment"]
        freed.join()
        api.terminate(held[0])
        assert api.reservations() == []


def test_an_init_fail_is_ended_and_replaced_on_another_deployment(fast_sim: Simulator,
                                                                  tmp_path: Path):
    fast_sim.configure(init_fail_rate=1.0)
    heard = Heard()

    class Recover(Heard):
        def replaced(self, instance, failed) -> None:
            fast_sim.configure(init_fail_rate=0.0)

    with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=tmp_path / "ledger",
             watchdog=False, fast_polling=True, listeners=[heard, Recover()]) as run:
        with run.acquire("basic_kobuki") as robot:
            assert robot.status == "READY"
            (failed,) = robot.failed_rentals
            assert failed.status == "INIT_FAIL" and failed.outcome == "already ended"
            assert failed.deployment and robot.deployment != failed.deployment
            assert run.ledger is not None
            assert [r["id"] for r in run.ledger.live()] == [robot.id]
            (ended,) = (r for r in run.ledger.records() if r["event"] == "ended")
            assert (ended["id"], ended["by"]) == (failed.id, "replaced")
    assert heard.failures == ["INIT_FAIL"]


def test_the_last_failed_start_lists_every_rental(fast_sim: Simulator):
    fast_sim.configure(init_fail_rate=1.0)
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        robot = acquire(api, "fixed_misty2", init_retries=1, fast_polling=True)
        with pytest.raises(InstanceFailed) as raised:
            robot.start()
        ids = [*(f.id for f in robot.failed_rentals), robot.id]
        assert len(ids) == 2
        assert (f"fixed_misty2: 2 rentals failed to start: {ids[0]} (INIT_FAIL), {ids[1]} "
                "(INIT_FAIL); rented again 1 time(s)") in str(raised.value)
    assert fast_sim.live_instances() == []


def test_a_5xx_on_post_new_that_created_nothing_is_sent_again(fast_sim: Simulator):
    fast_sim.fail_next("new", 2, 503)  # answers 503 without acting
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True,
                        sleep=lambda s: None) as api:
        with acquire(api, "basic_kobuki", fast_polling=True) as robot:
            assert robot.status == "READY"
            assert api.instances()["workspace_instances"] == [robot.id]


# -- several robots at once ---------------------------------------------------------------


def test_several_targets_are_started_together_and_returned_in_order(fast_sim: Simulator):
    fast_sim.configure(ready_delay=0.5)
    with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=None, watchdog=False,
             fast_polling=True) as run:
        robots = run.acquire("fixed_misty2", "basic_kobuki", "basic_kobuki")
        assert [r.wtype for r in robots] == ["fixed_misty2", "basic_kobuki", "basic_kobuki"]
        assert all(r.run("true").exit_status == 0 for r in robots)
        # Concurrently: every one was rented before any became READY.
        rented = sorted(r.timings.ready_at - r.timings.to_ready for r in robots)
        ready = sorted(r.timings.ready_at for r in robots)
        assert rented[-1] < ready[0]
    assert fast_sim.live_instances() == []


def test_one_failed_start_ends_the_others_and_is_named(fast_sim: Simulator):
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        held = api.new_instance("fixed_misty2")   # the only misty is busy
        with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=None, watchdog=False,
                 fast_polling=True, queue_timeout=0) as run:
            with pytest.raises(Exception, match=r"fixed_misty2 \(robot 2 of 3\) failed: "
                               r"BusyWorkspaceDeployment.*the other 2 were ended"):
                run.acquire("basic_kobuki", "fixed_misty2", "basic_kobuki")
            outcomes = [i.outcome for i in run.records.instances]
        assert outcomes and all(o in ("terminated", "never rented") for o in outcomes)
        assert [i.id for i in fast_sim.live_instances()] == [held.id]
        wait_until(lambda: status(api, held.id) == "READY", 5)
        api.terminate(held.id)


def test_ctrl_c_while_several_start_ends_what_they_rented(fast_sim: Simulator):
    fast_sim.configure(ready_delay=2.0)
    with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=None, watchdog=False,
             fast_polling=True) as run:
        timer = threading.Timer(0.5, lambda: _thread.interrupt_main())
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            run.acquire("basic_kobuki", "basic_kobuki", "fixed_misty2")
        timer.join()
        rented = [i for i in run.records.instances if i.id]
        assert len(rented) == 3
        assert all(i.outcome == "terminated" for i in rented)
    assert fast_sim.live_instances() == []


def test_the_run_ends_what_it_holds_concurrently(fast_sim: Simulator):
    fast_sim.configure(terminate_delay=0.05)
    with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=None, watchdog=False,
             fast_polling=True) as run:
        robots = run.acquire("basic_kobuki", "basic_kobuki", "fixed_misty2")
        # Each POST /terminate answers a second late: one after another, the three ends
        # would lie at least a second apart each; together, well within one second
        # however slow this machine is (the three start within moments of each other).
        fast_sim.set_endpoint_fault("terminate", latency=1.0)
    ended = [r.timings.ended_at for r in robots]
    assert all(r.outcome == "terminated" for r in robots)
    assert max(ended) - min(ended) < 1.0


def test_rerobots_acquire_with_several_targets(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(
        """
        def test_two(rerobots_acquire):
            a, b = rerobots_acquire("basic_kobuki", "fixed_misty2")
            assert (a.wtype, b.wtype) == ("basic_kobuki", "fixed_misty2")
            assert a.run("echo a").stdout == "a\\n" and b.run("echo b").stdout == "b\\n"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)
    assert sim_env.live_instances() == []


def test_a_session_readies_every_type_its_tests_need_together(pytester: pytest.Pytester,
                                                               sim_env: Simulator):
    pytester.makepyfile(
        """
        import pytest

        import time

        @pytest.mark.rerobots("basic_kobuki")
        def test_first(rerobots_instance, rerobots_client):
            # The session's other type was rented when this test's was (the server lists
            # an instance only after its 404 window: a moment to show up).
            for _ in range(40):
                live = rerobots_client.instances(details=True)["workspace_instances"]
                if len(live) == 2:
                    break
                time.sleep(0.05)
            assert sorted(i["type"] for i in live) == ["basic_kobuki", "fixed_misty2"]

        @pytest.mark.rerobots("fixed_misty2")
        def test_second(rerobots_ssh):
            pass

        @pytest.mark.rerobots("fixed_misty2")
        def test_not_selected(rerobots_ssh):
            pass
        """
    )
    pytester.runpytest("-p", "no:randomly", "-k", "not not_selected"
                       ).assert_outcomes(passed=2)
    assert sim_env.live_instances() == []
    # Turned off: the first test's type alone.
    pytester.runpytest("-p", "no:randomly", "-k", "first", "--rerobots-prefetch=off"
                       ).assert_outcomes(failed=1)
    assert sim_env.live_instances() == []


def test_a_suite_on_a_type_with_one_broken_robot_passes_and_shows_the_failed_rental(
        pytester: pytest.Pytester):
    pytester.makefile(".toml", lab="""
        [timings]
        ready_delay = 0.1

        [types.lab_arm]

        [[deployments]]
        id = "0a000000-0000-4000-8000-000000000001"
        type = "lab_arm"
        region = "us:cali"
        init_fail_rate = 1.0

        [[deployments]]
        id = "0a000000-0000-4000-8000-000000000002"
        type = "lab_arm"
        region = "eu:de"
    """)
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.rerobots("lab_arm")

        @pytest.mark.parametrize("k", range(3))
        def test_on_the_arm(rerobots_instance, k):
            assert rerobots_instance.deployment.endswith("2")
            assert rerobots_instance.run("echo ok").stdout == "ok\\n"
        """
    )
    result = pytester.runpytest("--rerobots-sim", "--rerobots-sim-config=lab.toml",
                                "--rerobots-scope=function")
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    failed_rows = [line for line in out.splitlines() if "(INIT_FAIL, replaced)" in line]
    assert failed_rows and all("0a000000" in row for row in failed_rows)
    assert "LEAKED" not in out


def test_a_robot_an_earlier_run_of_this_checkout_released_is_named(fast_sim: Simulator,
                                                                    tmp_path: Path):
    fast_sim.configure(terminate_delay=0.6)
    ledger = tmp_path / "ledger.jsonl"
    common = dict(ignore_env=True, ledger=ledger, watchdog=False, fast_polling=True)
    with Run(fast_sim.url, fast_sim.token, **common) as earlier:
        first = earlier.acquire("fixed_misty2")
    heard = Heard()
    with Run(fast_sim.url, fast_sim.token, listeners=[heard], **common) as later:
        later.acquire("fixed_misty2")
    assert heard.reasons
    assert heard.reasons[0].startswith(f"a run of this checkout ended {first.id[:8]} on ")


def test_a_reservation_is_held_by_the_ledger_and_ended_by_cancelling_it(fast_sim: Simulator,
                                                                         tmp_path: Path):
    from pytest_rerobots.ending import end

    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        (misty,) = api.deployments("fixed_misty2")["workspace_deployments"]
        held = api.new_instance(misty)
        # A queued rental: the ledger holds its reservation, then its cancellation.
        with Run(fast_sim.url, fast_sim.token, ignore_env=True, ledger=tmp_path / "l.jsonl",
                 watchdog=False, fast_polling=True, queue_timeout=0.3) as run:
            with pytest.raises(BusyWorkspaceDeployment, match="reservation cancelled"):
                run.acquire("fixed_misty2")
            assert run.ledger is not None
            events = [(r["event"], r.get("outcome")) for r in run.ledger.records()]
            assert events == [("rented", None), ("ended", "cancelled")]
            assert run.ledger.live() == []
        # What the watchdog and the sweep do with a reservation id: cancel it.
        reservation = api.new_instance(misty, reserve=True)
        assert reservation.success is False
        assert end(api, reservation.id) == Outcome.NOT_FOUND
        assert api.reservations() == []
        wait_until(lambda: status(api, held.id) == "READY", 5)
        api.terminate(held.id)
