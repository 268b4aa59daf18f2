"""Issue 22 item 8: a refused token names where it came from (never the token itself), and
a ``Run`` with no token says so before any call instead of sending ``POST /new``."""

from __future__ import annotations

import pytest

from pytest_rerobots import Run, WrongAuthToken
from pytest_rerobots.errors import ConfigurationError

pytest_plugins = ["pytester"]

WRONG = "not-the-token-0123456789"


def test_a_wrong_token_from_the_environment_names_it(pytester: pytest.Pytester, sim_env,
                                                     monkeypatch):
    monkeypatch.setenv("REROBOTS_API_TOKEN", WRONG)
    pytester.makepyfile("""
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_robot(rerobots_instance): pass
    """)
    result = pytester.runpytest("--rerobots-queue-timeout=5")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*WrongAuthToken: POST /new/basic_kobuki: wrong authorization token [[]HTTP 400[]]*",
        "*the token came from environment variable REROBOTS_API_TOKEN (not shown here)*",
    ])
    assert WRONG not in result.stdout.str() + result.stderr.str()


def test_a_wrong_token_from_a_file_names_the_file(pytester: pytest.Pytester, sim_env,
                                                  monkeypatch):
    monkeypatch.delenv("REROBOTS_API_TOKEN")
    (pytester.path / "token.txt").write_text(WRONG + "\n")
    pytester.makepyfile("""
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_robot(rerobots_instance): pass
    """)
    result = pytester.runpytest("--rerobots-token-file=token.txt", "--rerobots-queue-timeout=5")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*the token came from command line --rerobots-token-file token.txt (not shown here)*"])
    assert WRONG not in result.stdout.str() + result.stderr.str()


def test_run_without_a_token_says_so_before_any_call(fast_sim, monkeypatch):
    monkeypatch.delenv("REROBOTS_API_TOKEN", raising=False)
    with Run(fast_sim.url, ledger=None, watchdog=False, signals=False) as run:
        with pytest.raises(ConfigurationError, match=r"^no API token: set REROBOTS_API_TOKEN"):
            run.acquire("basic_kobuki")
        assert run.client.calls == 0  # no POST /new was sent


def test_run_with_a_wrong_token_from_the_environment(fast_sim, monkeypatch):
    monkeypatch.setenv("REROBOTS_API_TOKEN", WRONG)
    with Run(fast_sim.url, ledger=None, watchdog=False, signals=False) as run:
        with pytest.raises(WrongAuthToken) as refused:
            run.acquire("basic_kobuki")
    assert "environment variable REROBOTS_API_TOKEN" in str(refused.value)
    assert WRONG not in str(refused.value)
