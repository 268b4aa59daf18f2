"""Chaos: kill a run every way it can die; its instances must end all the same.

A simulator serves in processes of its own (it survives every run it watches).
Each case runs a small suite in a pytest subprocess pointed at it as if it were
the real API, with a token of its own so that ``GET /instances`` lists that
run's instances only; injects a fault (an error, a signal, a kill, a crash), and
asserts that the simulator lists no live instance of the run within
``DEADLINE`` seconds, that the expected layer ended it (the ledger says which),
and that no process of the run is left (pytest, xdist workers, watchdogs).
The seconds from the fault until the last instance ended are recorded as the
test's ``seconds_to_end`` property (JUnit XML) and printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pytest

from pytest_rerobots import RerobotsClient
from pytest_rerobots.sim.catalog import PROFILES
from pytest_rerobots.sim.launch import start_process

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists() or os.name != "posix",
                                reason="needs POSIX signals and /proc to find a run's processes")

#: The guarantee: no live instance of the run this long after the fault.
DEADLINE = 15.0
#: Timings of the two simulators. "fast": READY at once, keepalive window 3 s (every
#: run pings every KEEPALIVE s). "slow": a long READY wait, keepalive as on the real server.
FAST = {"ready_delay": 0.2, "terminate_delay": 0.1, "keepalive_timeout": 3.0, "init_timeout": 0}
SLOW = {"ready_delay": 3.5, "terminate_delay": 0.1, "keepalive_timeout": 60.0, "init_timeout": 0}
KEEPALIVE = 0.5
USERS = 24  # one token per case
DEPLOYMENTS = 12

CONFTEST = '''
import os, pathlib, time
import pytest

MARKS = pathlib.Path(os.environ["CHAOS_MARKS"])
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


class Chaos:
    def mark(self, name, text=""):
        """Tell the parent how far we got (written whole, then renamed)."""
        partial = MARKS / f".{name}.{WORKER}"
        partial.write_text(text)
        partial.rename(MARKS / f"{name}.{WORKER}")

    def hold(self, seconds):
        """Stay in the test for a bounded time (a signal is on its way). Longer under a
        profile whose READY times vary, so that two workers' tests still overlap."""
        end = time.monotonic() + seconds * float(os.environ.get("CHAOS_HOLD_SCALE", "1"))
        while time.monotonic() < end:
            time.sleep(0.02)


@pytest.fixture
def chaos():
    return Chaos()
