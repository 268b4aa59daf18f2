"""Importing the plugin and the simulator raises no warning, whatever a dependency released.

A user's ``filterwarnings = error`` (or ``python -W error``) turns any warning raised while
pytest loads the plugin into an INTERNALERROR before a single test runs; cryptography 51's
DSA deprecation, raised when asyncssh is imported, did exactly that.
"""

from __future__ import annotations

import subprocess
import sys

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
