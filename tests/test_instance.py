"""Instance, without pytest's plugin: Ctrl-C at each stage of a start leaves nothing rented."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from pytest_rerobots import BusyWorkspaceDeployment, RerobotsClient, acquire
from pytest_rerobots.sim import Simulator


@pytest.fixture
def api(fast_sim: Simulator) -> Iterator[RerobotsClient]:
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as client:
        yield client


def interrupt_once(after: int = 0):
    """A ``sleep`` that raises KeyboardInterrupt on call number ``after`` (as Ctrl-C would
    during that wait), and really sleeps otherwise."""
    calls = []

    def sleep(seconds: float) -> None:
        calls.append(seconds)
        if len(calls) == after + 1:
            raise KeyboardInterrupt
        time.sleep(seconds)

    return sleep


def live(api: RerobotsClient) -> list[str]:
    return api.instances()["workspace_instances"]


def test_ctrl_c_during_the_ready_wait_ends_the_instance(api: RerobotsClient,
                                                        fast_sim: Simulator):
    fast_sim.world.configure(ready_delay=0.5)
    robot = acquire(api, "basic_kobuki", sleep=interrupt_once())
    with pytest.raises(KeyboardInterrupt):
        robot.start()
    assert robot.outcome == "terminated" and robot.id
    assert live(api) == []


def test_ctrl_c_as_the_new_answer_arrives_ends_what_the_server_made(api: RerobotsClient):
    def ctrl_c(response: requests.Response, *args: object, **kwargs: object) -> None:
        if response.request.method == "POST" and "/new/" in (response.request.url or ""):
            response.close()  # (so that no socket is left for the garbage collector)
            raise KeyboardInterrupt  # the server acted; we never saw its answer

    api.session.hooks["response"].append(ctrl_c)
    robot = acquire(api, "basic_kobuki")
    with pytest.raises(KeyboardInterrupt):
        robot.start()
    api.session.hooks["response"].remove(ctrl_c)
    assert robot.id is not None and robot.outcome == "terminated"
    assert live(api) == []


def test_ctrl_c_while_queued_cancels_the_reservation(api: RerobotsClient):
    (misty,) = api.deployments("fixed_misty2")["workspace_deployments"]
    holder = acquire(api, misty)
    with holder:
        queued = acquire(api, misty, queue_timeout=30, sleep=interrupt_once())
        with pytest.raises(KeyboardInterrupt):
            queued.start()
        assert api.reservations() == []
        assert queued.id is None and queued.outcome == "never rented"
    assert live(api) == []


def test_queue_timeout_is_busy_and_cancels(api: RerobotsClient):
    (misty,) = api.deployments("fixed_misty2")["workspace_deployments"]
    with acquire(api, misty):
        with pytest.raises(BusyWorkspaceDeployment,
                           match=r"still busy after waiting 0\.3 s.*--rerobots-queue-timeout"):
            with acquire(api, misty, queue_timeout=0.3):
                pass
        assert api.reservations() == []
    assert live(api) == []
