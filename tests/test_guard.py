"""The termination layers' pieces, one by one: ledger, sweep, watchdog, signal guard.

How they hold up together when a whole run is killed is ``test_chaos.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from pytest_rerobots import RerobotsClient
from pytest_rerobots.ending import end_ids
from pytest_rerobots.ledger import Ledger
from pytest_rerobots.signals import SignalGuard
from pytest_rerobots.sim import Simulator
from pytest_rerobots.sweep import sweep
from pytest_rerobots.watchdog import Watchdog

pytest_plugins = ["pytester"]

LIVE = ("INIT", "READY")


def pid_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped has exited too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def status(api: RerobotsClient, ident: str) -> str:
    return str(api.instance(ident)["status"])


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """A simulator without SSH hosts (the layers only talk to the API), READY at once and
    visible at once (no 404 window); :func:`rent_in_init` rents one that stays in INIT for
    a second."""
    with Simulator(ssh_backend="none", ready_delay=0.1, terminate_delay=0.05,
                   not_found_window=0.0) as sim:
        yield sim


@pytest.fixture
def api(sim: Simulator) -> Iterator[RerobotsClient]:
    with RerobotsClient(sim.token, sim.url, ignore_env=True) as client:
        yield client


def rent_in_init(sim: Simulator, api: RerobotsClient, target: str) -> str:
    sim.configure(ready_delay=1.0)  # (instances already READY stay READY)
    ident = api.new_instance(target).id
    assert status(api, ident) == "INIT"
    return ident


def rent_ready(api: RerobotsClient, target: str) -> str:
    ident = api.new_instance(target).id
    assert wait_until(lambda: status(api, ident) == "READY", 10)
    return ident


# -- the ledger -------------------------------------------------------------------------


APPENDER = textwrap.dedent("""
    import sys
    from pytest_rerobots.ledger import Ledger
    path, name = sys.argv[1], sys.argv[2]
    ledger = Ledger(path, run_id=name)
    for n in range(int(sys.argv[3])):
        # Long lines: a write that is not atomic would show torn or mixed lines.
        ledger.record_rented(f"{name}-{n}", "x" * 5000)
