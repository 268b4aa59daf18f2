"""Instances kept after the run: --rerobots-keep-on-failure and --rerobots-reuse.

Each case runs a small suite through pytester against a simulator served by this
process as if it were the real API (so the run has its ledger, watchdog and keepers),
with a keepalive window of KEEPALIVE_WINDOW s that the runs' pings (every PING s) keep
up with. A kept instance must outlive that window after its run has ended: only its
keeper pings it then. Every test ends with no live instance and no keeper left.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import records, store, wait_until

from pytest_rerobots import keep, procs
from pytest_rerobots.ledger import Ledger
from pytest_rerobots.sim import Simulator
from pytest_rerobots.sim.hosts import SSHD

pytest_plugins = ["pytester"]

KEEPALIVE_WINDOW = 1.0
PING = "0.2"
LIVE = ("INIT", "READY")

SUITE = '''
import pathlib
import pytest
pytestmark = pytest.mark.rerobots("basic_kobuki")
def test_robot(rerobots_instance):
    with pathlib.Path("ids.txt").open("a") as fh:
        fh.write(rerobots_instance.id + "\\n")
    assert rerobots_instance.run("echo ok").stdout == "ok\\n"
'''


@pytest.fixture
def sim(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    """A fast simulator with a short keepalive window, the plugin pointed at it; after the
    test, no instance of it may be alive. Its SSH backend is asyncssh, unless a test asks
    for "openssh" (indirect parametrization)."""
    backend = getattr(request, "param", "asyncssh")
    if backend == "openssh" and not os.access(SSHD, os.X_OK):
        if os.environ.get("REROBOTS_REQUIRE_OPENSSH") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_OPENSSH=1 but {SSHD} is missing")
        pytest.skip(f"{SSHD} is missing")
    with Simulator(ready_delay=0.05, terminate_delay=0.05, ssh_backend=backend,
                   keepalive_timeout=KEEPALIVE_WINDOW) as sim:
        monkeypatch.setenv("REROBOTS_API_URL", sim.url)
        monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)
        monkeypatch.delenv("CI", raising=False)
        yield sim
        assert sim.live_instances() == [], "a test left instances alive"




def ids(pytester: pytest.Pytester) -> list[str]:
    path = pytester.path / "ids.txt"
    return path.read_text().split() if path.exists() else []


def status(sim: Simulator, ident: str) -> str:
    return next(s.status for s in sim.world.snapshots() if s.id == ident)


def keeper_gone(pid: int) -> bool:
    return procs.exited(pid)


def sweep(pytester: pytest.Pytester) -> pytest.RunResult:
    result = pytester.runpytest("--rerobots-sweep")
    assert result.ret == 0, result.stdout.str()
    return result



def test_reuse_attaches_without_post_new_and_survives_the_keepalive_window(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(SUITE)
    first = pytester.runpytest("--rerobots-reuse=1", f"--rerobots-keepalive-interval={PING}")
    first.assert_outcomes(passed=1)
    [ident] = ids(pytester)
    first.stdout.fnmatch_lines([f"rerobots: kept for reuse: {ident} (basic_kobuki, deployment *",
                                "*the next run of this checkout within 1 min attaches to it*",
                                "*pytest --rerobots-sweep*"])
    assert re.search(rf"{ident}\s.*kept \(for reuse\)", first.stdout.str())
    [record] = records(pytester)
    assert record["id"] == ident and record["kind"] == "reuse"
    # The run is over; only the keeper pings it: it outlives the server's window.
    time.sleep(2.5 * KEEPALIVE_WINDOW)
    assert status(sim, ident) == "READY"

    rented = sim.request_count("new")
    second = pytester.runpytest("--rerobots-reuse=1", f"--rerobots-keepalive-interval={PING}")
    second.assert_outcomes(passed=1)
    assert ids(pytester) == [ident, ident]  # the same robot
    assert sim.request_count("new") == rented  # no POST /new
    second.stdout.fnmatch_lines([f"rerobots: reused {ident} (basic_kobuki) kept by an earlier "
                                 "run: no POST /new, no READY wait"])
    assert re.search(rf"{ident}\s.*kept \(for reuse; reused\)", second.stdout.str())
    # The first keeper stopped when the second run attached; the second run kept it again.
    assert wait_until(lambda: keeper_gone(record["keeper"]), 5)
    [again] = records(pytester)
    assert again["keeper"] != record["keeper"] and not keeper_gone(again["keeper"])

    swept = sweep(pytester)
    swept.stdout.fnmatch_lines([f"*{ident}*kept for reuse: its keeper {again['keeper']} stopped",
                                f"rerobots sweep: {ident} (basic_kobuki) terminated",
                                f"*{ident}*key and known-hosts files removed"])
    assert keeper_gone(again["keeper"])
    assert status(sim, ident) not in LIVE
    assert records(pytester) == [] and not (store(pytester) / ident).exists()


def test_an_instance_no_run_attaches_to_is_ended_after_its_minutes(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(SUITE)
    result = pytester.runpytest("--rerobots-reuse=0.02", f"--rerobots-keepalive-interval={PING}")
    result.assert_outcomes(passed=1)
    [ident] = ids(pytester)
    [record] = records(pytester)
    kept_at = time.monotonic()
    # 0.02 min = 1.2 s idle, then the keeper ends it (it pings it until then).
    assert wait_until(lambda: status(sim, ident) not in LIVE, 10)
    assert time.monotonic() - kept_at < 8
    assert wait_until(lambda: keeper_gone(record["keeper"]), 5)
    assert records(pytester) == []
    ledger = Ledger(pytester.path / ".pytest_cache" / "d" / "rerobots" / "ledger.jsonl")
    assert ledger.live() == []
    assert [r["by"] for r in ledger.records() if r["event"] == "ended"] == ["reaper"]


def test_another_token_never_attaches(pytester: pytest.Pytester, sim: Simulator,
                                      monkeypatch: pytest.MonkeyPatch, kept_cleanup: None):
    pytester.makepyfile(SUITE)
    pytester.runpytest("--rerobots-reuse=1", f"--rerobots-keepalive-interval={PING}"
                       ).assert_outcomes(passed=1)
    [mine] = ids(pytester)
    # Nothing on disk holds the token: the record keeps a hash of it.
    kept = (store(pytester) / mine / "record.json").read_text()
    assert sim.token not in kept and json.loads(kept)["token_sha256"]
    monkeypatch.setenv("REROBOTS_API_TOKEN", sim.add_user("someone-else"))
    rented = sim.request_count("new")
    other = pytester.runpytest(f"--rerobots-keepalive-interval={PING}")
    other.assert_outcomes(passed=1)
    assert sim.request_count("new") == rented + 1
    assert ids(pytester)[1] != mine and status(sim, mine) == "READY"
    monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)
    sweep(pytester)
    assert status(sim, mine) not in LIVE


def test_reuse_is_ignored_under_ci(pytester: pytest.Pytester, sim: Simulator,
                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(SUITE)
    result = pytester.runpytest("--rerobots-reuse=1", f"--rerobots-keepalive-interval={PING}")
    result.assert_outcomes(passed=1)
    assert result.stdout.str().count("--rerobots-reuse ignored under CI=true") == 1
    assert "kept" not in result.stdout.str()
    assert records(pytester) == [] and sim.live_instances() == []


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_reuse_minutes_are_usage_errors(pytester: pytest.Pytester, value: str):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(f"--rerobots-reuse={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--rerobots-reuse (from command line)*minutes*"])


FAILING = '''
import pathlib
import pytest
pytestmark = pytest.mark.rerobots("basic_kobuki")
def test_passes(rerobots_instance):
    pathlib.Path("passed.txt").write_text(rerobots_instance.id)
def test_fails(rerobots_instance):
    pathlib.Path("failed.txt").write_text(rerobots_instance.id)
    rerobots_instance.run("echo as-the-test-left-it > state.txt", check=True)
    assert rerobots_instance.run("cat state.txt").stdout == "something else\\n"
'''


@pytest.mark.parametrize("sim", ["asyncssh", "openssh"], indirect=True)
def test_keep_on_failure_keeps_the_failing_tests_instance_with_a_working_ssh_command(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(FAILING)
    result = pytester.runpytest("--rerobots-keep-on-failure", "--rerobots-scope=function",
                                f"--rerobots-keepalive-interval={PING}")
    result.assert_outcomes(passed=1, failed=1)
    passed = (pytester.path / "passed.txt").read_text()
    failed = (pytester.path / "failed.txt").read_text()
    out = result.stdout.str()
    assert status(sim, passed) not in LIVE  # the passing test's robot ended as usual
    [record] = records(pytester)
    assert record["id"] == failed and record["kind"] == "failure"
    deployment = record["deployment"]
    result.stdout.fnmatch_lines([
        f"rerobots: kept for debugging: {failed} (basic_kobuki, deployment {deployment}*",
        "  log in: ssh -i *",
        "  its lease ends * UTC (in 60 min); process * keeps it alive until then",
        "  end it: pytest --rerobots-sweep",
    ])
    assert re.search(rf"{failed}\s.*kept \(for debugging\)", out)
    assert "LEAKED" not in out
    command = next(line for line in out.splitlines() if line.startswith("  log in: ")
                   )[len("  log in: "):]
    argv = shlex.split(command)
    assert argv[:2] == ["ssh", "-i"]
    for option in ("IdentitiesOnly=yes", "StrictHostKeyChecking=yes"):
        assert option in argv
    directory = store(pytester) / failed
    for name in ("key", "known_hosts", "record.json"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    for path in (directory, store(pytester)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert f"UserKnownHostsFile={directory / 'known_hosts'}" in argv
    assert argv[argv.index("-p") + 1] == str(record["port"])
    assert argv[-1] == f"root@{record['host']}"
    # The instance outlives the server's keepalive window after the run.
    time.sleep(2.5 * KEEPALIVE_WINDOW)
    assert status(sim, failed) == "READY"

    if shutil.which("ssh") is not None:
        # Logs in as printed (batch mode: never a prompt), and finds what the test left.
        done = subprocess.run([argv[0], "-o", "BatchMode=yes", *argv[1:], "cat state.txt"],
                              capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "as-the-test-left-it\n"

    sweep(pytester)
    assert status(sim, failed) not in LIVE
    assert keeper_gone(record["keeper"])
    assert not directory.exists()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's ssh client")
def test_the_ssh_command_refuses_another_host_key(pytester: pytest.Pytester, sim: Simulator,
                                                  kept_cleanup: None):
    """The printed command pins the host key: a host with another key is refused."""
    pytester.makepyfile(FAILING)
    pytester.runpytest("--rerobots-keep-on-failure", "--rerobots-scope=function",
                       f"--rerobots-keepalive-interval={PING}").assert_outcomes(passed=1, failed=1)
    [record] = records(pytester)
    known = store(pytester) / record["id"] / "known_hosts"
    line = known.read_text().split()  # "[host]:port type base64": another key of another type
    line[2] = "AAAAC3NzaC1lZDI1NTE5AAAAIO8E4xEQcGqEQoRkmjKXd0VMbxVIgrn4ZrMYi1SYQhsA"
    line[1] = "ssh-ed25519"
    known.write_text(" ".join(line) + "\n")
    argv = shlex.split(keep.ssh_command(record))
    done = subprocess.run([argv[0], "-o", "BatchMode=yes", *argv[1:], "true"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 255
    sweep(pytester)


def test_no_keeper_gets_the_token_in_argv_or_environment(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc")
    pytester.makepyfile(SUITE)
    pytester.runpytest("--rerobots-reuse=1", f"--rerobots-keepalive-interval={PING}"
                       ).assert_outcomes(passed=1)
    [record] = records(pytester)
    pid = record["keeper"]
    assert sim.token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert sim.token.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert os.getpgid(pid) == pid  # a session of its own
    log = store(pytester) / record["id"] / "keeper.log"
    assert not log.exists() or sim.token not in log.read_text()
    # No file of the store holds it either (the record has a SHA-256 of it).
    for path in store(pytester).rglob("*"):
        assert not path.is_file() or sim.token.encode() not in path.read_bytes(), path
    sweep(pytester)
    assert keeper_gone(pid)


def test_a_run_that_keeps_holds_the_token_as_a_secret(sim: Simulator, tmp_path: Path):
    from pytest_rerobots.run import Run

    with Run(sim.url, sim.token, ignore_env=True, ledger=tmp_path / "ledger.jsonl",
             watchdog=False, signals=False, keep_on_failure=True, reuse=1.0) as run:
        assert run.kept is not None
        for held in (run, run.kept):
            assert sim.token not in repr(held)
            assert sim.token not in repr(vars(held)), type(held).__name__


ACQUIRED = '''
import pathlib
import pytest
pytestmark = pytest.mark.rerobots("basic_kobuki")

@pytest.fixture(scope="module")
def module_robot(rerobots_run):
    with rerobots_run.acquire("basic_kobuki") as robot:
        yield robot

def test_fails(module_robot, rerobots_acquire):
    other = rerobots_acquire("fixed_misty2")
    pathlib.Path("ids.txt").write_text(module_robot.id + " " + other.id)
    module_robot.run("true")  # used here, though a module fixture rented it
    assert False

def test_idle(rerobots_acquire):
    pathlib.Path("idle.txt").write_text(rerobots_acquire("basic_kobuki").id)
'''


def test_keep_on_failure_keeps_what_the_test_used_however_it_got_it(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(ACQUIRED)
    result = pytester.runpytest("--rerobots-keep-on-failure",
                                f"--rerobots-keepalive-interval={PING}")
    result.assert_outcomes(passed=1, failed=1)
    used = set(ids(pytester))
    assert {r["id"] for r in records(pytester)} == used
    assert all(r["kind"] == "failure" for r in records(pytester))
    assert result.stdout.str().count("rerobots: kept for debugging:") == 2
    idle = (pytester.path / "idle.txt").read_text()
    assert status(sim, idle) not in LIVE  # the passing test's own robot ended
    ledger = Ledger(pytester.path / ".pytest_cache" / "d" / "rerobots" / "ledger.jsonl")
    assert {r["id"] for r in ledger.live()} == used
    assert ledger.live(include_kept=False) == []
    assert [r["kind"] for r in ledger.records() if r["event"] == "kept"] == ["failure"] * 2
    sweep(pytester)
    assert all(status(sim, ident) not in LIVE for ident in used)
    assert records(pytester) == []


def test_under_xdist_each_worker_keeps_its_own_and_the_controller_says_so(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(SUITE.replace("def test_robot", "def test_one") + '''
def test_two(rerobots_instance):
    with pathlib.Path("ids.txt").open("a") as fh:
        fh.write(rerobots_instance.id + "\\n")
''')
    result = pytester.runpytest_subprocess("-n", "2", "--rerobots-reuse=1",
                                           f"--rerobots-keepalive-interval={PING}")
    result.assert_outcomes(passed=2)
    kept = {r["id"] for r in records(pytester)}
    assert kept == set(ids(pytester)) and kept
    for ident in kept:
        result.stdout.fnmatch_lines([f"rerobots: kept for reuse: {ident} (basic_kobuki*"])
    sweep(pytester)
    assert records(pytester) == []


def test_a_kept_instance_lasts_until_its_lease_and_its_keeper_then_cleans_up(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(FAILING)
    result = pytester.runpytest("--rerobots-keep-on-failure", "--rerobots-lease=5",
                                f"--rerobots-keepalive-interval={PING}")
    result.assert_outcomes(passed=1, failed=1)
    [record] = records(pytester)
    ident = record["id"]
    assert status(sim, ident) == "READY"
    # The server ends it when its lease of 5 s runs out; its keeper notices and tidies up.
    assert wait_until(lambda: status(sim, ident) not in LIVE, 15)
    assert wait_until(lambda: keeper_gone(record["keeper"]), 5)
    assert records(pytester) == []
    ledger = Ledger(pytester.path / ".pytest_cache" / "d" / "rerobots" / "ledger.jsonl")
    assert ledger.live() == []
    assert [(r["by"], r["outcome"]) for r in ledger.records()
            if r["event"] == "ended" and r["id"] == ident] == [("keeper", "already ended")]


def test_a_keeper_stopped_by_its_pid_leaves_the_instance_to_the_sweep(
        pytester: pytest.Pytester, sim: Simulator, kept_cleanup: None):
    pytester.makepyfile(FAILING)
    pytester.runpytest("--rerobots-keep-on-failure", f"--rerobots-keepalive-interval={PING}"
                       ).assert_outcomes(passed=1, failed=1)
    [record] = records(pytester)
    sim.configure(keepalive_timeout=60.0)  # (what ends it now must be the keeper, or nothing)
    assert keep.stop_keeper(record["keeper"])
    assert keeper_gone(record["keeper"])
    assert status(sim, record["id"]) == "READY"  # not ended by the keeper
    assert [r["id"] for r in records(pytester)] == [record["id"]]
    swept = sweep(pytester)
    swept.stdout.fnmatch_lines([f"rerobots sweep: {record['id']} (basic_kobuki) *"])
    assert status(sim, record["id"]) not in LIVE and records(pytester) == []


def test_under_the_embedded_simulator_nothing_is_kept_and_the_header_says_so(
        pytester: pytest.Pytester):
    pytester.makepyfile(FAILING)
    result = pytester.runpytest("--rerobots-sim", "--rerobots-keep-on-failure",
                                "--rerobots-reuse=1")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["rerobots: --rerobots-keep-on-failure and --rerobots-reuse do "
                                 "nothing here: the embedded simulator ends with the run"])
    out = result.stdout.str()
    assert "rerobots: kept for" not in out and "kept (for" not in out
    assert re.search(r"\s{2}terminated\n", out)
    assert records(pytester) == []


def test_claim_takes_only_this_origin_token_checkout_type_and_deployment(tmp_path: Path):
    """What a run may attach to, from records alone (no keeper, no API)."""
    base = {"kind": "reuse", "wtype": "basic_kobuki", "deployment": "d-1", "api_url": "http://a",
            "token_sha256": "t" * 64, "checkout": "/co", "lease_end": time.time() + 3600,
            "kept_at": 0.0}
    variants = {
        "other-origin": {"api_url": "http://b"},
        "other-token": {"token_sha256": "u" * 64},
        "other-checkout": {"checkout": "/elsewhere"},
        "other-type": {"wtype": "fixed_misty2"},
        "for-debugging": {"kind": "failure"},
        "lease-nearly-over": {"lease_end": time.time() + 60},
        "mine": {},
    }
    store = keep.KeptStore(tmp_path, api_url="http://a", token_sha256="t" * 64, checkout="/co")
    for n, (ident, change) in enumerate(variants.items()):
        directory = tmp_path / ident
        directory.mkdir()
        (directory / "key").write_text(f"key of {ident}")
        fd = os.open(directory, os.O_RDONLY)
        try:
            keep.KeptStore._write(fd, {**base, **change, "id": ident, "kept_at": float(n)})
        finally:
            os.close(fd)
    assert store.claim("basic_kobuki", "d-2") is None  # another deployment, when pinned
    record, key = store.claim("basic_kobuki") or ({}, "")
    assert record["id"] == "mine" and key == "key of mine"
    assert not (tmp_path / "mine").exists()  # claimed: gone from the store
    # The one whose lease is nearly over was dropped (a client would also have ended it).
    assert store.claim("basic_kobuki") is None
    assert {r["id"] for r in store.records()} == set(variants) - {"mine", "lease-nearly-over"}
