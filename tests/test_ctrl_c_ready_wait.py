"""Ctrl-C during the READY wait (issue 22, item 4): one line at once saying what teardown
waits for and how long at most; a second Ctrl-C says so again; no wait out of INIT under
the embedded simulator (which stops with the run, its robots with it); the summary table
names the deployment and region of an instance ended before READY.

Each case runs a small suite in a pytest subprocess (in a session of its own, so that it
can be signalled as a terminal would) and reads its output as it comes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_rerobots import RerobotsClient
from pytest_rerobots.signals import SignalGuard
from pytest_rerobots.sim.launch import SimProcess, start_process

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists() or os.name != "posix",
                                reason="needs POSIX signals and /proc to find a run's processes")

SUITE = """
import pytest
pytestmark = pytest.mark.rerobots("basic_kobuki")
def test_wait(rerobots_instance):
    raise AssertionError("never: interrupted in the READY wait")
"""

#: The remote simulator's READY wait: long enough that "before READY" means "at once".
READY_DELAY = 3.0
#: The embedded simulator's: a run that waited it out would take at least this long.
LONG_READY_DELAY = 25.0


class Output:
    """A subprocess's output, line by line as it comes, with when each line came."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            for part in raw.decode(errors="replace").split("\r"):
                if part.strip():
                    with self._lock:
                        self.lines.append((time.monotonic(), part.rstrip()))

    def text(self) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern: str, timeout: float = 60.0,
                 also: Callable[[], object] | None = None) -> tuple[float, str]:
        """The first line matching ``pattern`` and when it came; ``also`` is called at
        once when it is found (to look at the world at that moment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [(t, line) for t, line in self.lines if re.search(pattern, line)]
            if found:
                if also is not None:
                    also()
                return found[0]
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.01)
        pytest.fail(f"no line matching {pattern!r}:\n{self.text()}")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries ``I22C_RUN=tag`` (a run's and its children)."""
    needle = f"I22C_RUN={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


class Suite:
    """A pytest subprocess running ``SUITE`` in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tag = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: Output | None = None

    def start(self, *args: str, env: dict[str, str] | None = None) -> Output:
        (self.directory / "pytest.ini").write_text("[pytest]\n")
        (self.directory / "test_suite.py").write_text(textwrap.dedent(SUITE))
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("PYTEST_", "REROBOTS_")) and k != "CI"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
             *args],
            cwd=self.directory, env={**base, "I22C_RUN": self.tag, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.output = Output(self.proc)
        return self.output

    def interrupt(self) -> float:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        assert self.proc is not None and self.output is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not exit within {timeout} s:\n{self.output.text()}")
        self.output.join(5)
        return code

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in tagged_processes(self.tag):
            os.kill(pid, signal.SIGKILL)
        if self.output is not None:
            self.output.join(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[Suite]:
    run = Suite(tmp_path / "run")
    run.directory.mkdir()
    yield run
    run.cleanup()


@pytest.fixture(scope="module")
def slow_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    """A simulator in a process of its own (the "remote API"), READY 3 s after POST /new."""
    config = tmp_path_factory.mktemp("slow-sim") / "slow.toml"
    config.write_text(f"[timings]\nready_delay = {READY_DELAY}\nterminate_delay = 0.1\n")
    try:
        launched = start_process("--config", str(config), start_new_session=True)
    except RuntimeError as exc:
        pytest.fail(f"the simulator did not start: {exc}")
    with launched:
        yield launched


def table_row(text: str, ident: str) -> list[str]:
    """The summary table's cells for instance ``ident``."""
    for line in text.splitlines():
        if line.startswith(ident):
            return line.split()
    pytest.fail(f"no row for {ident} in the summary table:\n{text}")


