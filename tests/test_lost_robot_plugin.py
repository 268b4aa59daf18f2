"""Issue 23 through the plugin: a robot lost while a test holds it is an infrastructure
error within seconds, the next test gets a fresh robot, the two kinds of failure are
recorded, and --rerobots-reruns reruns infrastructure trouble only."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

import pytest

from pytest_rerobots.sim import Simulator

SUITE = """
import pytest
pytestmark = pytest.mark.rerobots("basic_kobuki")

def test_a_lost(rerobots_instance):
    rerobots_instance.run("{command}")

def test_b_next(rerobots_instance):
    assert rerobots_instance.run("echo hi").stdout == "hi\\n"

def test_c_product(rerobots_instance):
    rerobots_instance.run("false", check=True)
"""


def _properties(xml: str) -> dict[str, list[tuple[str, str]]]:
    root = ET.fromstring(xml)  # noqa: S314 (pytest's own JUnit file)
    return {case.get("name", ""): [(p.get("name", ""), p.get("value", ""))
                                   for p in case.iter("property")]
            for case in root.iter("testcase")}


@pytest.mark.parametrize("scope", ["session", "module", "function"])
@pytest.mark.parametrize("kind", ["terminate", "partition"])
def test_a_lost_robot_is_an_error_in_seconds_and_the_next_test_gets_a_fresh_one(
        pytester: pytest.Pytester, sim_env: Simulator, scope: str, kind: str) -> None:
    sim_env.configure(lose_held=kind, lose_held_after=2.0, lose_held_count=1)
    pytester.makepyfile(SUITE.format(command="sleep 120"))
    begun = time.monotonic()
    result = pytester.runpytest(f"--rerobots-scope={scope}", "--rerobots-watch-interval=0.5",
                                "--junitxml=out.xml", "-v")
    took = time.monotonic() - begun
    result.assert_outcomes(passed=1, failed=1, errors=1)
    out = result.stdout.str()
    assert took < 60, took  # never the command's 120 s
    assert re.search(r"test_a_lost ERROR \(infrastructure\)", out), out
    assert re.search(r"test_c_product FAILED \(product\)", out), out
    if kind == "terminate":
        assert "was terminated by the service" in out
    else:
        assert "stopped answering" in out
    assert "lost: " in out  # the summary's row of the lost robot
    props = _properties((pytester.path / "out.xml").read_text())
    assert ("rerobots_failure", "infrastructure") in props["test_a_lost"]
    assert ("rerobots_failure", "product") in props["test_c_product"]
    assert not any(n == "rerobots_failure" for n, _ in props["test_b_next"])
    rentals = len(sim_env.world.snapshots())  # instances made (a busy POST /new makes none)
    assert rentals == (3 if scope == "function" else 2), rentals
    assert sim_env.live_instances() == []


def test_reruns_rerun_infrastructure_trouble_on_a_fresh_robot_only(
        pytester: pytest.Pytester, sim_env: Simulator) -> None:
    sim_env.configure(lose_held="terminate", lose_held_after=2.0, lose_held_count=1)
    pytester.makepyfile(SUITE.format(command="sleep 4"))
    result = pytester.runpytest("--rerobots-reruns=1", "--rerobots-watch-interval=0.5",
                                "--junitxml=out.xml", "-v")
    result.assert_outcomes(passed=2, failed=1)
    assert result.parseoutcomes().get("rerun") == 1
    out = result.stdout.str()
    assert re.search(r"test_a_lost RERUN", out) and re.search(r"test_a_lost PASSED", out), out
    assert len(re.findall(r"test_c_product FAILED", out)) == 1  # a product failure: once
    assert len(sim_env.world.snapshots()) == 2  # exactly two rentals
    props = _properties((pytester.path / "out.xml").read_text())
    reruns = [v for n, v in props["test_a_lost"] if n == "rerobots_rerun_1"]
    assert reruns and "terminated by the service" in reruns[0]
    assert not any(n == "rerobots_failure" for n, _ in props["test_a_lost"])
    assert sim_env.live_instances() == []


def test_the_step_summary_counts_failures_by_kind(
        pytester: pytest.Pytester, sim_env: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    sim_env.configure(lose_held="terminate", lose_held_after=2.0, lose_held_count=1)
    pytester.makepyfile(SUITE.format(command="sleep 120"))
    result = pytester.runpytest("--rerobots-watch-interval=0.5")
    result.assert_outcomes(passed=1, failed=1, errors=1)
    text = summary.read_text()
    assert "(on robots: 1 infrastructure, 1 product)" in text, text
    assert re.search(r"^::error .*title=rerobots%3A infrastructure trouble", result.stdout.str(),
                     re.M), result.stdout.str()


@pytest.mark.parametrize("value", ["-1", "abc"])
def test_a_bad_reruns_value_is_one_configuration_error(pytester: pytest.Pytester,
                                                       value: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(f"--rerobots-reruns={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--rerobots-reruns" in result.stderr.str()


CATALOG = """
[timings]
ready_delay = 0.05
terminate_delay = 0.05

