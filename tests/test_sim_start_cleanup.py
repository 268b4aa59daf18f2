"""A simulator whose start fails leaves no ``rerobots-sim-*`` directory behind (issue 22,
item 11): neither ``Simulator.start()`` nor the plugin's ``--rerobots-sim``."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.sim import Simulator


@pytest.fixture
def temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory of this test's own, where the simulator makes its own."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_failed_start_removes_its_directory(temp: Path, busy_port: int):
    for _ in range(2):
        sim = Simulator(port=busy_port, ssh_backend="none")
        with pytest.raises(ConfigurationError, match="cannot listen"):
            sim.start()
    assert list(temp.iterdir()) == []
    sim.stop()  # (idempotent after a failed start)


def test_a_failed_start_with_hosts_removes_its_directory(temp: Path, busy_port: int):
    pytest.importorskip("asyncssh")
    with pytest.raises(ConfigurationError, match="cannot listen"), \
            Simulator(port=busy_port):
        pass
    assert list(temp.iterdir()) == []


def test_a_started_simulator_still_removes_its_directory_at_stop(temp: Path):
    with Simulator(ssh_backend="none") as sim:
        assert sim.url
        assert [p.name[:13] for p in temp.iterdir()] == ["rerobots-sim-"]
    assert list(temp.iterdir()) == []


def test_the_plugin_s_failed_simulator_leaves_no_directory(pytester: pytest.Pytester,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    pytester.makeconftest('''
        import pytest_rerobots.sim as sim

        class Refused:
            def __init__(self, *args, **kwargs):
                raise SystemExit(1)  # as werkzeug does when it cannot bind

        sim.LimitedServer = Refused
    ''')
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest_subprocess("--rerobots-sim", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--rerobots-sim-config: simulator: cannot listen on*"])
    assert list(temp.iterdir()) == []
