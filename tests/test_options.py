"""Every option of the plugin, in each of its forms, as pytest itself resolves it."""

from __future__ import annotations

import json

import pytest

from pytest_rerobots.settings import OPTIONS

# A valid value for each option, as text, and what it resolves to.
VALUES = {
    "wtype": ("basic_kobuki", "basic_kobuki"),
    "deployment": ("b34d1ee4-2a7b-445a-824a-ba4a30759f7f", "b34d1ee4-2a7b-445a-824a-ba4a30759f7f"),
    "api_url": ("http://127.0.0.1:8666/", "http://127.0.0.1:8666"),
    "sim": ("1", True),
    "sim_config": ("catalog.toml", "catalog.toml"),
    "ready_timeout": ("42.5", 42.5),
    "queue_timeout": ("7", 7.0),
    "init_retries": ("5", 5),
    "prefetch": ("off", False),
    "lease": ("120", 120),
    "keepalive_interval": ("12", 12.0),
    "command_timeout": ("2.5", 2.5),
    "allow": ("192.0.2.0/24", ["192.0.2.0/24"]),
    "scope": ("module", "module"),
    "xdist": ("shared", "shared"),
    "require": ("true", True),
    "ledger": ("my-ledger.jsonl", "my-ledger.jsonl"),
    "keep_on_failure": ("yes", True),
    "reuse": ("2.5", 2.5),
    "rent_ahead_idle": ("3", 3.0),
    "camera": ("always", "always"),
    "artifacts": ("robot-pictures", "robot-pictures"),
    "budget": ("0.5", 0.5),
    "each_deployment": ("yes", True),
    "watch_interval": ("2.5", 2.5),
    "reruns": ("2", 2),
}

PROBE = """
import json
def test_probe(pytestconfig):
    settings = pytestconfig.pluginmanager.get_plugin("rerobots-plugin").settings
    value = getattr(settings, {name!r})
    if isinstance(value, tuple):
        value = list(value)
    with open("probe.json", "w") as fh:
        json.dump({{"value": str(value) if hasattr(value, "parts") else value,
                   "source": settings.sources.get({name!r})}}, fh)
"""


def _forms() -> list:
    cases = []
    for opt in OPTIONS:
        cases.append(pytest.param(opt, "cli", id=f"{opt.name}-cli"))
        if opt.env:
            cases.append(pytest.param(opt, "env", id=f"{opt.name}-env"))
        if opt.ini:
            cases.append(pytest.param(opt, "ini", id=f"{opt.name}-ini"))
    return cases


def test_every_option_has_a_probe_value():
    assert {opt.name for opt in OPTIONS} == set(VALUES)


@pytest.mark.parametrize(("opt", "form"), _forms())
def test_each_form_of_each_option_resolves(pytester: pytest.Pytester,
                                           monkeypatch: pytest.MonkeyPatch, opt, form: str):
    text, expected = VALUES[opt.name]
    args: list[str] = []
    if form == "cli":
        flag_is_switch = opt.kind == "switch"
        args = [opt.flag] if flag_is_switch else [f"{opt.flag}={text}"]
    elif form == "env":
        monkeypatch.setenv(opt.env, text)
    else:
        pytester.makeini(f"[pytest]\n{opt.ini} = {text}\n")
    pytester.makepyfile(PROBE.format(name=opt.name))
    result = pytester.runpytest(*args, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    probe = json.loads((pytester.path / "probe.json").read_text())
    assert probe["value"] == expected or probe["value"].endswith(str(expected))
    where = {"cli": "command line", "env": "environment variable", "ini": "ini option"}[form]
    assert probe["source"].startswith(where)