@pytest.mark.parametrize("scope", ["session", "function"])
def test_ctrl_c_in_the_ready_wait_says_at_once_what_it_waits_for(
        suite: Suite, slow_sim: SimProcess, tmp_path: Path, scope: str):
    api = RerobotsClient(slow_sim.token, slow_sim.url, ignore_env=True, timeout=5.0)
    out = suite.start(f"--rerobots-scope={scope}", env={
        "REROBOTS_API_URL": slow_sim.url, "REROBOTS_API_TOKEN": slow_sim.token,
        "REROBOTS_LEDGER": str(tmp_path / "ledger.jsonl")})
    # The progress line of the READY wait names the instance (after 1 s of waiting).
    _, progress = out.wait_for(r"rerobots: basic_kobuki \S+ INIT")
    ident = progress.split()[2]
    suite.interrupt()

    statuses: list[str] = []

    def status_now() -> None:
        statuses.append(api.instance(ident)["status"])

    _, line = out.wait_for(r"rerobots: SIGINT: waiting for", also=status_now)
    # At once: the instance had not even become READY when the line was there to read.
    assert statuses == ["INIT"], out.text()
    assert re.search(rf"waiting for basic_kobuki {ident[:8]}\S* to leave INIT, at most "
                     r"1[12]\d s, then terminating it", line), line
    suite.interrupt()  # an impatient second Ctrl-C: ignored, and says how long
    _, again = out.wait_for(r"SIGINT ignored while instances are being terminated")
    assert re.search(rf"\(waiting for basic_kobuki {ident[:8]}\S* to leave INIT, at most "
                     r"\d+ s more; a signal after \d+ s more stops the wait\)", again), again
    assert suite.wait(60) == pytest.ExitCode.INTERRUPTED
    # Ended, and the table names where it was, though it never became READY.
    row = table_row(out.text(), ident)
    assert row[2:4] == [api.instance(ident)["deployment"][:8], "us:cali"], row
    assert row[-1] == "terminated"
    assert api.instance(ident)["status"] in ("TERMINATING", "TERMINATED")
    api.close()


def test_ctrl_c_under_the_embedded_simulator_does_not_wait_out_init(
        suite: Suite, tmp_path: Path):
    config = tmp_path / "slow.toml"
    config.write_text(f"[timings]\nready_delay = {LONG_READY_DELAY}\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    out = suite.start("--rerobots-sim", f"--rerobots-sim-config={config}",
                      env={"TMPDIR": str(temp)})
    _, progress = out.wait_for(r"rerobots: basic_kobuki \S+ INIT")
    ident = progress.split()[2]
    assert list(temp.glob("rerobots-sim-*")), "the simulator's robots live under TMPDIR"
    since = suite.interrupt()
    assert suite.wait(60) == pytest.ExitCode.INTERRUPTED
    took = time.monotonic() - since
    text = out.text()
    # Waiting out INIT would have taken the rest of the READY delay.
    assert took < LONG_READY_DELAY - 5, f"{took:.1f} s after Ctrl-C:\n{text}"
    assert "to leave INIT" not in text  # nothing to wait for, nothing to announce
    row = table_row(text, ident)
    assert row[2:4] == ["b34d1ee4", "us:cali"], row  # the built-in catalog's first Kobuki
    assert row[-1] == "terminated"
    # The simulator and its robots ended with the run: no directory, no process left.
    assert list(temp.glob("rerobots-sim-*")) == []
    deadline = time.monotonic() + 10
    while (left := tagged_processes(suite.tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def test_waiting_to_end_says_nothing_without_an_interrupted_guard(
        monkeypatch: pytest.MonkeyPatch):
    from pytest_rerobots.signals import waiting_to_end

    said: list[str] = []
    guard = SignalGuard(write=said.append)
    monkeypatch.setattr(SignalGuard, "active", None)
    waiting_to_end("basic_kobuki 1234 to leave INIT", 120)()  # no guard (a watchdog, a sweep)
    monkeypatch.setattr(SignalGuard, "active", guard)
    waiting_to_end("basic_kobuki 1234 to leave INIT", 120)()  # installed, not interrupted
    assert said == []
    guard.first_at, guard.first_name = time.monotonic(), "SIGTERM"
    over = waiting_to_end("basic_kobuki 1234 to leave INIT", 120)
    assert said == ["\nrerobots: SIGTERM: waiting for basic_kobuki 1234 to leave INIT, at "
                    "most 120 s, then terminating it (the API does not end an instance "
                    "that is still starting)\n"]
    assert "(waiting for basic_kobuki 1234 to leave INIT, at most 120 s more; a signal " \
           "after 30 s more stops the wait)" in guard._ignored("SIGINT", guard.first_at)
    over()  # the wait is over: a repeat says what it always said
    assert guard._ignored("SIGINT", guard.first_at) == \
        "\nrerobots: SIGINT ignored while instances are being terminated\n"
