"""Pseudo-terminals on simulated hosts: ``spawn(..., pty=True)`` and a raw ``pty-req``.

Against real hosts of both backends: the asyncssh backend sandboxed and unsandboxed, the
OpenSSH backend as it runs here (sandboxed when the simulator is root). A robot's sshd
grants a pty; so must the simulator, with the command inside the robot's sandbox.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import time
from collections.abc import Iterator

import paramiko
import pytest

from pytest_rerobots import _paramiko_compat, ssh
from pytest_rerobots.sim.hosts import SSHD, HostInfo, HostManager
from pytest_rerobots.sim.hosts import sandbox as sandbox_module
from pytest_rerobots.sim.hosts._asyncssh import asyncssh

# (backend, sandbox mode)
SETUPS = [("asyncssh", "require"), ("asyncssh", "off"), ("openssh", "auto")]


@pytest.fixture(params=SETUPS, ids=["asyncssh-sandboxed", "asyncssh-unsandboxed", "openssh"])
def hosts(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[HostManager]:
    backend, mode = request.param
    if backend == "openssh" and not os.access(SSHD, os.X_OK):
        if os.environ.get("REROBOTS_REQUIRE_OPENSSH") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_OPENSSH=1 but {SSHD} is missing")
        pytest.skip(f"{SSHD} is missing")
    if mode == "require":
        problem = sandbox_module.SandboxSetup.probe()
        if isinstance(problem, str):
            if os.environ.get("REROBOTS_REQUIRE_SANDBOX") == "1":
                pytest.fail(f"REROBOTS_REQUIRE_SANDBOX=1 but this machine cannot sandbox: "
                            f"{problem}")
            pytest.skip(f"this machine cannot sandbox: {problem}")
    manager = HostManager(tmp_path / "hosts", backend, mode)
    try:
        yield manager
    finally:
        manager.close()
    manager.check()


@pytest.fixture(scope="module")
def client_key() -> tuple[paramiko.PKey, str]:
    return ssh.generate_client_key()


@pytest.fixture
def info(hosts: HostManager, client_key: tuple[paramiko.PKey, str]) -> HostInfo:
    return hosts.start_host("i-1", authorized_keys=[client_key[1]],
                            firewall=lambda _src: "ACCEPT", files={}, commands=[])


def _client(hosts: HostManager, info: HostInfo, pkey: paramiko.PKey) -> paramiko.SSHClient:
    return ssh.connect("127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=pkey,
                       username=hosts.login_user, timeout=5.0)


@pytest.fixture
def conn(hosts: HostManager, info: HostInfo,
         client_key: tuple[paramiko.PKey, str]) -> Iterator[ssh.Connection]:
    with ssh.Connection(_client(hosts, info, client_key[0])) as connection:
        yield connection


def _gone(conn: ssh.Connection, pattern: str) -> bool:
    """No process on the host matches ``pattern`` (within 5 s: a killed one is reaped)."""
    deadline = time.monotonic() + 5
    while conn.run(f"pgrep -f {pattern!r}").exit_status == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _read_all(chan: paramiko.Channel, timeout: float = 10.0) -> bytes:
    chan.settimeout(timeout)
    chunks = []
    while data := chan.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


# -- spawn(..., pty=True) ----------------------------------------------------------------


def test_the_command_has_a_terminal(conn: ssh.Connection) -> None:
    proc = conn.spawn("tty; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-terminals; "
                      "echo TERM=$TERM; echo out; echo err >&2; exit 7", pty=True)
    proc.expect(r"/dev/pts/\d+\r\n", timeout=10)
    proc.expect("all-terminals\r\n", timeout=10)
    proc.expect("TERM=dumb\r\n", timeout=10)  # live.Process asks for a "dumb" terminal
    # One stream, and the terminal turns "\n" into "\r\n".
    proc.expect("out\r\nerr\r\n", timeout=10)
    assert proc.wait(10) == 7


def test_an_interactive_shell_and_a_program_that_asks_its_terminal(
    conn: ssh.Connection,
) -> None:
    proc = conn.spawn("sh -i", pty=True)
    proc.sendline("echo hi$((20+22))")  # the terminal echoes the line; only sh prints 42
    proc.expect("hi42", timeout=10)
    proc.sendline("python3 -c 'import sys; print(\"isatty\", sys.stdin.isatty())'")
    proc.expect("isatty True", timeout=10)
    proc.sendline("printf 'name? '; read name; echo \"hello $name\"")
    proc.expect(r"name\? ", timeout=10)
    proc.sendline("kobuki")
    proc.expect("hello kobuki", timeout=10)
    proc.sendline("exit 3")
    assert proc.wait(10) == 3


def test_stty_reports_the_requested_size(conn: ssh.Connection) -> None:
    proc = conn.spawn("stty size", pty=True)
    proc.expect("50 200\r\n", timeout=10)  # live.Process asks for 200 x 50
    assert proc.wait(10) == 0


def test_close_ends_the_process_group(conn: ssh.Connection) -> None:
    proc = conn.spawn("sleep 71 & sleep 72 & echo started; wait", pty=True)
    proc.expect("started", timeout=10)
    started = time.monotonic()
    assert proc.close() is not None
    assert time.monotonic() - started < 5
    assert _gone(conn, "[s]leep 71")
    assert _gone(conn, "[s]leep 72")


def test_close_ends_an_interactive_shell_and_its_command(conn: ssh.Connection) -> None:
    proc = conn.spawn("sh -i", pty=True)
    proc.sendline("sleep 73")
    proc.expect("sleep 73", timeout=10)  # the echo: the line reached the shell
    assert proc.close() is not None
    assert _gone(conn, "[s]leep 73")


def test_without_a_pty_nothing_changes(conn: ssh.Connection) -> None:
    proc = conn.spawn("[ -t 0 ] || echo no-terminal; tty; echo out", pty=False)
    proc.expect("no-terminal\nnot a tty\nout\n", timeout=10)
    assert proc.wait(10) == 0
    result = conn.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


# -- a raw pty-req: the client's terminal type, size changes, all the output ---------------


@pytest.fixture
def client(hosts: HostManager, info: HostInfo,
           client_key: tuple[paramiko.PKey, str]) -> Iterator[paramiko.SSHClient]:
    client = _client(hosts, info, client_key[0])
    try:
        yield client
    finally:
        client.close()


def test_terminal_type_and_window_changes(client: paramiko.SSHClient) -> None:
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session(timeout=10)
    chan.get_pty(term="xterm-256color", width=91, height=33)
    chan.exec_command("echo TERM=$TERM; stty size; echo ready; read line; stty size")
    chan.settimeout(10)
    seen = b""
    while b"ready" not in seen:
        seen += chan.recv(4096)
    chan.resize_pty(width=120, height=40)
    chan.sendall(b"go\r")
    out = (seen + _read_all(chan)).decode()
    assert re.search(r"TERM=xterm-256color\r\n33 91\r\nready\r\n", out), out
    assert out.endswith("go\r\n40 120\r\n"), out  # the terminal echoed the line
    assert _paramiko_compat.wait_for_exit_status(chan, 10) and chan.exit_status == 0


def test_all_output_arrives_before_the_exit_status(client: paramiko.SSHClient) -> None:
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session(timeout=10)
    chan.get_pty(term="dumb", width=80, height=24)
    chan.exec_command("seq 1 20000; exit 5")
    out = _read_all(chan, timeout=20)
    # (The simulator's sshd may say something of its own first.)
    assert out.endswith(b"".join(b"%d\r\n" % k for k in range(1, 20001)))
    assert _paramiko_compat.wait_for_exit_status(chan, 10) and chan.exit_status == 5


@pytest.fixture
def asyncssh_only(hosts: HostManager) -> None:
    if hosts.backend != "asyncssh":
        pytest.skip("the asyncssh backend's own way")


@pytest.mark.usefixtures("asyncssh_only")
def test_a_dropped_connection_ends_the_command(
    client: paramiko.SSHClient, conn: ssh.Connection
) -> None:
    # As without a pty, the asyncssh backend kills the command's process group when its
    # channel closes; sshd only hangs the terminal up, which this command ignores.
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session(timeout=10)
    chan.get_pty()
    chan.exec_command("trap '' HUP; echo up; sleep 74")
    chan.settimeout(10)
    seen = b""
    while b"up" not in seen:
        seen += chan.recv(4096)
    client.close()  # no close() of a Process: the server ends what the channel ran
    assert _gone(conn, "[s]leep 74")


@pytest.mark.usefixtures("asyncssh_only")
def test_a_signal_request_reaches_the_command(hosts: HostManager) -> None:
    # (The simulator's sshd refuses signal requests: its sessions are a ForceCommand.)
    key = asyncssh.generate_private_key("ssh-ed25519")
    line = key.export_public_key().decode().strip()
    info = hosts.start_host("i-2", authorized_keys=[line], firewall=lambda _src: "ACCEPT",
                            files={}, commands=[])

    async def signal_it() -> tuple[bytes, int | None]:
        known = asyncssh.import_known_hosts(f"[127.0.0.1]:{info.port} {info.hostkey}\n")
        async with asyncssh.connect("127.0.0.1", info.port, username=hosts.login_user,
                                    client_keys=[key], known_hosts=known) as client:
            proc = await client.create_process(
                "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.1; done",
                term_type="xterm", encoding=None)
            await asyncio.wait_for(proc.stdout.readuntil(b"ready"), 10)
            proc.send_signal("TERM")
            out = await asyncio.wait_for(proc.stdout.read(), 10)
            done = await asyncio.wait_for(proc.wait(), 10)
            return out, done.exit_status

    out, status = asyncio.run(signal_it())
    assert b"got-term\r\n" in out
    assert status == 9
