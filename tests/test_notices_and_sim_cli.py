"""Issue 22 item 12, the smaller ones: a mistyped simulator profile is suggested; notices
that change what the user asked for show under ``-q``; ``rerobots-sim --export`` and
``--env-file``; an API URL with a path is refused clearly; ``--rerobots-list`` marks the
instances this checkout kept."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pytest_rerobots import keep

pytest_plugins = ["pytester"]


def test_a_mistyped_profile_is_suggested(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--rerobots-sim", "--rerobots-sim-config", "realstic")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*realstic: cannot read the catalog: No such file or "
                                 "directory; did you mean the built-in profile 'realistic'?*"])


def test_notices_show_under_q_on_the_simulator(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("-q", "--rerobots-sim", "--rerobots-keep-on-failure")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["rerobots: --rerobots-keep-on-failure and --rerobots-reuse do "
                                 "nothing here: the embedded simulator ends with the run"])


def test_notices_show_under_q_under_ci(pytester: pytest.Pytester, sim_env, monkeypatch):
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("-q", "--rerobots-reuse=1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["rerobots: warning: --rerobots-reuse ignored under CI=true*"])


def test_an_api_url_with_a_path_is_refused_clearly(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--rerobots-api-url", "http://127.0.0.1:18666/v1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--rerobots-api-url (from command line): "
                                 "'http://127.0.0.1:18666/v1' has a path;*"
                                 "use 'http://127.0.0.1:18666'*"])


@pytest.fixture
def sim_command(tmp_path) -> Iterator[list[str]]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> list[str]:
        proc = subprocess.Popen([sys.executable, "-m", "pytest_rerobots.sim", "--port", "0",
                                 *args], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        return [proc.stdout.readline().rstrip("\n") for _ in range(2)]

    yield start  # type: ignore[misc]
    for proc in procs:
        proc.terminate()  # by its own process id
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_rerobots_sim_export_and_env_file(sim_command, tmp_path):
    env_file = tmp_path / "sim.env"
    url, token = sim_command("--export", "--env-file", str(env_file))
    assert url.startswith("export REROBOTS_API_URL=http://127.0.0.1:")
    assert token.startswith("export REROBOTS_API_TOKEN=")
    assert env_file.read_text().splitlines() == [url[len("export "):],
                                                 token[len("export "):]]
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    # The shell takes the export form as it is.
    shown = subprocess.run(["sh", "-c", f"{url}; echo \"$REROBOTS_API_URL\""],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert shown == url.split("=", 1)[1]
    plain, _ = sim_command()
    assert plain.startswith("REROBOTS_API_URL=")  # unchanged without --export


KEPT = """
import pathlib
import pytest
@pytest.mark.rerobots("basic_kobuki")
def test_fails(rerobots_instance):
    pathlib.Path("failed.txt").write_text(rerobots_instance.id)
    assert False
"""


def test_the_listing_marks_kept_instances(pytester: pytest.Pytester, sim_env, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(KEPT)
    try:
        first = pytester.runpytest("--rerobots-keep-on-failure", "--rerobots-scope=function",
                                   "--rerobots-queue-timeout=5")
        first.assert_outcomes(failed=1)
        kept = (pytester.path / "failed.txt").read_text()
        listed = pytester.runpytest("--rerobots-list")
        listed.stdout.fnmatch_lines([
            "instance * type * region * status * age * kept",
            f"{kept}  basic_kobuki  us:cali  READY * debug",
            "kept: kept by a run of this checkout (debug: after a failing test; reuse: for",
            "the next run); pytest --rerobots-sweep ends them",
        ])
        assert all(len(line) <= 80 for line in listed.stdout.lines)
    finally:
        assert pytester.runpytest("--rerobots-sweep").ret == 0
        store = pytester.path / ".pytest_cache" / "d" / "rerobots" / "ledger.jsonl.kept"
        for record in keep.KeptStore(store).records():
            if isinstance(record.get("keeper"), int):
                keep.stop_keeper(record["keeper"])
