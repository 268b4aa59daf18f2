"""SharedPool's bookkeeping (xdist shared mode), against a real simulator."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_rerobots import DeploymentNotFound, RerobotsClient, RerobotsError, acquire
from pytest_rerobots.sim import Simulator
from pytest_rerobots.xdist_pool import SharedPool


@pytest.fixture
def api(fast_sim: Simulator) -> Iterator[RerobotsClient]:
    with RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as client:
        yield client


def test_a_failed_rent_is_remembered_for_the_other_workers(api: RerobotsClient, tmp_path: Path):
    pool = SharedPool(tmp_path)
    attempts = []

    def make(existing: str | None):
        attempts.append(existing)
        return acquire(api, "no_such_type")

    with pytest.raises(DeploymentNotFound):
        pool.acquire("k", make)
    with pytest.raises(RerobotsError, match="failed in another worker"):
        pool.acquire("k", make)
    assert attempts == [None]  # the second worker did not rent again


def test_rent_attach_release(api: RerobotsClient, tmp_path: Path):
    pool = SharedPool(tmp_path)
    first = pool.acquire("k", lambda existing: acquire(api, "basic_kobuki", existing=existing))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pool._locked("k") as state:  # a second live worker uses it too
            state["users"].append(other.pid)
        assert pool.abandon("k", other.pid, "some-other-instance") is False
        pool.release("k", first)
        assert first.outcome == "handed over"  # the other worker still uses it
        assert api.instance(first.id)["status"] == "READY"
        assert pool.abandon("k", other.pid, first.id) is False  # it was the last user
    finally:
        other.kill()
        other.wait()
    api.terminate(first.id)
