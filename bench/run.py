"""Every benchmark of pytest-rerobots in one run, each beside its baseline.

::

    python bench/run.py                 # every row: about four minutes on two cores
    python bench/run.py --quick         # fewer repetitions and a 10 s long delay
    python bench/run.py --only 2,5      # some rows
    python bench/run.py --long-delay 30 --reps 7

It prints the command, the machine and one Markdown table. Per row: what is measured,
our median and its spread (min-max over n repetitions, unless the row says otherwise),
the baseline's, the ratio of the two medians, the target where there is one, and
whether it was met. It measures; it asserts nothing.

Every simulator runs in a process of its own (``python -m pytest_rerobots.sim --config
FILE``), as the real service runs elsewhere: its HTTP server and its asyncssh hosts do
not compete with the measured client for this process's GIL. Each row writes its own
catalog into a temporary directory.

Rows:

1. ``pytest --collect-only -q`` of 500 trivial tests, with the plugin and with
   ``-p no:rerobots``, interleaved: wall time and CPU time.
2. ``Instance.run("true")`` against a default paramiko ``exec_command`` and against one
   OpenSSH ``ssh`` process per command, on both host backends (asyncssh, openssh).
3. "Give me a robot" to a connected SSH session, minus the ready delay, against the loop
   a user writes around the official client ``rerobots`` 0.11 (polls every second).
4. API calls per lifecycle with a long ready delay, and how late READY was noticed.
5. Four robots from one ``Run.acquire`` against one robot (3 s ready delay).
6. A pytest session whose tests need three workspace types against one that needs one
   (3 s ready delay), with the plugin's prefetch on and off.
7. The end of a ``with Run(...)`` block holding eight instances against one, on loopback
   and with 100 ms added to each ``POST /terminate``.
8. The simulator with 100 live instances under 50 concurrent clients: latency of
   ``GET /instance/:id`` and resident memory per instance.
9. One ``sendline`` + ``expect`` pair on a spawned ``cat`` against one
   ``Instance.run("echo x")``, on both host backends; and what ``spawn`` + ``close``
   cost together.
10. A CI job under ``CI=true``: an "install" as long as the robot's start (ready delay
    10 s, a 10 s sleep), then a one-test suite; with ``pytest --rerobots-rent-ahead``
    before the install against without it.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import importlib.metadata
import io
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paramiko
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from rerobots.api import APIClient

from pytest_rerobots import RerobotsClient, Run, acquire
from pytest_rerobots.sim.hosts import SSHD
from pytest_rerobots.sim.launch import SimProcess as LaunchedSim
from pytest_rerobots.sim.launch import start_process

KOBUKI = "basic_kobuki"

# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One line of the table; the cells are already formatted."""

    key: str
    what: str
    ours: str
    baseline: str
    ratio: float | None
    n: str
    target: str = "-"
    met: bool | None = None


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs``, nearest rank."""
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


#: From this many samples on, a cell's spread is the interquartile range: min-max of
#: hundreds of round trips says more about the scheduler than about the code.
IQR_FROM = 20


def cell(xs: Sequence[float], unit: str, scale: float = 1.0, digits: int = 1) -> str:
    """``median (min-max) unit`` of ``xs`` times ``scale``; ``(IQR a-b)`` for many samples."""
    if not xs:
        return "-"
    med = median(xs) * scale
    if len(xs) == 1:
        return f"{med:.{digits}f} {unit}"
    if len(xs) >= IQR_FROM:
        lo, hi, label = quantile(xs, 0.25) * scale, quantile(xs, 0.75) * scale, "IQR "
    else:
        lo, hi, label = min(xs) * scale, max(xs) * scale, ""
    return f"{med:.{digits}f} ({label}{lo:.{digits}f}-{hi:.{digits}f}) {unit}"


def ratio(ours: Sequence[float], base: Sequence[float]) -> float | None:
    b = median(base) if base else 0.0
    return median(ours) / b if b else None


def table(rows: Sequence[Row]) -> str:
    lines = ["| # | measured | ours: median (spread) | baseline: median (spread) | ratio "
             "| n | target | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rat = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.key} | {r.what} | {r.ours} | {r.baseline} | {rat} | {r.n} "
                     f"| {r.target} | {met} |")
    return "\n".join(lines)


def note(message: str) -> None:
    """Progress, on stderr: stdout is the report."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


