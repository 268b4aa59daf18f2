"""Issue 22 item 2: a short deployment id, as the summary table prints it, is that
deployment (as git takes a short hash); an ambiguous or unknown one is an error about the
deployment that names the candidates."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import FAST

from pytest_rerobots import Run
from pytest_rerobots.errors import ConfigurationError, DeploymentNotFound
from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]

KOBUKI_US = "b34d1ee4-2a7b-445a-824a-ba4a30759f7f"
KOBUKI_EU = "df013a45-f40f-451e-a911-2465a8c24f1a"
TWIN = "b34d1ee4-0000-4000-8000-000000000000"  # starts like KOBUKI_US


@pytest.fixture
def twin_sim(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    """A simulator with a second Kobuki deployment whose id starts like the first's."""
    catalog = tmp_path / "twin.toml"
    catalog.write_text(f'[[deployments]]\nid = "{TWIN}"\ntype = "basic_kobuki"\n'
                       'region = "eu:fr"\n')
    with Simulator(catalog, **FAST) as sim:
        monkeypatch.setenv("REROBOTS_API_URL", sim.url)
        monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)
        yield sim
        assert sim.live_instances() == []


def test_a_prefix_on_the_command_line_is_that_deployment(pytester: pytest.Pytester, sim_env):
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_pinned(rerobots_instance):
            assert rerobots_instance.deployment == {KOBUKI_US!r}
    """)
    result = pytester.runpytest("--rerobots-deployment=b34d1ee4", "--rerobots-queue-timeout=5")
    result.assert_outcomes(passed=1)
    assert "There is no workspace type" not in result.stdout.str()


def test_a_prefix_in_the_marker_and_in_acquire(pytester: pytest.Pytester, sim_env):
    pytester.makepyfile(f"""
        import pytest
        @pytest.mark.rerobots("basic_kobuki", deployment="df013a45")
        def test_marked(rerobots_instance):
            assert rerobots_instance.deployment == {KOBUKI_EU!r}
        def test_acquired(rerobots_acquire):
            robot = rerobots_acquire("basic_kobuki", deployment="df01")
            assert robot.deployment == {KOBUKI_EU!r}
        def test_acquired_by_prefix_alone(rerobots_acquire):
            robot = rerobots_acquire("b34d1ee4")
            assert robot.deployment == {KOBUKI_US!r}
    """)
    result = pytester.runpytest("--rerobots-scope=function", "--rerobots-queue-timeout=5")
    result.assert_outcomes(passed=3)


def test_an_ambiguous_prefix_names_the_candidates(pytester: pytest.Pytester, twin_sim):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_pinned(rerobots_instance): pass
    """)
    result = pytester.runpytest("--rerobots-deployment=b34d1ee4", "--rerobots-queue-timeout=5")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "During handling" not in out
    assert "deployment 'b34d1ee4' is ambiguous: 2 deployment ids start with it" in out
    assert KOBUKI_US in out and TWIN in out
    assert "(from command line --rerobots-deployment)" in out
    assert "There is no workspace type" not in out


def test_an_unknown_prefix_is_an_error_about_the_deployment(pytester: pytest.Pytester,
                                                            sim_env):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.rerobots("basic_kobuki", deployment="abcd1234")
        def test_pinned(rerobots_instance): pass
        def test_acquired(rerobots_acquire):
            rerobots_acquire("abcd1234")
    """)
    result = pytester.runpytest("--rerobots-queue-timeout=5")
    result.assert_outcomes(errors=2)
    out = result.stdout.str()
    assert "deployment 'abcd1234': no deployment id starts with it; deployments: " in out
    assert f"{KOBUKI_US} (basic_kobuki, us:cali)" in out
    assert "(from @pytest.mark.rerobots(deployment=...))" in out
    assert "There is no workspace type" not in out


def test_the_listing_is_asked_once_per_run(fast_sim: Simulator):
    with Run(fast_sim.url, fast_sim.token, ledger=None, watchdog=False,
             signals=False) as run:
        before = run.client.calls
        assert run.deployments.resolve("b34d") == KOBUKI_US
        assert run.deployments.resolve("DF013A45") == KOBUKI_EU
        assert run.deployments.target("b34d1ee4") == KOBUKI_US
        assert run.deployments.target("basic_kobuki") == "basic_kobuki"
        assert run.deployments.resolve(KOBUKI_US) == KOBUKI_US
        assert run.client.calls == before + 1
        with pytest.raises(DeploymentNotFound):
            run.deployments.resolve("ffff")


def test_ambiguous_in_a_script(twin_sim: Simulator):
    with Run(twin_sim.url, twin_sim.token, ledger=None, watchdog=False,
             signals=False) as run, pytest.raises(ConfigurationError, match="ambiguous"):
        run.acquire("basic_kobuki", deployment="b34d1ee4")