[faults]
lose_held = "terminate"
lose_held_after = 2.0
lose_held_count = 1
"""


def test_reruns_under_xdist_from_a_catalog_fault(pytester: pytest.Pytester) -> None:
    (pytester.path / "catalog.toml").write_text(CATALOG)
    pytester.makepyfile(SUITE.format(command="sleep 4"))
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist", "loadfile", "--rerobots-sim", "--rerobots-sim-config=catalog.toml",
        "--rerobots-reruns=1", "--rerobots-watch-interval=0.5", "--junitxml=out.xml",
        "-p", "no:cacheprovider")
    out = result.stdout.str()
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("failed"), outcomes.get("rerun")) == (2, 1, 1), out
    # The table alone: the short summary below it names the product failure's robot in
    # full where pytest does not shorten it (with CI set, or on a wide terminal).
    section = out.split("rerobots instances", 1)[1].split("short test summary info", 1)[0]
    assert len(re.findall(r"basic_kobuki", section)) == 2, out  # the lost one and its successor
    assert "lost: terminated by the service" in section
    props = _properties((pytester.path / "out.xml").read_text())
    assert any(n == "rerobots_rerun_1" for n, _ in props["test_a_lost"])
    assert ("rerobots_failure", "product") in props["test_c_product"]


def test_the_faults_come_from_a_catalog_and_are_checked(tmp_path) -> None:
    from pytest_rerobots.errors import ConfigurationError
    from pytest_rerobots.sim.catalog import load_catalog

    path = tmp_path / "c.toml"
    path.write_text(CATALOG)
    faults = load_catalog(path).faults
    assert (faults.lose_held, faults.lose_held_after, faults.lose_held_count) == (
        "terminate", 2.0, 1)
    path.write_text('[faults]\nlose_held = "explode"\n')
    with pytest.raises(ConfigurationError, match=r"faults\.lose_held: expected one of terminate"):
        load_catalog(path)


@pytest.mark.parametrize("scope", ["session", "module", "function"])
def test_dropped_ssh_is_infrastructure_and_the_next_test_reconnects(
        pytester: pytest.Pytester, sim_env: Simulator, scope: str) -> None:
    sim_env.configure(lose_held="drop_ssh", lose_held_after=2.0, lose_held_count=1)
    pytester.makepyfile(SUITE.format(command="sleep 120"))
    begun = time.monotonic()
    result = pytester.runpytest(f"--rerobots-scope={scope}", "--rerobots-watch-interval=0.5",
                                "-v")
    assert time.monotonic() - begun < 60
    result.assert_outcomes(passed=1, failed=1, errors=1)
    assert re.search(r"test_a_lost ERROR \(infrastructure\)", result.stdout.str())
    # The robot stayed READY: pooled scopes reconnect to it, no new rental.
    assert len(sim_env.world.snapshots()) == (3 if scope == "function" else 1)
    assert sim_env.live_instances() == []


def test_the_rerobots_sim_fixture_loses_the_robot_a_test_holds(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import threading, pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki")
        def test_lost(rerobots_instance, rerobots_sim):
            threading.Timer(0.5, rerobots_sim.lose_held,
                            args=(rerobots_instance.id, "partition")).start()
            rerobots_instance.run("sleep 120")
        def test_next(rerobots_instance):
            assert rerobots_instance.run("echo ok").stdout == "ok\\n"
        """)
    begun = time.monotonic()
    result = pytester.runpytest("--rerobots-sim", "--rerobots-watch-interval=0.5", "-v")
    assert time.monotonic() - begun < 60
    result.assert_outcomes(passed=1, errors=1)
    assert "stopped answering" in result.stdout.str()
