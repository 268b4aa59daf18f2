"""The plugin under pytest-xdist: per-worker instances, one shared instance, the summary."""

from __future__ import annotations

import textwrap

import pytest

from pytest_rerobots import RerobotsClient
from pytest_rerobots.sim import Simulator

SUITE = textwrap.dedent(
    """
    import os, pytest
    pytestmark = pytest.mark.rerobots("basic_kobuki")
    @pytest.mark.parametrize("n", range(6))
    def test_robot(rerobots_instance, n):
        with open("ids.txt", "a") as fh:
            print(os.getpid(), rerobots_instance.id, file=fh)
        assert rerobots_instance.run("echo $((1 + {n}))".format(n=n)).stdout == f"{1 + n}\\n"
    """
)


def _seen(pytester: pytest.Pytester) -> tuple[set[str], set[str]]:
    lines = [line.split() for line in (pytester.path / "ids.txt").read_text().splitlines()]
    return {pid for pid, _ in lines}, {ident for _, ident in lines}


def _all_ended(sim: Simulator, token: str) -> bool:
    with RerobotsClient(token, sim.url, ignore_env=True) as api:
        return api.instances()["workspace_instances"] == []


def test_per_worker_rents_one_instance_per_worker(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(test_fw=SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    pids, ids = _seen(pytester)
    assert len(pids) == 2 and len(ids) == 2
    result.stdout.fnmatch_lines(["*rerobots instances*"])
    assert sum("terminated" in line for line in result.outlines) == 2
    assert _all_ended(sim_env, sim_env.token)


def test_shared_rents_one_instance_for_the_run(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(test_fw=SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "--rerobots-xdist=shared",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    pids, ids = _seen(pytester)
    assert len(pids) == 2 and len(ids) == 1
    out = result.stdout.str()
    assert "terminated" in out and "handed over" in out and "LEAKED" not in out
    assert _all_ended(sim_env, sim_env.token)


def test_embedded_simulator_is_shared_with_the_workers(pytester: pytest.Pytester):
    pytester.makepyfile(test_fw=SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "--rerobots-sim", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    pids, ids = _seen(pytester)
    assert len(pids) == 2 and len(ids) == 2
    result.stdout.fnmatch_lines(["rerobots: http://127.0.0.1:* (embedded simulator)*"])
    assert sum("terminated" in line for line in result.outlines) == 2
