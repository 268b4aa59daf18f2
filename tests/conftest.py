"""Shared fixtures of the project's own tests: a fast simulator, and the plugin pointed at it."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import paramiko  # noqa: F401
import pytest
from helpers import records, store

# The plugin loads the SSH and HTTP machinery only at the first rental. Loaded here first:
# otherwise a pytester run that happens to load paramiko first has pytester unload it at
# its end, and the next in-process run's host keys no longer compare equal.
import pytest_rerobots.instance  # noqa: F401
from pytest_rerobots import keep
from pytest_rerobots.sim import Simulator

#: Timings short enough that a whole lifecycle takes a fraction of a second.
FAST = dict(ready_delay=0.05, terminate_delay=0.05)


@pytest.fixture
def fast_sim() -> Iterator[Simulator]:
    """A running simulator with real SSH hosts and short timings; after the test, it must
    list no instance that is still alive."""
    with Simulator(**FAST) as sim:
        yield sim
        assert sim.live_instances() == [], "a test left instances alive"


@pytest.fixture
def sim_env(fast_sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    """Point the plugin (in pytester runs) at ``fast_sim`` as if it were the real API."""
    monkeypatch.setenv("REROBOTS_API_URL", fast_sim.url)
    monkeypatch.setenv("REROBOTS_API_TOKEN", fast_sim.token)
    for name in ("REROBOTS_WTYPE", "REROBOTS_DEPLOYMENT", "REROBOTS_SIM", "REROBOTS_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    return fast_sim


@pytest.fixture(autouse=True)
def _clean_rerobots_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own token or settings must not leak into the project's tests.
    for name in ("REROBOTS_API_TOKEN", "REROBOTS_API_URL", "REROBOTS_WTYPE",
                 "REROBOTS_DEPLOYMENT", "REROBOTS_SIM", "REROBOTS_LEDGER"):
        monkeypatch.delenv(name, raising=False)
    # Nor the machine's: on a CI machine (CI set) pytest stops shortening the summary's
    # lines, and the plugin attaches to rented-ahead robots; a terminal's width changes what
    # a line holds; options meant for the outer run (PYTEST_ADDOPTS) are not the inner runs'.
    # The tests of CI behaviour set these themselves.
    for name in ("CI", "BUILD_NUMBER", "GITHUB_ACTIONS", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "80")


@pytest.fixture
def kept_cleanup(pytester: pytest.Pytester) -> Iterator[None]:
    """Whatever a failed assertion left of kept or rented-ahead instances: their keepers
    stopped (by pid), the instances ended."""
    yield
    for record in records(pytester):
        if isinstance(record.get("keeper"), int):
            keep.stop_keeper(record["keeper"])
    if store(pytester).exists():
        pytester.runpytest("--rerobots-sweep")


@pytest.fixture(scope="session", autouse=True)
def _signals_as_a_terminal_delivers_them() -> Iterator[None]:
    """SIGINT and SIGHUP handled as in a terminal, in this process and so in every process
    it starts: the tests that send them (Ctrl-C, a closed terminal) would see them ignored
    when this suite itself was started with them ignored, as by ``nohup`` or as a shell
    script's background job (``cmd &``), and children inherit an ignored signal."""
    ignored = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGHUP)
               if signal.getsignal(sig) == signal.SIG_IGN}
    if signal.SIGINT in ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.SIGHUP in ignored:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    for sig, handler in ignored.items():
        signal.signal(sig, handler)
