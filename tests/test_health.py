"""Issue 23: the checkout's health record of deployments, and rentals that avoid the bad."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_rerobots.health import Health
from pytest_rerobots.sim.catalog import load_catalog

BAD = "11111111-1111-4111-8111-111111111111"
GOOD = "22222222-2222-4222-8222-222222222222"
CATALOG = f"""
[timings]
ready_delay = 0.05
terminate_delay = 0.05

[types.two_site]
desc = "a type with a bad deployment and a good one"

[[deployments]]
id = "{BAD}"
type = "two_site"
init_fail_rate = 1.0

[[deployments]]
id = "{GOOD}"
type = "two_site"
region = ""
"""

SUITE = """
import pytest
@pytest.mark.rerobots("two_site")
def test_x(rerobots_instance):
    with open("deployments.txt", "a") as fh:
        print(rerobots_instance.deployment, file=fh)
"""


def test_an_empty_region_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(CATALOG)
    catalog = load_catalog(path)
    assert [d.region for d in catalog.deployments if d.type == "two_site"] == ["us:cali", ""]


def test_the_next_run_starts_on_the_good_deployment_first(pytester: pytest.Pytester) -> None:
    (pytester.path / "catalog.toml").write_text(CATALOG)
    pytester.makepyfile(SUITE)
    args = ("--rerobots-sim", "--rerobots-sim-config=catalog.toml")
    first = pytester.runpytest(*args)
    first.assert_outcomes(passed=1)
    assert "replaced" in first.stdout.str()  # met the bad one, then the good one
    health = Health(pytester.path / ".pytest_cache" / "d" / "rerobots")
    assert list(health.recent()) == [BAD]
    assert health.recent()[BAD][0]["kind"] == "failed start"

    second = pytester.runpytest(*args)
    second.assert_outcomes(passed=1)
    assert "replaced" not in second.stdout.str()  # the good one first: no failed start
    assert (pytester.path / "deployments.txt").read_text().split() == [GOOD, GOOD]

    listing = pytester.runpytest("--rerobots-list", *args)
    text = listing.stdout.str()
    assert "deployment health (this checkout" in text and f"{BAD[:8]}: 1 trouble" in text
    assert "failed start" in text and "avoided now" in text

    sweep = pytester.runpytest("--rerobots-sweep")
    assert "health record of 1 deployment(s) forgotten" in sweep.stdout.str()
    assert health.recent() == {}


def test_a_pinned_deployment_is_rented_even_when_unhealthy(pytester: pytest.Pytester) -> None:
    (pytester.path / "catalog.toml").write_text(CATALOG.replace("init_fail_rate = 1.0", ""))
    Health(pytester.path / ".pytest_cache" / "d" / "rerobots", "embedded simulator").record(
        BAD, "lost", "x")
    pytester.makepyfile(SUITE)
    args = ("--rerobots-sim", "--rerobots-sim-config=catalog.toml")
    pytester.runpytest(*args).assert_outcomes(passed=1)  # avoided: the good one
    pytester.runpytest(*args, f"--rerobots-deployment={BAD}").assert_outcomes(passed=1)
    assert (pytester.path / "deployments.txt").read_text().split() == [GOOD, BAD]


def test_old_trouble_is_not_avoided(tmp_path: Path) -> None:
    health = Health(tmp_path)
    health.record(BAD, "lost", "a", at=time.time() - 2 * 3600)
    health.record(GOOD, "ssh never answered", "b")
    assert health.unhealthy() == [GOOD]
    assert set(health.recent()) == {BAD, GOOD}

