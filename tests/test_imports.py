"""Importing the plugin and the simulator raises no warning, whatever a dependency released.

A user's ``filterwarnings = error`` (or ``python -W error``) turns any warning raised while
pytest loads the plugin into an INTERNALERROR before a single test runs; cryptography 51's
DSA deprecation, raised when asyncssh is imported, did exactly that.

And a pytest run that rents nothing (collection only, or tests that use no robot) loads
neither the client nor what only a rental, a robot's report or a command of the plugin
needs: every run of a project that has the plugin installed pays for what it loads.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

MODULES = ("pytest_rerobots", "pytest_rerobots.plugin", "pytest_rerobots.client",
           "pytest_rerobots.ssh", "pytest_rerobots.sim", "pytest_rerobots.sim.hosts",
           "pytest_rerobots.sim.__main__")


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_the_plugin_and_the_simulator_import_under_w_error():
    proc = run_python("-W", "error", "-c", "; ".join(f"import {m}" for m in MODULES))
    assert proc.returncode == 0, proc.stderr


def test_importing_asyncssh_leaves_the_warning_filters_as_they_were():
    # The DSA warning is silenced only while asyncssh is imported: afterwards, the same
    # warning raised anywhere else still reaches the user's filters.
    code = (
        "import warnings\n"
        # requests and urllib3 add filters of their own when imported: load them first.
        "import requests, paramiko, werkzeug, cryptography.utils\n"
        "before = list(warnings.filters)\n"
        "import pytest_rerobots.sim.hosts\n"
        "assert warnings.filters == before, (before, warnings.filters)\n"
        "from cryptography.utils import CryptographyDeprecationWarning\n"
        "try:\n"
        "    warnings.warn('DSA is deprecated', CryptographyDeprecationWarning)\n"
        "except CryptographyDeprecationWarning:\n"
        "    print('raised')\n"
    )
    proc = run_python("-W", "error", "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "raised"


def test_the_simulators_command_starts_under_w_error():
    proc = run_python("-W", "error", "-m", "pytest_rerobots.sim", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()


# -- what a run that rents nothing loads --------------------------------------------------

#: Loaded only by a run that rents, reports a robot, or runs a command of the plugin: a run
#: whose tests use no robot (or that only collects) never needs them.
NOT_LOADED = (
    "requests", "urllib3", "paramiko", "asyncssh", "tenacity", "PIL",
    "pytest_rerobots.board", "pytest_rerobots.camera", "pytest_rerobots.client",
    "pytest_rerobots.costs", "pytest_rerobots.instance", "pytest_rerobots.keep",
    "pytest_rerobots.ledger", "pytest_rerobots.plugin_commands",
    "pytest_rerobots.plugin_report", "pytest_rerobots.run", "pytest_rerobots.safefiles",
    "pytest_rerobots.signals", "pytest_rerobots.sim", "pytest_rerobots.wire",
)

#: Writes the names of the loaded modules to the file named by DUMP_MODULES at the end.
DUMP_CONFTEST = """
import os, sys

def pytest_unconfigure(config):
    with open(os.environ["DUMP_MODULES"], "w") as fh:
        fh.write("\\n".join(sorted(sys.modules)))
"""


def loaded_modules(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                   *args: str) -> set[str]:
    """The modules loaded at the end of a pytest run of ``pytester``'s project."""
    dump = pytester.path / "modules.txt"
    monkeypatch.setenv("DUMP_MODULES", str(dump))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == 0, result.outlines
    return set(dump.read_text().split())


@pytest.mark.parametrize("args", [("--collect-only", "-q"), ("-q",)],
                         ids=["collect-only", "tests-without-robots"])
def test_a_run_that_rents_nothing_loads_no_client_and_no_reporting(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]):
    pytester.makeconftest(DUMP_CONFTEST)
    pytester.makepyfile(test_plain="""
        import pytest

        def test_one():
            assert 1 + 1 == 2

        @pytest.mark.parametrize("n", [1, 2])
        def test_two(n):
            assert n

        @pytest.mark.skip(reason="not today")
        def test_skipped():
            pass
    """)
    with_plugin = loaded_modules(pytester, monkeypatch, *args)
    assert "pytest_rerobots.plugin" in with_plugin
    without = loaded_modules(pytester, monkeypatch, *args, "-p", "no:rerobots")
    assert "pytest_rerobots.plugin" not in without
    # (A third-party plugin installed beside this one may load some of them itself.)
    extra = sorted(m for m in NOT_LOADED if m in with_plugin and m not in without)
    assert extra == [], f"a run that rents nothing loaded {extra}"


#: As pytest older than 8.3.3 looks for fixtures (pytest issue 12446): every attribute of
#: every registered plugin object read on the object, properties included.
OLD_FIXTURE_DISCOVERY = DUMP_CONFTEST + """
def pytest_sessionstart(session):
    for plugin in session.config.pluginmanager.get_plugins():
        if type(plugin).__module__.startswith("pytest_rerobots"):
            for name in dir(plugin):
                try:
                    getattr(plugin, name)
                except Exception:
                    pass
"""


def test_reading_every_attribute_of_the_plugin_objects_rents_and_loads_nothing(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    # Before: the Run, the camera and the signal guard were properties made on first
    # read, so that pytest 7.4 made them (and loaded requests and paramiko) in every run.
    pytester.makeconftest(OLD_FIXTURE_DISCOVERY)
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    with_plugin = loaded_modules(pytester, monkeypatch, "-q")
    without = loaded_modules(pytester, monkeypatch, "-q", "-p", "no:rerobots")
    extra = sorted(m for m in NOT_LOADED if m in with_plugin and m not in without)
    assert extra == [], f"reading the plugin's attributes loaded {extra}"
