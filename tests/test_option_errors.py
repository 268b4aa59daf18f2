"""Issue 22 items 7 and 12 (options): a keepalive interval the service's 60 s window would
outlast is a configuration error naming the window; an option's error names the option
once."""

from __future__ import annotations

import pytest

from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.settings import resolve

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("value", ["120", "60"])
def test_a_keepalive_interval_past_the_window_is_a_usage_error(pytester: pytest.Pytester,
                                                               value):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(f"--rerobots-keepalive-interval={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([
        f"*--rerobots-keepalive-interval (from command line): '{value}' is not below the "
        "service's 60 s keepalive window*end the robot*"])


def test_a_keepalive_interval_in_the_window_is_taken():
    assert resolve({"keepalive_interval": "59"}, {}).keepalive_interval == 59.0
    with pytest.raises(ConfigurationError, match="ini option rerobots_keepalive_interval"):
        resolve({}, {}, {"rerobots_keepalive_interval": "90"})


def test_an_option_error_names_the_option_once(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--rerobots-ready-timeout=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--rerobots-ready-timeout (from command line): 'soon' is not a number" in err
    assert err.count("--rerobots-ready-timeout") == 1
