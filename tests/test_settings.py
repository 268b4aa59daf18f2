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
        # The option named once (issue 22 item 12; it was "(from command line
        # --rerobots-ready-timeout)").
        ({"ready_timeout": "soon"}, {}, {}, "--rerobots-ready-timeout (from command line): "
                                            "'soon' is not a number"),
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


# -- the table: the one place of every default ----------------------------------------


def test_every_setting_of_the_table_is_a_settings_field_with_the_tables_default():
    from dataclasses import fields

    from pytest_rerobots.settings import COMMAND_LINE_ONLY, OPTIONS, Settings

    defaults = {f.name: f.default for f in fields(Settings)}
    for opt in OPTIONS:
        assert defaults[opt.name] == opt.default, opt.name
    assert defaults["sweep"] is next(o for o in COMMAND_LINE_ONLY if o.name == "sweep").default


def test_the_instance_column_marks_the_settings_that_are_instance_options():
    from dataclasses import fields

    from pytest_rerobots.options import InstanceOptions
    from pytest_rerobots.settings import OPTIONS, Settings

    instance_fields = {f.name for f in fields(InstanceOptions)}
    marked = {opt.name for opt in OPTIONS if opt.instance}
    assert marked == instance_fields & {opt.name for opt in OPTIONS}
    assert set(Settings().instance_options()) == marked
    # The same defaults: a Run without pytest rents like a pytest run without options.
    assert InstanceOptions().updated(**Settings().instance_options()) == InstanceOptions()


def test_the_ssh_default_command_timeout_is_the_tables():
    # ssh.py keeps a copy of its own (a connection made without a Run uses it).
    from pytest_rerobots import ssh
    from pytest_rerobots.settings import DEFAULTS

    assert ssh.DEFAULT_COMMAND_TIMEOUT == DEFAULTS["command_timeout"]


def test_a_default_the_help_names_is_the_tables():
    import re

    from pytest_rerobots.settings import OPTIONS, shown

    for opt in OPTIONS:
        named = re.findall(r"\(default ([^;)]+)[;)]", opt.help)
        named += re.findall(r"(\S+) \(default\)", opt.help)
        for value in named:
            assert value == shown(opt.default), (opt.name, opt.help)


def test_instance_keywords_that_are_not_options_are_read_from_its_fields():
    from dataclasses import fields

    from pytest_rerobots.instance import _OWN_KEYWORDS, Instance
    from pytest_rerobots.options import InstanceOptions

    init = {f.name for f in fields(Instance) if f.init}
    assert set(_OWN_KEYWORDS) == init - {"client", "target", "options"}
    assert {"wtype", "existing", "sleep", "keep_hook"} <= set(_OWN_KEYWORDS)
    assert not set(_OWN_KEYWORDS) & {f.name for f in fields(InstanceOptions)}
    built = Instance.build(None, "basic_kobuki", wtype="basic_kobuki",  # type: ignore[arg-type]
                           existing="x", ready_timeout=5)
    assert (built.wtype, built.existing, built.options.ready_timeout) == ("basic_kobuki", "x", 5)
    with pytest.raises(TypeError, match="unknown instance option 'ready_timout'"):
        Instance.build(None, "basic_kobuki", ready_timout=5)  # type: ignore[arg-type]