""")


def test_concurrent_appends_from_processes_never_interleave(tmp_path: Path):
    path = tmp_path / "deep" / "ledger.jsonl"
    writers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), f"w{k}", "150"])
               for k in range(4)]
    for proc in writers:
        assert proc.wait(timeout=60) == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # every record ends its line
    records = [json.loads(line) for line in lines[:-1]]  # every line is one whole record
    assert len(records) == 600
    for k in range(4):
        mine = [r["id"] for r in records if r["run"] == f"w{k}"]
        assert mine == [f"w{k}-{n}" for n in range(150)]  # each writer's order is kept
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_live_is_rented_minus_ended_per_run(tmp_path: Path):
    one = Ledger(tmp_path / "ledger.jsonl", run_id="run-1", api_url="http://a")
    two = Ledger(tmp_path / "ledger.jsonl", run_id="run-2", api_url="http://a")
    one.record_rented("a", "basic_kobuki")
    one.record_rented("b", "basic_kobuki")
    two.record_rented("c", "fixed_misty2")
    one.record_ended("a", "terminated")
    two.record_ended("b", "already ended", by="controller")  # any run may end any id
    one.record_rented("d", "basic_kobuki")
    one.record_ended("d", "not found", by="sweep")
    one.record_rented("d", "basic_kobuki")  # rented again after its end: live again
    one.record_ended("zzz", "terminated")  # an end without a rent changes nothing

    assert [r["id"] for r in one.live()] == ["c", "d"]
    assert [r["id"] for r in one.live(run_id="run-1")] == ["d"]
    assert [r["id"] for r in one.live(run_id="run-2")] == ["c"]
    assert one.live(run_id="run-3") == []
    record = one.live(run_id="run-2")[0]
    assert (record["target"], record["api_url"], record["pid"]) == ("fixed_misty2", "http://a",
                                                                   os.getpid())
    ended = [r for r in one.records() if r["event"] == "ended"]
    assert [r["by"] for r in ended] == ["teardown", "controller", "sweep", "teardown"]


def test_a_torn_last_line_is_skipped_and_the_next_record_survives(tmp_path: Path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path, run_id="r")
    ledger.record_rented("a", "basic_kobuki")
    with path.open("a") as fh:  # a writer died in the middle of its line
        fh.write('{"event": "rented", "id": "torn", "tar')
    assert [r["id"] for r in ledger.records()] == ["a"]
    ledger.record_rented("b", "basic_kobuki")
    assert [r["id"] for r in ledger.live()] == ["a", "b"]
    path.write_bytes(path.read_bytes() + b"\xff\xfe not json\n[1, 2]\n")  # garbage lines
    assert [r["id"] for r in ledger.live()] == ["a", "b"]


def test_a_missing_ledger_is_empty(tmp_path: Path):
    assert Ledger(tmp_path / "nothing.jsonl").live() == []


# -- ending many, and the sweep ---------------------------------------------------------


def test_end_ids_reports_each_outcome_and_never_raises(sim: Simulator, api: RerobotsClient,
                                                      tmp_path: Path):
    ready = rent_ready(api, "basic_kobuki")
    init = rent_in_init(sim, api, "fixed_misty2")  # waited out
    gone = str(uuid.uuid4())
    ledger = Ledger(tmp_path / "ledger.jsonl", run_id="r")
    with RerobotsClient("not-the-token", sim.url, ignore_env=True) as stranger:
        assert end_ids(stranger, [ready])[ready].startswith("failed: ")
    results = end_ids(api, [ready, init, gone, ready], deadline=20, ledger=ledger, by="sweep")
    assert results == {ready: "terminated", init: "terminated", gone: "not found"}
    assert end_ids(api, [ready]) == {ready: "already ended"}
    assert {(r["id"], r["by"]) for r in ledger.records()} == {
        (ready, "sweep"), (init, "sweep"), (gone, "sweep")}
    assert sim.live_instances() == []


def test_sweep_ends_every_live_instance_and_marks_the_ledger(sim: Simulator,
                                                            api: RerobotsClient,
                                                            tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.jsonl", run_id="old", api_url=sim.url)
    ready = rent_ready(api, "basic_kobuki")
    init = rent_in_init(sim, api, "fixed_misty2")
    ended = rent_ready(api, "basic_kobuki")
    api.terminate(ended)
    for ident in (ready, init, ended):
        ledger.record_rented(ident, "basic_kobuki")
    unknown = str(uuid.uuid4())
    ledger.record_rented(unknown, "basic_kobuki")
    done = str(uuid.uuid4())  # already ended in the ledger: not touched
    ledger.record_rented(done, "basic_kobuki")
    ledger.record_ended(done, "terminated")
    elsewhere = Ledger(ledger.path, run_id="other", api_url="https://api.rerobots.net")
    elsewhere.record_rented("real-one", "basic_kobuki")

    lines: list[str] = []
    assert sweep(api, ledger, lines.append) == 0
    text = "\n".join(lines)
    assert f"{ready} (basic_kobuki) terminated" in text
    assert f"{init} (basic_kobuki) terminated" in text  # waited out its INIT
    assert f"{ended} (basic_kobuki) already ended" in text
    assert f"{unknown} (basic_kobuki) not found" in text
    assert done not in text
    assert ("real-one (basic_kobuki) skipped: rented from https://api.rerobots.net "
            "(sweep with --rerobots-api-url https://api.rerobots.net)") in text
    assert lines[-1] == "rerobots sweep: 4 ended, 0 failed, 1 skipped"
    assert sim.live_instances() == []
    assert [r["id"] for r in ledger.live()] == ["real-one"]
    swept = [r for r in ledger.records() if r.get("by") == "sweep"]
    assert {r["id"] for r in swept} == {ready, init, ended, unknown}

    lines.clear()
    ledger.record_ended("real-one", "terminated")
    assert sweep(api, ledger, lines.append) == 0
    assert lines == [f"rerobots sweep: no live instances in {ledger.path}"]


def test_sweep_without_a_token_says_so_and_fails(sim: Simulator, api: RerobotsClient,
                                                 tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.jsonl", api_url=sim.url)
    ledger.record_rented("some-id", "basic_kobuki")
    lines: list[str] = []
    with RerobotsClient(None, sim.url, ignore_env=True) as anonymous:
        assert sweep(anonymous, ledger, lines.append) == 1
    assert lines == ["rerobots sweep: some-id (basic_kobuki) not ended: no API token "
                     "(set REROBOTS_API_TOKEN or pass --rerobots-token-file)"]
    assert [r["id"] for r in ledger.live()] == ["some-id"]


def test_sweep_counts_failures(sim: Simulator, api: RerobotsClient, tmp_path: Path):
    ready = rent_ready(api, "basic_kobuki")
    ledger = Ledger(tmp_path / "ledger.jsonl", api_url=sim.url)
    ledger.record_rented(ready, "basic_kobuki")
    lines: list[str] = []
    with RerobotsClient("wrong", sim.url, ignore_env=True) as wrong:
        assert sweep(wrong, ledger, lines.append) == 1
    assert f"{ready} (basic_kobuki) failed: " in lines[0]
    assert "wrong" not in lines[0].split("failed:")[0]
    assert [r["id"] for r in ledger.live()] == [ready]  # still there for the next sweep
    api.terminate(ready)


@pytest.mark.parametrize("how", ["environment", "command line"])
def test_pytest_rerobots_sweep(pytester: pytest.Pytester, sim: Simulator, api: RerobotsClient,
                               monkeypatch: pytest.MonkeyPatch, how: str):
    ledger_path = pytester.path / "records" / "ledger.jsonl"
    ledger = Ledger(ledger_path, run_id="killed-run", api_url=sim.url)
    ids = [rent_ready(api, "basic_kobuki"), rent_ready(api, "fixed_misty2")]
    for ident in ids:
        ledger.record_rented(ident, "basic_kobuki")
    args = ["--rerobots-sweep", f"--rerobots-ledger={ledger_path}"]
    if how == "environment":
        monkeypatch.setenv("REROBOTS_API_URL", sim.url)
        monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)
    else:
        token_file = pytester.path / "token"
        token_file.write_text(sim.token + "\n")
        args += [f"--rerobots-api-url={sim.url}", f"--rerobots-token-file={token_file}"]
    pytester.makepyfile("def test_never_runs(): raise AssertionError")

    result = pytester.runpytest_subprocess(*args)
    assert result.ret == 0
    result.stdout.fnmatch_lines([f"rerobots sweep: {ids[0]} (basic_kobuki) terminated",
                                 f"rerobots sweep: {ids[1]} (basic_kobuki) terminated",
                                 "rerobots sweep: 2 ended, 0 failed, 0 skipped"])
    assert "test_never_runs" not in result.stdout.str()
    assert sim.token not in result.stdout.str() + result.stderr.str()
    assert sim.live_instances() == []
    assert ledger.live() == []

    again = pytester.runpytest_subprocess(*args)
    assert again.ret == 0
    again.stdout.fnmatch_lines([f"rerobots sweep: no live instances in {ledger_path}"])


def test_pytest_rerobots_sweep_exits_1_when_one_is_left(pytester: pytest.Pytester,
                                                       sim: Simulator, api: RerobotsClient,
                                                       monkeypatch: pytest.MonkeyPatch):
    ready = rent_ready(api, "basic_kobuki")
    ledger_path = pytester.path / "ledger.jsonl"
    Ledger(ledger_path, api_url=sim.url).record_rented(ready, "basic_kobuki")
    monkeypatch.setenv("REROBOTS_API_URL", sim.url)
    monkeypatch.setenv("REROBOTS_API_TOKEN", "not-a-token-of-this-sim")
    result = pytester.runpytest("--rerobots-sweep", f"--rerobots-ledger={ledger_path}")
    assert result.ret == 1
    result.stdout.fnmatch_lines([f"rerobots sweep: {ready} (basic_kobuki) failed: *"])
    api.terminate(ready)


# -- the watchdog -----------------------------------------------------------------------


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_watchdog_ends_what_was_not_released_when_the_pipe_closes(
        sim: Simulator, api: RerobotsClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REROBOTS_API_TOKEN", sim.token)  # as under the plugin: inherited?
    ledger = Ledger(tmp_path / "ledger.jsonl", run_id="r", api_url=sim.url)
    watchdog = Watchdog(sim.url, sim.token, ledger=ledger)
    assert watchdog.pid is None  # nothing rented yet: no process
    held = rent_ready(api, "basic_kobuki")
    released = rent_ready(api, "basic_kobuki")
    watchdog.rent(held)
    watchdog.rent(released)
    watchdog.release(released)
    in_init = rent_in_init(sim, api, "fixed_misty2")  # INIT when the pipe closes
    watchdog.rent(in_init)
    proc = watchdog.process
    assert proc is not None and watchdog.pid == proc.pid
    if Path("/proc").is_dir():
        assert sim.token not in cmdline(proc.pid)  # the token came through the pipe
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert sim.token.encode() not in environ and b"REROBOTS_API_TOKEN" not in environ
    assert status(api, in_init) == "INIT"

    begun = time.monotonic()
    watchdog.close(timeout=30)
    assert proc.returncode == 0  # it waited out INIT, ended both, and exited
    assert time.monotonic() - begun < 15
    assert pid_gone(proc.pid)
    assert status(api, held) in ("TERMINATING", "TERMINATED")
    assert status(api, in_init) in ("TERMINATING", "TERMINATED")
    assert status(api, released) == "READY"  # released ids are left alone
    assert {(r["id"], r["by"]) for r in ledger.records() if r["event"] == "ended"} == {
        (held, "watchdog"), (in_init, "watchdog")}
    api.terminate(released)


def test_watchdog_leaves_a_shared_instance_that_others_still_use(
        sim: Simulator, api: RerobotsClient, tmp_path: Path):
    """xdist shared mode: the watchdog of a worker that dies ends a shared instance only
    when no other live worker still uses it."""
    from pytest_rerobots.xdist_pool import SharedPool

    pool = SharedPool(tmp_path / "share")
    other_worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        still_used, last_user = rent_ready(api, "basic_kobuki"), rent_ready(api, "fixed_misty2")
        for key, ident, users in (("k1", still_used, [os.getpid(), other_worker.pid]),
                                  ("k2", last_user, [os.getpid()])):
            with pool._locked(key) as state:
                state.update(id=ident, users=users)
        watchdog = Watchdog(sim.url, sim.token)
        watchdog.rent(still_used, shared=(str(pool.directory), "k1"))
        watchdog.rent(last_user, shared=(str(pool.directory), "k2"))
        proc = watchdog.process
        assert proc is not None
        watchdog.close(timeout=30)  # as when this process dies holding both
        assert proc.returncode == 0
        assert status(api, still_used) == "READY"
        assert status(api, last_user) in ("TERMINATING", "TERMINATED")
        with pool._locked("k1") as state:  # the dead user is gone, the other stays
            assert state["users"] == [other_worker.pid]
    finally:
        other_worker.kill()
        other_worker.wait()
    api.terminate(still_used)


def test_watchdog_ends_what_a_killed_process_held(sim: Simulator, api: RerobotsClient):
    ident = rent_ready(api, "basic_kobuki")
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from pytest_rerobots.watchdog import Watchdog
            url, token, ident = sys.stdin.read().split()
            watchdog = Watchdog(url, token)
            watchdog.rent(ident)
            print(watchdog.pid, flush=True)
            time.sleep(60)
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert owner.stdin is not None and owner.stdout is not None
    owner.stdin.write(f"{sim.url} {sim.token} {ident}\n")
    owner.stdin.close()
    watchdog_pid = int(owner.stdout.readline())
    owner.kill()
    owner.wait(10)
    owner.stdout.close()
    assert wait_until(lambda: status(api, ident) in ("TERMINATING", "TERMINATED"), 15)
    assert wait_until(lambda: pid_gone(watchdog_pid), 10)


def test_a_killed_watchdog_is_replaced_with_everything_it_held(sim: Simulator,
                                                              api: RerobotsClient):
    first, second = rent_ready(api, "basic_kobuki"), rent_ready(api, "basic_kobuki")
    watchdog = Watchdog(sim.url, sim.token)
    watchdog.rent(first)
    old = watchdog.process
    assert old is not None
    old.kill()
    old.wait(10)
    watchdog.rent(second)  # notices the death, starts another and tells it both
    assert watchdog.process is not old
    proc = watchdog.process
    assert proc is not None
    watchdog.close(timeout=20)
    assert proc.returncode == 0
    assert {status(api, first), status(api, second)} <= {"TERMINATING", "TERMINATED"}


def test_watchdog_exits_at_once_when_everything_was_released(sim: Simulator,
                                                            api: RerobotsClient):
    ident = rent_ready(api, "basic_kobuki")
    watchdog = Watchdog(sim.url, sim.token)
    watchdog.rent(ident)
    watchdog.release(ident)
    proc = watchdog.process
    assert proc is not None
    watchdog.close(timeout=20)
    assert proc.returncode == 0 and pid_gone(proc.pid)
    assert status(api, ident) == "READY"
    watchdog.close()  # idempotent
    api.terminate(ident)


def test_a_watchdog_that_outlasts_close_is_reaped_when_it_exits():
    watchdog = Watchdog("http://127.0.0.1:9", None)
    # Stands in for a watchdog still waiting out INIT when the run ends.
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"],
                            stdin=subprocess.PIPE)
    watchdog.process = slow
    watchdog.close(timeout=0.05)
    assert slow.returncode is None  # close() did not wait for it ...
    del slow  # ... and dropping our reference must not warn that it still runs
    assert wait_until(lambda: all(t.name != "rerobots-watchdog-reaper"
                                  for t in threading.enumerate()), 10)


# -- the signal guard -------------------------------------------------------------------


HANDLED = ("SIGTERM", "SIGHUP", "SIGINT")


@pytest.fixture
def handlers() -> Iterator[dict[str, object]]:
    """Known handlers before each test (the outer run's own guard must not see our
    signals), and the original ones back afterwards."""
    saved = {name: signal.getsignal(getattr(signal, name)) for name in HANDLED}
    seen: list[int] = []

    def recorder(signum: int, frame: object) -> None:
        seen.append(signum)

    signal.signal(signal.SIGTERM, recorder)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield {"recorder": recorder, "seen": seen}
    for name, handler in saved.items():
        signal.signal(getattr(signal, name), handler)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_becomes_keyboard_interrupt(handlers: dict, name: str):
    guard = SignalGuard(write=lambda text: None)
    assert guard.install()
    try:
        with pytest.raises(KeyboardInterrupt, match=f"received {name}"):
            signal.raise_signal(getattr(signal, name))
            time.sleep(1)  # (the handler runs at the next bytecode; never gets here)
    finally:
        guard.uninstall()
    # A Python handler that was there before is chained, not dropped.
    assert handlers["seen"] == ([signal.SIGTERM] if name == "SIGTERM" else [])


def test_repeats_are_ignored_during_the_grace_then_interrupt_again(handlers: dict):
    said: list[str] = []
    guard = SignalGuard(grace=30, write=said.append)
    guard.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
            time.sleep(1)
        # Teardown is running now: nothing may interrupt it.
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGTERM"):
            signal.raise_signal(getattr(signal, name))
            time.sleep(0.01)
        assert said == [f"\nrerobots: {name} ignored while instances are being terminated\n"
                        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGTERM")]
        assert guard.first_at is not None
        guard.first_at -= 31  # the grace is over: an insistent operator gets through
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(1)
    finally:
        guard.uninstall()


def test_uninstall_restores_the_previous_handlers(handlers: dict):
    guard = SignalGuard()
    assert guard.install() and guard.install()  # a second install changes nothing
    assert guard.installed
    for name in HANDLED:
        assert signal.getsignal(getattr(signal, name)) == guard._handle
    guard.uninstall()
    assert not guard.installed
    assert signal.getsignal(signal.SIGTERM) is handlers["recorder"]
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    guard.uninstall()  # idempotent


def test_ignored_and_foreign_handlers_are_left_alone(handlers: dict):
    def theirs(signum: int, frame: object) -> None:
        pass

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # started under nohup
    signal.signal(signal.SIGINT, theirs)  # somebody else owns Ctrl-C
    guard = SignalGuard()
    guard.install()
    try:
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is theirs
        assert signal.getsignal(signal.SIGTERM) == guard._handle
    finally:
        guard.uninstall()
    assert signal.getsignal(signal.SIGTERM) is handlers["recorder"]


def test_not_installed_off_the_main_thread(handlers: dict):
    guard = SignalGuard()
    answers: list[bool] = []
    worker = threading.Thread(target=lambda: answers.append(guard.install()))
    worker.start()
    worker.join(10)
    assert answers == [False]
    assert not guard.installed
    assert signal.getsignal(signal.SIGTERM) is handlers["recorder"]
    worker = threading.Thread(target=guard.uninstall)  # a no-op there, never an error
    worker.start()
    worker.join(10)
