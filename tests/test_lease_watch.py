"""The lease watch (issue 23): a robot lost while held is noticed within seconds, and what
is in flight on it fails at once with an infrastructure error naming what happened."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pytest_rerobots import InstanceLost, RerobotsClient, acquire
from pytest_rerobots.errors import is_infrastructure
from pytest_rerobots.sim import Simulator


@pytest.fixture
def api(fast_sim: Simulator) -> Iterator[RerobotsClient]:
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as client:
        yield client


def _lose_soon(sim: Simulator, ident: str, kind: str, after: float = 0.5) -> threading.Timer:
    timer = threading.Timer(after, sim.lose_held, args=(ident, kind))
    timer.start()
    return timer


def test_a_robot_the_service_ends_fails_a_long_command_at_once(
        fast_sim: Simulator, api: RerobotsClient) -> None:
    with acquire(api, "basic_kobuki", watch_interval=0.5) as robot:
        assert robot.id is not None
        _lose_soon(fast_sim, robot.id, "terminate")
        begun = time.monotonic()
        with pytest.raises(InstanceLost) as caught:
            robot.run("sleep 120")
        took = time.monotonic() - begun
        assert took < 15, took  # never the command's 120 s
        text = str(caught.value)
        assert "was terminated by the service" in text and robot.id[:8] in text
        assert "ended outside this run" in text
        assert is_infrastructure(caught.value)
        # Every later use says the same at once.
        with pytest.raises(InstanceLost):
            robot.run("true")
    assert fast_sim.live_instances() == []


def test_a_partitioned_host_is_noticed_within_the_bound(
        fast_sim: Simulator, api: RerobotsClient) -> None:
    with acquire(api, "basic_kobuki", watch_interval=0.5) as robot:
        assert robot.id is not None
        _lose_soon(fast_sim, robot.id, "partition")
        begun = time.monotonic()
        with pytest.raises(InstanceLost) as caught:
            robot.run("sleep 120")
        took = time.monotonic() - begun
        # interval 0.5 s + probe 5 s; wide margin for a busy machine, far from 120 s.
        assert took < 30, took
        assert "stopped answering" in str(caught.value)
        assert caught.value.reason == "host unreachable"
    # A partitioned host's instance is still live on the service: its end ended it.
    assert robot.outcome is not None and str(robot.outcome) == "terminated"


def test_an_expect_in_flight_fails_with_the_loss(
        fast_sim: Simulator, api: RerobotsClient) -> None:
    with acquire(api, "basic_kobuki", watch_interval=0.5) as robot:
        assert robot.id is not None
        proc = robot.spawn("sleep 120")
        _lose_soon(fast_sim, robot.id, "terminate")
        begun = time.monotonic()
        with pytest.raises(InstanceLost):
            proc.expect("never printed", timeout=120)
        assert time.monotonic() - begun < 15


def test_a_dropped_connection_is_infrastructure_and_the_robot_stays_usable(
        fast_sim: Simulator, api: RerobotsClient) -> None:
    from pytest_rerobots import SSHError

    with acquire(api, "basic_kobuki", watch_interval=0.5) as robot:
        assert robot.id is not None
        _lose_soon(fast_sim, robot.id, "drop_ssh")
        begun = time.monotonic()
        with pytest.raises(SSHError) as caught:
            robot.run("sleep 120")
        assert time.monotonic() - begun < 15
        assert is_infrastructure(caught.value)
        robot.ensure_connected()  # still READY: a new connection
        assert robot.run("echo back").stdout == "back\n"
        assert robot.lost is None


def test_our_own_end_is_no_loss(fast_sim: Simulator, api: RerobotsClient) -> None:
    robot = acquire(api, "basic_kobuki", watch_interval=0.05)
    with robot:
        time.sleep(0.3)
    time.sleep(0.3)
    assert robot.lost is None
