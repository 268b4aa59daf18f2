"""The settings resolver: precedence, parsing and error messages (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.settings import DEFAULT_API_URL, resolve


def test_defaults_when_nothing_is_given():
    s = resolve({}, {}, {})
    assert s.wtype is None and s.api_url == DEFAULT_API_URL and s.token is None
    assert (s.ready_timeout, s.queue_timeout, s.lease) == (600.0, 600.0, 3600)
    assert s.init_retries == 2
    assert (s.scope, s.xdist, s.sim, s.require, s.allow) == ("session", "per-worker", False,
                                                             False, ())


def test_command_line_beats_environment_beats_ini():
    ini = {"rerobots_wtype": "from_ini"}
    env = {"REROBOTS_WTYPE": "from_env"}
    assert resolve({}, {}, ini).wtype == "from_ini"
    assert resolve({}, env, ini).wtype == "from_env"
    s = resolve({"wtype": "from_cli"}, env, ini)
    assert s.wtype == "from_cli"
    assert s.sources["wtype"] == "command line --rerobots-wtype"


@pytest.mark.parametrize(
    ("cli", "env", "ini", "expected"),
    [
        ({"ready_timeout": "soon"}, {}, {}, "--rerobots-ready-timeout (from command line "
                                            "--rerobots-ready-timeout): 'soon' is not a number"),
        ({}, {}, {"rerobots_scope": "class"}, "--rerobots-scope (from ini option rerobots_scope)"),
        ({}, {"REROBOTS_API_URL": "ftp://x"}, {}, "environment variable REROBOTS_API_URL"),
        ({"lease": "0"}, {}, {}, "must be at least 1 second"),
        ({"allow": ["10.0.0.0/33"]}, {}, {}, "'10.0.0.0/33' is not an IPv4 address"),
        ({}, {"REROBOTS_SIM": "maybe"}, {}, "is not a boolean"),
        ({"queue_timeout": "-1"}, {}, {}, "must be a finite number >= 0"),
        ({"wtype": "kobuki;rm"}, {}, {}, "is not a workspace type"),
    ],
)
def test_bad_values_name_the_option_and_source(cli, env, ini, expected):
    with pytest.raises(ConfigurationError) as raised:
        resolve(cli, env, ini)
    assert expected in str(raised.value)


def test_allow_normalises_cidrs():
    s = resolve({"allow": ["192.0.2.7", "198.51.100.0/24"]}, {}, {})
    assert s.allow == ("192.0.2.7/32", "198.51.100.0/24")
    assert resolve({}, {}, {"rerobots_allow": ["10.1.2.3"]}).allow == ("10.1.2.3/32",)


def test_token_from_file_wins_over_environment(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    env = {"REROBOTS_API_TOKEN": "env-token"}
    assert resolve({}, env, {}).token == "env-token"
    s = resolve({}, env, {}, token_file=token_file)
    assert s.token == "file-token"
    assert "file-token" not in repr(s)


def test_unreadable_or_empty_token_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="cannot read"):
        resolve({}, {}, {}, token_file=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ConfigurationError, match="is empty"):
        resolve({}, {}, {}, token_file=empty)


def test_a_block_broader_than_a_slash_8_is_warned_about() -> None:
    from pytest_rerobots.settings import allow_warnings

    s = resolve({"allow": ["0.0.0.0/0", "10.0.0.0/8", "192.0.2.7"]}, {}, {})
    warned = allow_warnings(s.allow)
    assert len(warned) == 1 and "0.0.0.0/0 admits 4,294,967,296 addresses" in warned[0]
    assert allow_warnings(resolve({"allow": ["4.0.0.0/7"]}, {}, {}).allow)


def test_the_plugin_prints_the_allow_warning(pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--rerobots-allow",
                                           "0.0.0.0/0")
    result.stdout.fnmatch_lines(["*--rerobots-allow 0.0.0.0/0 admits 4,294,967,296*"])
    assert result.ret == 0


def test_the_plugin_object_holds_no_plain_token(pytester, monkeypatch) -> None:
    # pytest's -l shows the locals of failing frames, and a plugin hook's `self` with them.
    monkeypatch.setenv("REROBOTS_API_TOKEN", "tok-3f9a1c-not-for-eyes")
    pytester.makepyfile(
        """
        def test_vars(pytestconfig):
            plugin = pytestconfig.pluginmanager.get_plugin("rerobots-plugin")
            assert plugin._token  # it is there, for the one place that sends it
            shown = repr(vars(plugin)) + repr(plugin.settings)
            assert "tok-3f9a1c" not in shown
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