class SimProcess:
    """``python -m pytest_rerobots.sim`` in a process of its own; a context manager.

    Started by :func:`pytest_rerobots.sim.launch.start_process`: ``url`` and ``token`` come
    from the two lines it prints once it serves; ``rss_kib()`` reads its resident set from
    ``/proc``. It is stopped with SIGTERM (it ends its hosts, sshd included), and killed by
    its id if it outlives ten seconds.
    """

    def __init__(self, config: Path | None = None, backend: str = "asyncssh") -> None:
        self.args = ["--ssh-backend", backend]
        if config is not None:
            self.args += ["--config", str(config)]
        self.process: LaunchedSim | None = None
        self.url = self.token = ""
        self._stderr = tempfile.TemporaryFile(mode="w+")

    def __enter__(self) -> SimProcess:
        try:
            self.process = start_process(*self.args, env=clean_env(), stderr=self._stderr)
        except RuntimeError as exc:
            message = f"{exc}: {self.errors()}"
            self._stderr.close()
            raise RuntimeError(message) from exc
        self.url, self.token = self.process.url, self.process.token
        return self

    def errors(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-2000:]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def cpu_seconds(self) -> float:
        """User + system time of the simulator so far (its threads included)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        process.stop()
        self._stderr.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Where the child processes cache their bytecode (set by main()).
PYCACHE: str | None = None


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any REROBOTS_* setting, plus ``extra``.

    Children cache their bytecode under :data:`PYCACHE`, whatever PYTHONDONTWRITEBYTECODE
    says: an editable checkout has no ``.pyc`` files of its own, and without a cache
    every pytest run would compile the plugin again, which an installed package never
    does. The prefix keeps the checkout clean."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REROBOTS_") and k != "PYTHONDONTWRITEBYTECODE"}
    if PYCACHE is not None:
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
    env.update(extra)
    return env


def write_catalog(directory: Path, text: str) -> Path:
    path = directory / "catalog.toml"
    path.write_text(text)
    return path


def deployments_toml(wtype: str, count: int) -> str:
    return f"[types.{wtype}]\n" + "".join(
        f'\n[[deployments]]\ntype = "{wtype}"\nregion = "bench"\n' for _ in range(count))


def client_key() -> tuple[paramiko.PKey, str, str]:
    """An ed25519 login key: paramiko's, its public line and its OpenSSH private text
    (the ``ssh`` baseline needs it in a file)."""
    text = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode("ascii")
    pkey = paramiko.Ed25519Key(file_obj=io.StringIO(text))
    return pkey, f"{pkey.get_name()} {pkey.get_base64()} bench", text


def wait_free(api: RerobotsClient, wtype: str, timeout: float = 30.0) -> None:
    """Until no deployment of ``wtype`` holds an instance (TERMINATING still does)."""
    ids = api.deployments(wtype)["workspace_deployments"]
    end = time.monotonic() + timeout
    while any(api.queue_length(d) for d in ids):
        if time.monotonic() > end:
            raise RuntimeError(f"{wtype}: deployments still busy after {timeout:g} s")
        time.sleep(0.02)


def timed(fn: Callable[[], object]) -> float:
    begun = time.perf_counter()
    fn()
    return time.perf_counter() - begun


# --------------------------------------------------------------------------- 1. collection


#: Row 1b's target (issue 26): the plugin's CPU time over the run without it.
COLLECTION_TARGET = 1.03


def row_collection(reps: int) -> list[Row]:
    """``pytest --collect-only -q`` of 500 trivial tests, with and without the plugin:
    wall time, and the CPU time (user + system) of the pytest process, which other work
    on the machine disturbs less; the target is the CPU time's (1b), over at least 40
    interleaved pairs."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pytest.ini").write_text("[pytest]\n")
        for f in range(10):
            body = "".join(f"def test_{k}():\n    pass\n\n\n" for k in range(50))
            (root / f"test_trivial_{f}.py").write_text(body)
        env = clean_env()

        def once(extra: list[str]) -> tuple[float, float]:
            # The children's rusage grows by exactly this child's: runs are one at a time.
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            begun = time.perf_counter()
            done = subprocess.run(cmd + extra, cwd=root, env=env, capture_output=True,
                                  text=True, check=False)
            spent = time.perf_counter() - begun
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if "500 tests collected" not in done.stdout:
                raise RuntimeError(f"collection failed: {done.stdout[-500:]}{done.stderr}")
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            return spent, cpu

        without = ["-p", "no:rerobots"]
        once([])  # warm up: bytecode of the tests, page cache of both plugin sets
        once(without)
        ours: list[tuple[float, float]] = []
        base: list[tuple[float, float]] = []
        for k in range(reps):
            pair = [(ours, []), (base, without)]
            for sink, extra in pair if k % 2 == 0 else reversed(pair):
                sink.append(once(extra))
    rows = []
    for key, what, index in (("1", "wall time", 0), ("1b", "CPU time (user + system)", 1)):
        mine, theirs = [x[index] for x in ours], [x[index] for x in base]
        r = ratio(mine, theirs)
        # Each pair ran back to back: their difference cancels most of the drift that
        # other work on the machine puts into both medians.
        paired = median([a - b for a, b in zip(mine, theirs, strict=True)]) * 1e3
        # The target is the CPU time's: the wall time is shown beside it, as other work
        # on the machine moves it more than the plugin does.
        cpu = key == "1b"
        rows.append(Row(key, f"`pytest --collect-only -q`, 500 trivial tests, plugin vs "
                        f"`-p no:rerobots` (interleaved), {what}; median paired difference "
                        f"{paired:+.0f} ms", cell(mine, "ms", 1e3, 0),
                        cell(theirs, "ms", 1e3, 0), r, str(reps),
                        f"ratio <= {COLLECTION_TARGET}" if cpu else "-",
                        (r is not None and r <= COLLECTION_TARGET) if cpu else None))
    return rows