'''

SUITES = {
    "pass": '''
        import pytest
        pytestmark = pytest.mark.rerobots("chaos_bot")
        def test_robot(rerobots_instance):
            assert rerobots_instance.run("echo ok").stdout == "ok\\n"
        ''',
    "fail": '''
        import pytest
        pytestmark = pytest.mark.rerobots("chaos_bot")
        def test_robot(rerobots_instance):
            assert rerobots_instance.run("echo ok").stdout == "something else\\n"
        ''',
    "fixture-error": '''
        import pytest
        pytestmark = pytest.mark.rerobots("chaos_bot")
        @pytest.fixture
        def flashed(rerobots_instance):
            raise RuntimeError("flashing the firmware failed")
        def test_robot(flashed):
            pass
        ''',
    "hold": '''
        import pytest
        pytestmark = pytest.mark.rerobots("chaos_bot")
        def test_hold(rerobots_instance, chaos):
            chaos.mark("running", rerobots_instance.id)
            chaos.hold(20)
        ''',
    "wait": '''
        import pytest
        pytestmark = pytest.mark.rerobots("chaos_bot")
        def test_wait(rerobots_instance, chaos):
            chaos.mark("running", rerobots_instance.id)  # never: killed in the READY wait
            chaos.hold(20)
        ''',
    "exit": '''
        import os
        import pytest
        pytestmark = pytest.mark.rerobots("chaos_bot")
        def test_exit(rerobots_instance, chaos):
            chaos.mark("running", rerobots_instance.id)
            os._exit(3)
        ''',
    "xdist-hold": '''
        import pytest
        pytestmark = pytest.mark.rerobots("chaos_bot")
        def test_one(rerobots_instance, chaos):
            chaos.mark("running", rerobots_instance.id)
            chaos.hold(6)
        def test_two(rerobots_instance, chaos):
            chaos.mark("running", rerobots_instance.id)
            chaos.hold(6)
        ''',
    "xdist-crash": '''
        import os
        import pytest
        pytestmark = pytest.mark.rerobots("chaos_bot")
        def test_crash(rerobots_instance, chaos):
            chaos.hold(0.5)  # both workers hold an instance by now
            chaos.mark("crashing", rerobots_instance.id)
            os._exit(3)
        def test_other(rerobots_instance, chaos):
            chaos.mark("running", rerobots_instance.id)
            chaos.hold(2)
        ''',
}


# -- the simulators, in processes of their own ---------------------------------------------


@dataclass
class SimProcess:
    """``python -m pytest_rerobots.sim`` with a catalog of ours, and one token per case."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    tokens: list[str]

    def client(self, token: str) -> RerobotsClient:
        return RerobotsClient(token, self.url, ignore_env=True, timeout=5.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


#: REROBOTS_CHAOS_PROFILE=realistic runs every case against the simulator's realistic
#: profile (slow, uneven READY and terminate, the 404 window, the busy race), keeping only
#: each simulator's keepalive window and, for "slow", its READY wait.
PROFILE = os.environ.get("REROBOTS_CHAOS_PROFILE", "")


def profile_sections(name: str) -> dict[str, dict[str, object]]:
    if not name:
        return {}
    text = resources.files("pytest_rerobots.sim").joinpath(PROFILES[name]).read_text()
    return tomllib.loads(text)


def catalog(timings: dict[str, float], tokens: list[str]) -> str:
    sections = profile_sections(PROFILE)
    keep = {k: v for k, v in timings.items() if k != "ready_delay" or timings is SLOW
            or not PROFILE}
    sections["timings"] = {**sections.get("timings", {}), **keep}
    lines = []
    for section, values in sections.items():
        # (JSON's numbers, lists and booleans are TOML's too.)
        lines += [f"[{section}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items()), ""]
    lines += ["[types.chaos_bot]", 'desc = "a robot for chaos tests"', ""]
    for _ in range(DEPLOYMENTS):
        lines += ["[[deployments]]", 'type = "chaos_bot"', 'region = "us:cali"', ""]
    lines.append("[tokens]")
    lines += [f'"{token}" = "case-{n:02d}"' for n, token in enumerate(tokens)]
    return "\n".join(lines) + "\n"


def start_sim(name: str, timings: dict[str, float], tokens: list[str],
              directory: Path) -> SimProcess:
    config = directory / f"{name}.toml"
    config.write_text(catalog(timings, tokens))
    try:
        launched = start_process("--config", str(config), start_new_session=True)
    except RuntimeError as exc:
        pytest.fail(f"the {name} simulator did not start: {exc}")
    return SimProcess(name, launched.proc, launched.url, tokens)


@dataclass
class Sims:
    fast: SimProcess
    slow: SimProcess
    tokens: list[str]
    used: int = 0

    def token(self) -> str:
        """The token of a user no other case uses (the same user on both simulators)."""
        assert self.used < len(self.tokens), "more chaos cases than USERS"
        self.used += 1
        return self.tokens[self.used - 1]


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sims]:
    directory = tmp_path_factory.mktemp("chaos-sims")
    tokens = [secrets.token_urlsafe(16) for _ in range(USERS)]
    started: list[SimProcess] = []
    try:
        for name, timings in (("fast", FAST), ("slow", SLOW)):
            started.append(start_sim(name, timings, tokens, directory))
        yield Sims(*started, tokens=tokens)
        for sim in started:  # they watched every run die and are still serving
            assert sim.process.poll() is None, f"the {sim.name} simulator died"
    finally:
        for sim in started:
            sim.stop()
            assert process_gone(sim.process.pid)


# -- processes ------------------------------------------------------------------------------


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (an unreaped zombie has exited too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ``CHAOS_RUN=tag``: the run's pytest,
    its xdist workers and its watchdogs (they inherit the environment)."""
    needle = f"CHAOS_RUN={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


# -- one run of a small suite, and what the simulator says about it -------------------------


@dataclass
class Run:
    """A pytest subprocess running one of ``SUITES`` against a simulator, as a user of
    its own, in a session of its own (so that its process group can be signalled)."""

    name: str
    sim: SimProcess
    token: str
    directory: Path
    api: RerobotsClient
    properties: list[tuple[str, object]]  # the test's user_properties (JUnit XML)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    process: subprocess.Popen[bytes] | None = None
    exited_at: float | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def marks(self) -> Path:
        return self.directory / "marks"

    @property
    def ledger(self) -> Path:
        return self.directory / "ledger.jsonl"

    def start(self, suite: str, *args: str, via_bash_exec: bool = False,
              env: dict[str, str] | None = None) -> None:
        self.marks.mkdir(parents=True)
        (self.directory / "pytest.ini").write_text("[pytest]\n")
        (self.directory / "conftest.py").write_text(CONFTEST)
        (self.directory / "test_suite.py").write_text(textwrap.dedent(SUITES[suite]))
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("PYTEST_", "REROBOTS_"))}  # nothing from our own run
        self.env = {**base, "REROBOTS_API_URL": self.sim.url, "REROBOTS_API_TOKEN": self.token,
                    "REROBOTS_LEDGER": str(self.ledger), "CHAOS_MARKS": str(self.marks),
                    "CHAOS_RUN": self.tag, "CHAOS_HOLD_SCALE": "3" if PROFILE else "1",
                    **(env or {})}
        argv = ["-m", "pytest", "-p", "no:cacheprovider", "-rA",
                f"--rerobots-keepalive-interval={KEEPALIVE}", *args]
        command = [sys.executable, *argv]
        if via_bash_exec:  # a GitHub Actions step whose script is `exec pytest ...`
            command = ["bash", "-c", 'exec "$0" "$@"', sys.executable, *argv]
        with (self.directory / "output.txt").open("wb") as out:
            self.process = subprocess.Popen(command, cwd=self.directory, env=self.env,
                                            stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        path = self.directory / "output.txt"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def wait_for(self, what: str, probe: Callable[[], object], timeout: float = 30) -> object:
        """Poll ``probe`` until it answers something truthy (never a blind sleep)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = probe()
            if answer:
                return answer
            if self.process is not None and self.process.poll() is not None:
                answer = probe()
                if answer:
                    return answer
                pytest.fail(f"{self.name}: the run exited ({self.process.returncode}) before "
                            f"{what}\n{self.output()}")
            time.sleep(0.02)
        pytest.fail(f"{self.name}: no sign of {what} after {timeout} s\n{self.output()}")

    def marked(self, name: str) -> list[str]:
        """The instance ids the suite wrote in its ``name`` markers (one per process)."""
        return [p.read_text() for p in sorted(self.marks.glob(f"{name}.*"))]

    def records(self) -> list[dict]:
        if not self.ledger.exists():
            return []
        records = []
        for line in self.ledger.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line being written right now
                records.append(json.loads(line))
        return records

    def rented(self) -> list[str]:
        return [r["id"] for r in self.records() if r["event"] == "rented"]

    def ended_by(self) -> dict[str, str]:
        """Which layer ended each instance first, according to the ledger."""
        first: dict[str, str] = {}
        for record in self.records():
            if record["event"] == "ended":
                first.setdefault(record["id"], record["by"])
        return first

    def live(self) -> list[str]:
        """The run's instances the simulator lists as INIT or READY."""
        return [i["id"] for i in self.api.instances(details=True)["workspace_instances"]
                if i["status"] in ("INIT", "READY")]

    def statuses(self) -> dict[str, str]:
        listing = self.api.instances(details=True, include_terminated=True,
                                     include_init_fail=True)
        return {i["id"]: i["status"] for i in listing["workspace_instances"]}

    def seconds_until_ended(self, since: float, ids: list[str] | None = None) -> float:
        """Seconds from ``since`` until the simulator lists none of ``ids`` (default: of
        the run's instances) as live; fails after ``DEADLINE`` s."""
        while True:
            live = [i for i in self.live() if ids is None or i in ids]
            now = time.monotonic()
            if not live:
                return now - since
            if now - since > DEADLINE:
                pytest.fail(f"{self.name}: {live} still live {DEADLINE} s after the fault\n"
                            f"{self.output()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.process is not None
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name}: the run did not exit within {timeout} s\n{self.output()}")
        self.exited_at = time.monotonic()
        return code

    def signal(self, signum: int, *, group: bool = True) -> float:
        """Send ``signum`` to the run's process group (a terminal, CI) or to its first
        process only; returns when it was sent."""
        if group:
            os.killpg(self.pid, signum)
        else:
            os.kill(self.pid, signum)
        return time.monotonic()

    def assert_token_on_no_command_line(self) -> int:
        """No process of the run (pytest, workers, watchdogs) shows the token in its
        command line, which anyone on the machine can read. Returns how many looked."""
        processes = tagged_processes(self.tag)
        for pid in processes:
            with contextlib.suppress(OSError):
                assert self.token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        return len(processes)

    def assert_no_process_left(self, timeout: float = 25) -> None:
        deadline = time.monotonic() + timeout
        while (left := tagged_processes(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [], f"{self.name}: processes left behind: {left}"

    def cleanup(self) -> None:
        """Whatever happened to the test: no process of this run survives it."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(10)
        for pid in tagged_processes(self.tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.api.close()


@pytest.fixture
def chaos(sims: Sims, tmp_path: Path,
          request: pytest.FixtureRequest) -> Iterator[Callable[..., Run]]:
    """``chaos("fast")``: a new run against that simulator (not started yet)."""
    runs: list[Run] = []

    def make(sim: str = "fast") -> Run:
        token = sims.token()
        server = sims.fast if sim == "fast" else sims.slow
        run = Run(request.node.name, server, token, tmp_path / f"run{len(runs)}",
                  server.client(token), request.node.user_properties)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.cleanup()


def finish(run: Run, since: float, *, by: set[str] | None, exit_codes: tuple[int, ...]) -> float:
    """The checks every case ends with: no live instance of the run within DEADLINE s
    of the fault (the seconds are recorded), the run's exit status, no process left,
    and which layer ended each instance (``by=None``: none of ours, the server did)."""
    seconds = run.seconds_until_ended(since)
    run.properties.append(("seconds_to_end", round(seconds, 2)))
    print(f"\nchaos {run.name}: the last instance ended {seconds:.2f} s after the fault")
    code = run.wait_exit(30)
    assert code in exit_codes, f"{run.name}: exit status {code}\n{run.output()}"
    run.assert_no_process_left()
    rented = run.rented()
    assert rented, f"{run.name}: nothing was rented\n{run.output()}"
    statuses = run.statuses()
    # (INIT_FAIL too: a start that failed, e.g. in the busy race, is over on the server.)
    assert {statuses[i] for i in rented} <= {"TERMINATING", "TERMINATED", "INIT_FAIL"}
    assert run.live() == []
    ended = run.ended_by()
    if by is None:
        assert ended == {}, f"{run.name}: expected only the server to act, ledger says {ended}"
    else:
        for ident in rented:
            if ended.get(ident) == "replaced":
                continue  # a start that failed (the busy race), ended before the fault
            assert ended.get(ident) in by, (
                f"{run.name}: expected {sorted(by)} to end {ident}, the ledger says {ended}")
    return seconds


INTERRUPTED = (pytest.ExitCode.INTERRUPTED,)
KILLED = (-signal.SIGKILL,)


# -- the run ends on its own ----------------------------------------------------------------


@pytest.mark.parametrize(("suite", "code"), [("pass", pytest.ExitCode.OK),
                                             ("fail", pytest.ExitCode.TESTS_FAILED),
                                             ("fixture-error", pytest.ExitCode.TESTS_FAILED)])
def test_run_ends_on_its_own(chaos, suite: str, code: int):
    run = chaos("fast")
    run.start(suite)
    run.wait_exit(60)
    assert run.exited_at is not None
    finish(run, run.exited_at, by={"teardown"}, exit_codes=(code,))


# -- layer 1 and 2: interrupted, pytest tears down --------------------------------------------


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_signal_during_a_test(chaos, name: str):
    run = chaos("fast")
    run.start("hold")
    run.wait_for("a running test", lambda: run.marked("running"))
    assert run.assert_token_on_no_command_line() == 2  # pytest and its watchdog
    since = run.signal(getattr(signal, name))
    finish(run, since, by={"teardown"}, exit_codes=INTERRUPTED)


def wait_in_init(run: Run) -> str:
    """Wait until the run is in its READY wait: the ledger records the instance (the
    watchdog heard of it first) and the simulator still says INIT."""
    ids = run.wait_for("an instance rented", run.rented)
    assert isinstance(ids, list)
    # The simulator lists it once the 404 window after POST /new is over, as the server does.
    assert run.wait_for("the instance listed", lambda: run.statuses().get(ids[0])) == "INIT"
    return ids[0]


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_the_ready_wait(chaos, presses: int):
    run = chaos("slow")
    run.start("wait")
    wait_in_init(run)
    since = run.signal(signal.SIGINT)
    if presses == 2:  # an impatient second Ctrl-C must not abort the cleanup
        time.sleep(0.5)
        run.signal(signal.SIGINT)
    # Instance.__enter__'s cleanup waits out INIT (the server refuses to end it before).
    # Had the second Ctrl-C aborted it, the watchdog would have ended the instance.
    finish(run, since, by={"teardown"}, exit_codes=INTERRUPTED)
    assert run.marked("running") == []


# -- layer 3: killed, the watchdog ends what the run held -------------------------------------


def test_sigkill_during_a_test(chaos):
    run = chaos("fast")
    run.start("hold")
    run.wait_for("a running test", lambda: run.marked("running"))
    since = run.signal(signal.SIGKILL)
    finish(run, since, by={"watchdog"}, exit_codes=KILLED)


def test_os_exit_inside_a_test(chaos):
    run = chaos("fast")
    run.start("exit")
    run.wait_exit(60)
    assert run.exited_at is not None and run.marked("running")
    finish(run, run.exited_at, by={"watchdog"}, exit_codes=(3,))


def test_sigkill_during_the_ready_wait(chaos):
    run = chaos("slow")
    run.start("wait")
    wait_in_init(run)
    since = run.signal(signal.SIGKILL)
    seconds = finish(run, since, by={"watchdog"}, exit_codes=KILLED)
    assert seconds > 0.5  # it had to wait for INIT to end: the kill came well before


def test_github_actions_cancel(chaos):
    """The runner's cancel, scaled down 5x: SIGINT to the step's process, SIGTERM 7.5 s
    later, SIGKILL 2.5 s after that; the step runs ``exec pytest`` so that pytest *is*
    that process. The SIGINT lands in the READY wait, so teardown is still waiting out
    INIT when SIGTERM (ignored) and SIGKILL come: the watchdog finishes the job."""
    run = chaos("slow")
    run.start("wait", via_bash_exec=True)
    wait_in_init(run)
    assert Path(f"/proc/{run.pid}/exe").resolve() == Path(sys.executable).resolve()
    since = run.signal(signal.SIGINT, group=False)
    for delay, signum in ((1.5, signal.SIGTERM), (2.0, signal.SIGKILL)):
        time.sleep(max(0.0, since + delay - time.monotonic()))
        if run.process is not None and run.process.poll() is None:
            run.signal(signum, group=False)
    finish(run, since, by={"watchdog"}, exit_codes=KILLED)


# -- under xdist -----------------------------------------------------------------------------


def wait_for_both_workers(run: Run) -> list[str]:
    ids = run.wait_for("both workers in a test", lambda: len(run.marked("running")) == 2
                       and run.marked("running"))
    assert isinstance(ids, list) and len(set(ids)) == 2  # one instance per worker
    assert run.assert_token_on_no_command_line() == 5  # controller, 2 workers, 2 watchdogs
    return ids


def test_xdist_sigterm_to_the_controller(chaos):
    run = chaos("fast")
    run.start("xdist-hold", "-n", "2")
    wait_for_both_workers(run)
    since = run.signal(signal.SIGTERM, group=False)
    # The controller ends what the ledger holds before xdist shuts its workers down.
    finish(run, since, by={"controller"}, exit_codes=INTERRUPTED)


def test_xdist_ctrl_c_to_the_process_group(chaos):
    run = chaos("fast")
    run.start("xdist-hold", "-n", "2")
    wait_for_both_workers(run)
    since = run.signal(signal.SIGINT)  # a terminal sends it to the workers too
    finish(run, since, by={"controller", "teardown"}, exit_codes=INTERRUPTED)


def test_xdist_sigkill_to_the_process_group(chaos):
    run = chaos("fast")
    run.start("xdist-hold", "-n", "2")
    wait_for_both_workers(run)
    since = run.signal(signal.SIGKILL)
    finish(run, since, by={"watchdog"}, exit_codes=KILLED)


def test_xdist_crashed_worker(chaos):
    run = chaos("fast")
    run.start("xdist-crash", "-n", "2")
    crashed = run.wait_for("a worker crashing", lambda: run.marked("crashing"))
    assert isinstance(crashed, list)
    since = time.monotonic()
    seconds = run.seconds_until_ended(since, ids=crashed)
    run.properties.append(("seconds_to_end_crashed", round(seconds, 2)))
    print(f"\nchaos {run.name}: the crashed worker's instance ended {seconds:.2f} s after")
    run.wait_exit(60)
    assert run.exited_at is not None
    finish(run, run.exited_at, by={"watchdog", "teardown"},
           exit_codes=(pytest.ExitCode.TESTS_FAILED,))
    assert run.ended_by()[crashed[0]] == "watchdog"
    assert "crashed" in run.output()


# -- layer 4 alone: no watchdog, the server's keepalive ends it ------------------------------


def test_keepalive_alone_ends_a_killed_run(chaos):
    run = chaos("fast")
    run.start("hold", env={"REROBOTS_NO_WATCHDOG": "1"})
    run.wait_for("a running test", lambda: run.marked("running"))
    since = run.signal(signal.SIGKILL)
    seconds = finish(run, since, by=None, exit_codes=KILLED)
    # Nobody ended it but the server, once the pings had stopped for its 3 s window
    # (the upper bound leaves room for a loaded machine: it only has to be the window,
    # not the watchdog, that did it).
    assert 1.5 < seconds <= FAST["keepalive_timeout"] + 3.0