# --------------------------------------------------------------------------- 2. round trip


def _paramiko_default(host: str, port: int, hostkey: str, pkey: paramiko.PKey
                      ) -> paramiko.SSHClient:
    """An ``SSHClient`` with paramiko's defaults (its own socket: Nagle on)."""
    keytype, blob = hostkey.split()[:2]
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[{host}]:{port}", keytype,
                               paramiko.PKey.from_type_string(keytype, base64.b64decode(blob)))
    client.connect(host, port, username="root", pkey=pkey, look_for_keys=False,
                   allow_agent=False)
    return client


def _paramiko_exec(client: paramiko.SSHClient) -> None:
    _stdin, stdout, _stderr = client.exec_command("true")
    stdout.read()
    stdout.channel.recv_exit_status()


def _ssh_argv(tmp: Path, host: str, port: int, hostkeys: list[str], private: str) -> list[str]:
    """One OpenSSH client per command: the instance's key, a known_hosts file, batch mode."""
    key = tmp / "id_ed25519"
    key.write_text(private)
    key.chmod(0o600)
    known = tmp / "known_hosts"
    known.write_text("".join(f"[{host}]:{port} {' '.join(k.split()[:2])}\n" for k in hostkeys))
    return ["ssh", "-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "LogLevel=ERROR", "-p", str(port), f"root@{host}", "true"]


def row_round_trip(backend: str, n: int, n_proc: int) -> list[Row]:
    """``Instance.run("true")`` beside paramiko's defaults and beside ``ssh`` per command;
    the three are interleaved, one ``ssh`` every few of the others."""
    first, second = ("2a", "2b") if backend == "asyncssh" else ("2c", "2d")
    if backend == "openssh" and not os.access(SSHD, os.X_OK):
        return [Row(first, f"round trip, {backend} host", "skipped: no sshd", "-", None, "0")]
    pkey, public, private = client_key()
    with tempfile.TemporaryDirectory() as tmp, SimProcess(backend=backend) as sim, \
            RerobotsClient(sim.token, sim.url, ignore_env=True) as api, \
            acquire(api, KOBUKI, pkey=pkey, public_key=public, fast_polling=True) as robot:
        assert robot.host is not None and robot.port is not None
        plain = _paramiko_default(robot.host, robot.port, robot.hostkeys[0], pkey)
        argv = _ssh_argv(Path(tmp), robot.host, robot.port, robot.hostkeys, private)

        def one_ssh() -> None:
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)

        try:
            for fn in (lambda: robot.run("true", check=True), lambda: _paramiko_exec(plain),
                       one_ssh):
                fn()  # warm up: the first channel pays for lazy setup on both ends
            ours: list[float] = []
            para: list[float] = []
            proc: list[float] = []
            every = max(1, n // max(1, n_proc))
            for i in range(n):
                ours.append(timed(lambda: robot.run("true", check=True)))
                para.append(timed(lambda: _paramiko_exec(plain)))
                if i % every == 0 and len(proc) < n_proc:
                    proc.append(timed(one_ssh))
        finally:
            plain.close()
    mine = cell(ours, "ms", 1e3, 2)
    return [
        Row(first, f"`Instance.run(\"true\")` vs paramiko `exec_command` (defaults), "
            f"{backend} host", mine, cell(para, "ms", 1e3, 2), ratio(ours, para), str(n)),
        Row(second, f"`Instance.run(\"true\")` vs one `ssh` process per command "
            f"(BatchMode, known_hosts), {backend} host", mine, cell(proc, "ms", 1e3, 1),
            ratio(ours, proc), f"{n} / {len(proc)}"),
    ]


# --------------------------------------------------------------------------- 3, 4. lifecycle


class CallCounter:
    """Counts HTTP requests per thread (the official client calls ``requests.get`` etc.,
    which all end in ``Session.request``)."""

    def __init__(self) -> None:
        self.by_thread: dict[int, int] = {}
        self._original = requests.sessions.Session.request
        counter = self

        def counted(session: requests.Session, *args: Any, **kwargs: Any) -> Any:
            ident = threading.get_ident()
            counter.by_thread[ident] = counter.by_thread.get(ident, 0) + 1
            return counter._original(session, *args, **kwargs)

        requests.sessions.Session.request = counted  # type: ignore[method-assign]

    def calls(self) -> int:
        return self.by_thread.get(threading.get_ident(), 0)

    def restore(self) -> None:
        requests.sessions.Session.request = self._original  # type: ignore[method-assign]


def ours_lifecycle(sim: SimProcess, target: str, fast: bool) -> dict[str, float]:
    """One lifecycle with ``RerobotsClient.acquire``: seconds to SSH, calls, READY seen.
    ``fast`` polls every 50 ms, as the fixtures do under ``--rerobots-sim``."""
    with RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
        begun = time.perf_counter()
        with acquire(api, target, fast_polling=fast) as robot:
            connected = time.perf_counter()
            robot.run("true")
            ready_seen = robot.timings.ready_at or 0.0
        return {"to_ssh": connected - begun, "calls": api.calls, "ready_seen": ready_seen}


def naive_lifecycle(sim: SimProcess, target: str, counter: CallCounter) -> dict[str, float]:
    """The fixture a user writes around the official client: request, poll every second,
    open the firewall, connect with paramiko's defaults, run, terminate."""
    pkey, public, _private = client_key()
    api = APIClient(api_token=sim.token, base_uri=sim.url)
    before = counter.calls()
    begun = time.perf_counter()
    ident = api.request_instance(target, sshkey=public)["id"]
    while True:
        info = api.get_instance_info(ident)
        if info["status"] == "READY":
            break
        time.sleep(1.0)
    ready_seen = time.time()
    api.add_firewall_rule(ident, "ACCEPT")
    client = _paramiko_default(info["fwd"]["ipv4"], info["fwd"]["port"], info["hostkeys"][0],
                               pkey)
    connected = time.perf_counter()
    client.exec_command("true")[1].channel.recv_exit_status()
    client.close()
    while True:
        try:
            api.terminate_instance(ident)
            break
        except Exception:  # the naive loop retries anything
            time.sleep(1.0)
    return {"to_ssh": connected - begun, "calls": counter.calls() - before,
            "ready_seen": ready_seen}


# The official client reads a 404 right after POST /new as "no such instance": its
# simulators answer at once (docs/simulator-catalog.md, the example for rerobots 0.11).
LIFECYCLE_CATALOG = """\
[timings]
ready_delay = {delay}
terminate_delay = 0.05

[faults]
not_found_window = 0
"""


def row_lifecycle(rounds: int, delay: float, counter: CallCounter) -> list[Row]:
    """To a connected SSH session minus the ready delay: ours (both polling paces) beside
    the naive loop, one after the other on two deployments of one simulator."""
    with tempfile.TemporaryDirectory() as tmp:
        config = write_catalog(Path(tmp), LIFECYCLE_CATALOG.format(delay=delay))
        with SimProcess(config) as sim, RerobotsClient(sim.token, sim.url,
                                                       ignore_env=True) as api:
            kobukis = api.deployments(KOBUKI)["workspace_deployments"]
            fast: list[float] = []
            frugal: list[float] = []
            naive: list[float] = []
            for _ in range(rounds):
                fast.append(ours_lifecycle(sim, kobukis[0], fast=True)["to_ssh"] - delay)
                wait_free(api, KOBUKI)
                frugal.append(ours_lifecycle(sim, kobukis[0], fast=False)["to_ssh"] - delay)
                wait_free(api, KOBUKI)
                naive.append(naive_lifecycle(sim, kobukis[1], counter)["to_ssh"] - delay)
                wait_free(api, KOBUKI)
    base = cell(naive, "ms", 1e3, 0)
    r = ratio(fast, naive)
    return [
        Row("3a", f"robot to connected SSH minus ready delay ({delay:g} s), 50 ms polls "
            "(`--rerobots-sim`) vs official-client loop polling every 1 s",
            cell(fast, "ms", 1e3, 0), base, r, str(rounds), "ours < 150 ms",
            median(fast) < 0.150),
        Row("3b", "the same, real-API polls (0.25 s, 1 s, then every 2 s) vs that loop",
            cell(frugal, "ms", 1e3, 0), base, ratio(frugal, naive), str(rounds)),
    ]


def row_calls(delay: float, counter: CallCounter) -> list[Row]:
    """API calls per lifecycle and READY noticed late, ours and naive at the same time."""
    with tempfile.TemporaryDirectory() as tmp:
        config = write_catalog(Path(tmp), LIFECYCLE_CATALOG.format(delay=delay))
        with SimProcess(config) as sim:
            with RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
                kobukis = api.deployments(KOBUKI)["workspace_deployments"]
            results: dict[str, dict[str, float]] = {}
            started = time.time()
            threads = [
                threading.Thread(target=lambda: results.__setitem__(
                    "ours", ours_lifecycle(sim, kobukis[0], fast=False))),
                threading.Thread(target=lambda: results.__setitem__(
                    "naive", naive_lifecycle(sim, kobukis[1], counter))),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    if set(results) != {"ours", "naive"}:
        raise RuntimeError("a lifecycle of row 4 failed (see its traceback above)")
    ours, naive = results["ours"], results["naive"]
    late = {name: r["ready_seen"] - started - delay for name, r in results.items()}
    return [
        Row("4a", f"API calls per lifecycle, ready delay {delay:g} s, real-API polls vs "
            "the 1 s loop", f"{ours['calls']:.0f} calls", f"{naive['calls']:.0f} calls",
            ours["calls"] / naive["calls"], "1", "ours <= 20 calls", ours["calls"] <= 20),
        Row("4b", f"READY noticed after it happened, ready delay {delay:g} s",
            f"{late['ours']:.2f} s", f"{late['naive']:.2f} s",
            late["ours"] / late["naive"] if late["naive"] > 0 else None, "1",
            "ours <= 2 s", late["ours"] <= 2.0),
    ]


# --------------------------------------------------------------------------- 5, 7. several


ARMS = "bench_arm"


def _run(sim: SimProcess) -> Run:
    """A ``Run`` against ``sim`` as the plugin makes one for an embedded simulator: no
    ledger, no watchdog, 50 ms polls; signals left alone."""
    return Run(sim.url, sim.token, ignore_env=True, ledger=None, watchdog=False,
               signals=False, fast_polling=True)


def row_four(reps: int, delay: float = 3.0) -> list[Row]:
    """``run.acquire(a, b, c, d)`` beside ``run.acquire(a)``, alternating."""
    text = deployments_toml(ARMS, 5) + (f"\n[timings]\nready_delay = {delay}\n"
                                         "terminate_delay = 0.05\n")
    four: list[float] = []
    one: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        with SimProcess(write_catalog(Path(tmp), text)) as sim, _run(sim) as run:
            for k in range(reps):
                pair = [(four, 4), (one, 1)]
                for sink, count in pair if k % 2 == 0 else reversed(pair):
                    sink.append(timed(lambda c=count: run.acquire(*[ARMS] * c)))
                    run.release_all()
                    wait_free(run.client, ARMS)
    r = ratio(four, one)
    return [Row("5", f"four robots from one `run.acquire(a, b, c, d)` vs one robot, to "
                f"READY and SSH, ready delay {delay:g} s", cell(four, "s", digits=2),
                cell(one, "s", digits=2), r, str(reps), "ratio <= 1.5",
                r is not None and r <= 1.5)]


def row_teardown(reps: int, latency: float = 0.0) -> list[Row]:
    """From the end of a ``with Run(...)`` block's work to its exit: eight instances
    beside one. ``latency`` is added to every ``POST /terminate``, as a distant API adds
    its round trip."""
    text = deployments_toml(ARMS, 8) + "\n[timings]\nready_delay = 0.2\nterminate_delay = 0.05\n"
    if latency:
        text += f"\n[faults.endpoints.terminate]\nlatency = {latency}\n"
    eight: list[float] = []
    one: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, \
            SimProcess(write_catalog(Path(tmp), text)) as sim:
        with RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
            for k in range(reps):
                pair = [(eight, 8), (one, 1)]
                for sink, count in pair if k % 2 == 0 else reversed(pair):
                    with _run(sim) as run:
                        robots = run.acquire(*[ARMS] * count) if count > 1 \
                            else [run.acquire(ARMS)]
                        for robot in robots:
                            robot.run("true", check=True)
                        work_done = time.perf_counter()
                    sink.append(time.perf_counter() - work_done)
                    wait_free(api, ARMS)
    r = ratio(eight, one)
    if latency:
        key, what = "7b", (f"the same, {latency * 1e3:.0f} ms added to each "
                           "`POST /terminate` (a distant API)")
    else:
        key, what = "7", ("teardown: end of a `with Run(...)` block's work to its exit, "
                          "eight instances vs one (loopback)")
    return [Row(key, what, cell(eight, "ms", 1e3, 0), cell(one, "ms", 1e3, 0), r, str(reps),
                "about 1x (<= 1.25)", r is not None and r <= 1.25)]


# --------------------------------------------------------------------------- 6. sessions


SESSION_TYPES = ("bench_a", "bench_b", "bench_c")


def row_sessions(reps: int, delay: float = 3.0) -> list[Row]:
    """Real pytest runs against a simulator process: three tests on three types beside
    three tests on one type; and three types with ``--rerobots-prefetch=off``."""
    text = "".join(deployments_toml(t, 1) for t in SESSION_TYPES) + (
        f"\n[timings]\nready_delay = {delay}\nterminate_delay = 0.05\n")
    three_types = "import pytest\n" + "".join(
        f"\n\n@pytest.mark.rerobots({t!r})\ndef test_{t}(rerobots_instance):\n"
        f"    assert rerobots_instance.run('true').exit_status == 0\n" for t in SESSION_TYPES)
    one_type = "".join(
        f"\n\ndef test_{t}(rerobots_instance):\n"
        f"    assert rerobots_instance.run('true').exit_status == 0\n" for t in SESSION_TYPES)
    variants: dict[str, tuple[str, list[str]]] = {
        "three": (three_types, []),
        "one": (one_type, [f"--rerobots-wtype={SESSION_TYPES[0]}"]),
        "three, prefetch off": (three_types, ["--rerobots-prefetch=off"]),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with SimProcess(write_catalog(root, text)) as sim, \
                RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
            env = clean_env(REROBOTS_API_URL=sim.url, REROBOTS_API_TOKEN=sim.token)
            for name, (source, _) in variants.items():
                suite = root / name.replace(",", "").replace(" ", "_")
                suite.mkdir()
                (suite / "pytest.ini").write_text("[pytest]\n")
                (suite / "test_robots.py").write_text(source)
            for k in range(reps):
                names = list(variants)
                for name in names[k % len(names):] + names[:k % len(names)]:
                    for t in SESSION_TYPES:
                        wait_free(api, t)
                    suite = root / name.replace(",", "").replace(" ", "_")
                    argv = [sys.executable, "-m", "pytest", "-q",
                            *variants[name][1]]
                    begun = time.perf_counter()
                    done = subprocess.run(argv, cwd=suite, env=env, capture_output=True,
                                          text=True, check=False)
                    times[name].append(time.perf_counter() - begun)
                    if done.returncode != 0 or "3 passed" not in done.stdout:
                        raise RuntimeError(f"session {name!r} failed:\n{done.stdout[-3000:]}"
                                           f"{done.stderr[-2000:]}")
    r = ratio(times["three"], times["one"])
    one = cell(times["one"], "s", digits=2)
    return [
        Row("6a", f"pytest session, 3 tests on 3 types vs 3 tests on 1 type (wall time, "
            f"ready delay {delay:g} s, real-API polls)", cell(times["three"], "s", digits=2),
            one, r, str(reps), "ratio <= 1.5", r is not None and r <= 1.5),
        Row("6b", "the same with `--rerobots-prefetch=off` (contrast)",
            cell(times["three, prefetch off"], "s", digits=2), one,
            ratio(times["three, prefetch off"], times["one"]), str(reps)),
    ]


# --------------------------------------------------------------------------- 10. rent ahead


AHEAD = "bench_ahead"


def row_rent_ahead(reps: int, delay: float = 10.0) -> list[Row]:
    """A job: (rent ahead,) "install" for ``delay`` s, run a one-test suite; the robot
    takes ``delay`` s to become READY. Under CI=true, as in a CI job."""
    text = deployments_toml(AHEAD, 1) + (f"\n[timings]\nready_delay = {delay}\n"
                                         "terminate_delay = 0.05\n")
    suite = ("def test_robot(rerobots_instance):\n"
             "    assert rerobots_instance.run('true').exit_status == 0\n")
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with SimProcess(write_catalog(root, text)) as sim, \
                RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
            env = clean_env(REROBOTS_API_URL=sim.url, REROBOTS_API_TOKEN=sim.token, CI="true")
            for k in range(reps):
                for ahead in (True, False) if k % 2 == 0 else (False, True):
                    wait_free(api, AHEAD)
                    job = root / f"job-{k}-{int(ahead)}"
                    job.mkdir()
                    (job / "pytest.ini").write_text("[pytest]\n")
                    (job / "test_robot.py").write_text(suite)
                    pytest_cmd = [sys.executable, "-m", "pytest"]
                    begun = time.perf_counter()
                    if ahead:
                        subprocess.run([*pytest_cmd, "--rerobots-rent-ahead", AHEAD], cwd=job,
                                       env=env, capture_output=True, check=True)
                    time.sleep(delay)  # the job installs the project's dependencies
                    done = subprocess.run([*pytest_cmd, "-q", f"--rerobots-wtype={AHEAD}"],
                                          cwd=job, env=env, capture_output=True, text=True,
                                          check=False)
                    times[ahead].append(time.perf_counter() - begun)
                    if done.returncode != 0 or "1 passed" not in done.stdout:
                        raise RuntimeError(f"job (rent ahead: {ahead}) failed:\n"
                                           f"{done.stdout[-3000:]}{done.stderr[-2000:]}")
            if sim.errors():
                note(f"row 10: simulator errors: {sim.errors()[-500:]}")
    r = ratio(times[True], times[False])
    return [Row("10", f"CI job (CI=true): a {delay:g} s install as long as the robot's start, "
                "then one test; `pytest --rerobots-rent-ahead` before the install vs without",
                cell(times[True], "s", digits=1), cell(times[False], "s", digits=1), r,
                str(reps), "ratio <= 0.65", r is not None and r <= 0.65)]


# --------------------------------------------------------------------------- 8. load


LOAD = "bench_load"


def row_load(live: int, clients: int, per_client: int) -> list[Row]:
    """``live`` READY instances, then ``clients`` threads each sending ``per_client``
    ``GET /instance/:id`` on a kept-alive connection of their own; beside one client
    alone. Memory: the simulator's VmRSS idle and with the instances up."""
    text = deployments_toml(LOAD, live) + (
        "\n[timings]\nready_delay = 0\n\n[faults]\nnot_found_window = 0\n\n"
        "[rate_limits]\ntoken_budget = 100000000\n")
    _pkey, public, _private = client_key()
    with tempfile.TemporaryDirectory() as tmp, \
            SimProcess(write_catalog(Path(tmp), text)) as sim:
        origin = urlsplit(sim.url)
        assert origin.hostname is not None and origin.port is not None
        headers = {"Authorization": f"Bearer {sim.token}", "Accept": "application/json"}
        session = requests.Session()
        session.headers.update(headers)
        session.get(f"{sim.url}/deployments").raise_for_status()  # warm up the routes
        time.sleep(0.5)
        rss_idle = sim.rss_kib()
        ids = []
        for _ in range(live):
            answer = session.post(f"{sim.url}/new/{LOAD}",
                                  json={"sshkey": public, "keepalive": False})
            answer.raise_for_status()
            ids.append(answer.json()["id"])
        end = time.monotonic() + 120
        pending = set(ids)
        while pending:
            if time.monotonic() > end:
                raise RuntimeError(f"{len(pending)} instances not READY after 120 s")
            for ident in list(pending):
                if session.get(f"{sim.url}/instance/{ident}").json()["status"] == "READY":
                    pending.discard(ident)
            time.sleep(0.05)
        session.close()
        time.sleep(0.5)
        rss_live = sim.rss_kib()

        def client(count: int, start: threading.Barrier | None, sink: list[float]) -> None:
            conn = http.client.HTTPConnection(origin.hostname, origin.port, timeout=30)
            rng = random.Random(threading.get_ident())
            try:
                if start is not None:
                    start.wait()
                for _ in range(count):
                    path = f"/instance/{rng.choice(ids)}"
                    begun = time.perf_counter()
                    conn.request("GET", path, headers=headers)
                    answer = conn.getresponse()
                    json.loads(answer.read())
                    sink.append(time.perf_counter() - begun)
                    if answer.status != 200:
                        raise RuntimeError(f"GET {path}: {answer.status}")
            finally:
                conn.close()

        alone: list[float] = []
        client(per_client * 5, None, alone)
        crowd: list[float] = []
        barrier = threading.Barrier(clients)
        threads = [threading.Thread(target=client, args=(per_client, barrier, crowd))
                   for _ in range(clients)]
        begun, sim_cpu, own_cpu = time.perf_counter(), sim.cpu_seconds(), time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - begun
        # Where the two cores went: a saturated simulator, or the clients' own threads.
        sim_cpu, own_cpu = sim.cpu_seconds() - sim_cpu, time.process_time() - own_cpu
    if len(crowd) != clients * per_client:
        raise RuntimeError("a client of row 8 failed (see its traceback above)")

    per_inst = (rss_live - rss_idle) / live
    p99_crowd, p99_alone = quantile(crowd, 0.99), quantile(alone, 0.99)
    n = f"{len(crowd)} / {len(alone)}"
    return [
        Row("8a", f"simulator, {live} live instances: `GET /instance/:id` latency, "
            f"median, {clients} concurrent clients vs 1 client", cell(crowd, "ms", 1e3),
            cell(alone, "ms", 1e3), ratio(crowd, alone), n),
        Row("8b", f"the same, p99 ({len(crowd) / wall:.0f} requests/s with {clients} "
            f"clients; CPU in {wall:.1f} s: simulator {sim_cpu:.1f} s, clients "
            f"{own_cpu:.1f} s)", f"{p99_crowd * 1e3:.1f} ms", f"{p99_alone * 1e3:.1f} ms",
            p99_crowd / p99_alone, n),
        Row("8c", f"simulator memory per live instance (VmRSS idle {rss_idle / 1024:.1f} MiB,"
            f" with {live} READY {rss_live / 1024:.1f} MiB; asyncssh hosts)",
            f"{per_inst:.0f} KiB", "-", None, "1"),
    ]


# --------------------------------------------------------------------------- main


# --------------------------------------------------------------------------- 9. expect


def row_expect(backend: str, n: int) -> list[Row]:
    """A line through a live ``cat`` (``sendline`` then ``expect`` of the echo) beside a
    ``run("echo x")`` each, interleaved on one connection; then spawn + close."""
    first, second = ("9a", "9b") if backend == "asyncssh" else ("9c", "9d")
    if backend == "openssh" and not os.access(SSHD, os.X_OK):
        return [Row(first, f"expect round trip, {backend} host", "skipped: no sshd", "-",
                    None, "0")]
    pkey, public, _ = client_key()
    with SimProcess(backend=backend) as sim, \
            RerobotsClient(sim.token, sim.url, ignore_env=True) as api, \
            acquire(api, KOBUKI, pkey=pkey, public_key=public, fast_polling=True) as robot:
        cat = robot.spawn("cat")
        robot.run("echo x", check=True)  # warm up both
        cat.sendline("warm")
        cat.expect("warm\n", timeout=10)
        pairs: list[float] = []
        runs: list[float] = []
        def pair(line: str) -> None:
            cat.sendline(line)
            cat.expect(line + "\n", timeout=10)

        for i in range(n):
            pairs.append(timed(lambda i=i: pair(f"line {i}")))
            runs.append(timed(lambda: robot.run("echo x", check=True)))
        cat.close()
        lives: list[float] = []
        for _ in range(max(5, n // 20)):
            lives.append(timed(lambda: robot.spawn("cat").close()))
    return [
        Row(first, f"`sendline` + `expect` on a spawned `cat` vs `Instance.run(\"echo x\")`, "
            f"{backend} host", cell(pairs, "ms", 1e3, 2), cell(runs, "ms", 1e3, 2),
            ratio(pairs, runs), str(n)),
        Row(second, f"`spawn(\"cat\")` + `close()` (SIGTERM to its group over a second "
            f"channel) vs `Instance.run(\"echo x\")`, {backend} host",
            cell(lives, "ms", 1e3, 1), cell(runs, "ms", 1e3, 2), ratio(lives, runs),
            f"{len(lives)} / {n}"),
    ]


ROWS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10")


def load() -> str:
    """The 1-minute load average: other work on the machine shows in the spreads."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def machine() -> str:
    try:
        ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True,
                                     check=False).stderr.split(",")[0].strip()
    except OSError:
        ssh_version = "no ssh client"
    return (f"{os.cpu_count()} CPUs ({platform.system()} {platform.machine()}), "
            f"Python {platform.python_version()}, paramiko {paramiko.__version__}, "
            f"asyncssh {importlib.metadata.version('asyncssh')}, {ssh_version}")


def command(argv: Sequence[str]) -> str:
    return shlex.join(["python", "bench/run.py", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions, and a 10 s long delay unless given")
    parser.add_argument("--only", default=",".join(ROWS),
                        help="comma-separated rows to run (default: all)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions of rows 1, 3, 5, 6, 7 and 10 (default 40, 8, 5, 3, 5, "
                             "2; quick: 5, 3, 2, 1, 2, 1)")
    parser.add_argument("-n", type=int, default=None,
                        help="round trips per client in rows 2 and 9 (default 200, quick 50)")
    parser.add_argument("--long-delay", type=float, default=None,
                        help="ready delay of row 4 in seconds (default 30, quick 10)")
    parser.add_argument("--short-delay", type=float, default=0.5,
                        help="ready delay of row 3 in seconds (default 0.5)")
    args = parser.parse_args(argv)
    quick = args.quick
    only = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = sorted(set(only) - set(ROWS))
    if unknown:
        parser.error(f"--only: no row {unknown[0]!r} (rows: {', '.join(ROWS)})")

    def reps(full: int, short: int) -> int:
        return args.reps if args.reps is not None else (short if quick else full)

    n = args.n if args.n is not None else (50 if quick else 200)
    long_delay = args.long_delay if args.long_delay is not None else (10.0 if quick else 30.0)
    counter = CallCounter()
    jobs: dict[str, Callable[[], list[Row]]] = {
        "1": lambda: row_collection(reps(40, 5)),
        "2": lambda: (row_round_trip("asyncssh", n, max(5, n // 5))
                      + row_round_trip("openssh", n, max(5, n // 5))),
        "3": lambda: row_lifecycle(reps(8, 3), args.short_delay, counter),
        "4": lambda: row_calls(long_delay, counter),
        "5": lambda: row_four(reps(5, 2)),
        "6": lambda: row_sessions(reps(3, 1)),
        "7": lambda: row_teardown(reps(5, 2)) + row_teardown(reps(5, 2), latency=0.1),
        "8": lambda: row_load(100, 50, 20 if quick else 60),
        "9": lambda: row_expect("asyncssh", n) + row_expect("openssh", n),
        "10": lambda: row_rent_ahead(reps(2, 1)),
    }
    rows: list[Row] = []
    begun = time.perf_counter()
    load_before = load()
    global PYCACHE
    pycache = tempfile.TemporaryDirectory(prefix="rerobots-bench-pyc-")
    PYCACHE = pycache.name
    try:
        for key in ROWS:
            if key not in only:
                continue
            note(f"row {key} ...")
            spent = time.perf_counter()
            rows += jobs[key]()
            note(f"row {key}: {time.perf_counter() - spent:.1f} s")
    finally:
        counter.restore()
        pycache.cleanup()
    print(f"command: `{command(sys.argv[1:] if argv is None else argv)}`")
    print(f"machine: {machine()}")
    print(f"took {time.perf_counter() - begun:.0f} s; load average (1 min) {load_before} at "
          f"the start, {load()} at the end\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
