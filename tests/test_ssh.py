"""The plugin's side of SSH (pytest_rerobots.ssh), against real simulated hosts."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

import paramiko
import pytest

from pytest_rerobots import _paramiko_compat, ssh
from pytest_rerobots.errors import (
    CommandFailed,
    CommandTimeout,
    HostKeyMismatch,
    LocalFileError,
    RemoteFileError,
    SSHConnectError,
    SSHError,
    is_infrastructure,
)
from pytest_rerobots.sim.hosts import SSHD, HostInfo, HostManager
from pytest_rerobots.transcript import Transcript

MB = 1_000_000


@pytest.fixture(params=["asyncssh", "openssh"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "openssh" and not os.access(SSHD, os.X_OK):
        if os.environ.get("REROBOTS_REQUIRE_OPENSSH") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_OPENSSH=1 but {SSHD} is missing")
        pytest.skip(f"{SSHD} is missing")
    return str(request.param)


@pytest.fixture(scope="module")
def client_key() -> tuple[paramiko.PKey, str]:
    return ssh.generate_client_key()


@dataclasses.dataclass
class Robot:
    """One running simulated host and what it takes to log in."""

    hosts: HostManager
    info: HostInfo
    pkey: paramiko.PKey

    def connect(self, **kwargs: object) -> paramiko.SSHClient:
        kwargs.setdefault("hostkeys", [self.info.hostkey])
        kwargs.setdefault("pkey", self.pkey)
        kwargs.setdefault("username", self.hosts.login_user)
        kwargs.setdefault("timeout", 5.0)
        return ssh.connect("127.0.0.1", self.info.port, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def robot(
    tmp_path: pathlib.Path, backend: str, client_key: tuple[paramiko.PKey, str]
) -> Iterator[Robot]:
    hosts = HostManager(tmp_path / "hosts", backend)
    try:
        info = hosts.start_host(
            "i-1", authorized_keys=[client_key[1]], firewall=lambda _src: "ACCEPT",
            files={}, commands=[],
        )
        yield Robot(hosts, info, client_key[0])
    finally:
        hosts.close()
    hosts.check()


@pytest.fixture
def conn(robot: Robot) -> Iterator[ssh.Connection]:
    with ssh.Connection(robot.connect()) as connection:
        yield connection


class Naps:
    """An injected sleep: records the backoff instead of waiting it out."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


# -- keys ---------------------------------------------------------------------------------


def test_generate_client_key() -> None:
    pkey, line = ssh.generate_client_key()
    keytype, blob, comment = line.split(" ")
    assert (keytype, comment) == ("ssh-ed25519", "pytest-rerobots")
    assert isinstance(pkey, paramiko.Ed25519Key) and pkey.can_sign()
    assert blob == pkey.get_base64()
    assert ssh.generate_client_key()[1] != line


# -- run ------------------------------------------------------------------------------------


def test_exit_status_and_output(conn: ssh.Connection) -> None:
    result = conn.run("echo out; echo err >&2; exit 3")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert result.command == "echo out; echo err >&2; exit 3"
    assert result.duration > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.exit_status = 0  # type: ignore[misc]
    assert conn.run("true").exit_status == 0
    assert conn.run("false", check=False).exit_status == 1


def test_check_raises_command_failed_with_the_output(conn: ssh.Connection) -> None:
    with pytest.raises(CommandFailed, match="exited with status 42") as info:
        conn.run("echo why >&2; exit 42", check=True)
    assert info.value.result.exit_status == 42
    assert info.value.result.stderr == "why\n"
    assert conn.run("true", check=True).exit_status == 0


def test_large_stdout_and_stderr_together(conn: ssh.Connection) -> None:
    # Both streams at once, 5 MB each: reading one at a time would deadlock.
    result = conn.run(
        "head -c 5000000 /dev/zero | tr '\\0' o & head -c 5000000 /dev/zero | tr '\\0' e >&2; wait",
        timeout=60,
    )
    assert result.exit_status == 0
    assert len(result.stdout) == 5 * MB and set(result.stdout) == {"o"}
    assert len(result.stderr) == 5 * MB and set(result.stderr) == {"e"}


def test_stdin(conn: ssh.Connection) -> None:
    assert conn.run("tr a-z A-Z", stdin="hello\n").stdout == "HELLO\n"
    # 5 MB through cat: input and output flow at the same time.
    data = os.urandom(5 * MB // 2).hex()
    assert conn.run("cat", stdin=data.encode(), timeout=60).stdout == data
    # Without stdin the command sees EOF at once instead of hanging.
    assert conn.run("cat; echo done", timeout=10).stdout == "done\n"


def test_killed_by_signal_is_128_plus_n(conn: ssh.Connection) -> None:
    assert conn.run("kill -KILL $$").exit_status == 137
    assert conn.run("kill -TERM $$").exit_status == 143


def test_timeout_closes_only_that_channel(conn: ssh.Connection) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"'sleep 10' did not finish within 0\.3 s") as info:
        conn.run("sleep 10", timeout=0.3)
    assert time.monotonic() - started < 3
    assert (info.value.command, info.value.timeout) == ("sleep 10", 0.3)
    assert conn.run("echo still here").stdout == "still here\n"
    with pytest.raises(CommandTimeout):  # also while the command is still printing
        conn.run("yes", timeout=0.3)
    assert conn.run("echo and here").stdout == "and here\n"


def test_failure_and_timeout_show_both_streams(conn: ssh.Connection) -> None:
    with pytest.raises(CommandFailed) as failed:
        conn.run("echo flashing...; echo 'E: CRC mismatch at 0x4000' >&2; exit 3", check=True)
    text = str(failed.value)
    assert "flashing..." in text and "E: CRC mismatch at 0x4000" in text
    assert "stdout" in text and "stderr" in text and "status 3" in text
    # What a command printed before its timeout is kept and shown.
    with pytest.raises(CommandTimeout) as timed_out:
        conn.run("echo started; echo half way >&2; exec sleep 10", timeout=0.5)
    assert (timed_out.value.stdout, timed_out.value.stderr) == ("started\n", "half way\n")
    assert "started" in str(timed_out.value) and "half way" in str(timed_out.value)
    assert "--rerobots-command-timeout" in str(timed_out.value)


def test_default_timeout_and_explicit_none(conn: ssh.Connection) -> None:
    assert conn.command_timeout == ssh.DEFAULT_COMMAND_TIMEOUT
    conn.command_timeout = 0.3
    with pytest.raises(CommandTimeout, match=r"within 0\.3 s"):
        conn.run("sleep 10")  # no timeout named: the connection's default
    # Only an explicit None waits without a limit.
    assert conn.run("sleep 0.6; echo done", timeout=None).stdout == "done\n"


def test_transcript_records_runs_and_transfers(conn: ssh.Connection,
                                               tmp_path: pathlib.Path) -> None:
    conn.transcript, conn.label = Transcript(), "basic_kobuki 1a2b3c4d"
    conn.run("echo out; echo err >&2")
    with pytest.raises(CommandFailed):
        conn.run("exit 4", check=True)
    with pytest.raises(CommandTimeout):
        conn.run("echo before; exec sleep 10", timeout=0.3)
    local = tmp_path / "fw.bin"
    local.write_text("fw")
    conn.put(local, "fw.bin")
    with pytest.raises(RemoteFileError):
        conn.get("missing.log", tmp_path / "missing.log")
    entries, dropped = conn.transcript.take()
    assert dropped == 0
    got = [(e.kind, e.status, e.stdout, e.stderr, e.note, e.instance) for e in entries]
    label = "basic_kobuki 1a2b3c4d"
    assert got == [
        ("run", 0, "out", "err", "", label),
        ("run", 4, "", "", "", label),
        ("run", None, "before", "", "timed out after 0.3 s", label),
        ("put", None, "", "", "", label),
        ("get", None, "", "", "missing.log: no such file or directory", label),
    ]
    assert entries[3].command == f"{local} -> fw.bin"
    assert all(e.duration >= 0 and e.at > 0 for e in entries)
    assert "timed out after 0.3 s" in Transcript.render(entries)


def test_run_on_a_closed_connection(robot: Robot) -> None:
    client = robot.connect()
    client.close()
    with pytest.raises(SSHError, match="closed"):
        ssh.run(client, "true")


def test_tcp_nodelay_is_set(conn: ssh.Connection) -> None:
    transport = conn.client.get_transport()
    assert transport is not None
    assert transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_exit_signal_becomes_128_plus_n() -> None:
    # OpenSSH reports a signalled command with exit-signal; paramiko alone says -1.
    chan = paramiko.Channel(0)
    message = paramiko.Message()
    for add, value in [
        (message.add_string, "exit-signal"), (message.add_boolean, False),
        (message.add_string, "SEGV"), (message.add_boolean, False),
        (message.add_string, ""), (message.add_string, ""),
    ]:
        add(value)
    message.rewind()
    _paramiko_compat.handle_channel_request(chan, message)
    assert chan.exit_status == 139
    assert chan.status_event.is_set()


# -- SFTP -----------------------------------------------------------------------------------


def test_sftp_round_trip_10_mb(conn: ssh.Connection, tmp_path: pathlib.Path) -> None:
    payload = os.urandom(10 * MB)
    digest = hashlib.sha256(payload).hexdigest()
    local = tmp_path / "firmware.bin"
    local.write_bytes(payload)
    conn.put(local, "firmware.bin")  # relative: lands in the host's home
    assert conn.run("sha256sum firmware.bin", check=True).stdout.split()[0] == digest
    back = tmp_path / "back.bin"
    conn.get("firmware.bin", back)
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert conn.sftp is conn.sftp  # one cached session


def test_sftp_errors_are_ssh_errors(conn: ssh.Connection, tmp_path: pathlib.Path) -> None:
    conn.close()
    with pytest.raises(SSHError, match="closed") as info:
        conn.get("anything", tmp_path / "x")
    assert is_infrastructure(info.value)


def test_missing_remote_path_is_a_test_failure_naming_it(
    conn: ssh.Connection, tmp_path: pathlib.Path
) -> None:
    local = tmp_path / "boot.log"
    with pytest.raises(RemoteFileError, match=r"remote path 'no-such\.log'.*no such file") as info:
        conn.get("no-such.log", local)
    assert not is_infrastructure(info.value) and info.value.path == "no-such.log"
    assert not local.exists()  # no empty file left behind
    local.write_text("firmware")
    with pytest.raises(RemoteFileError, match=r"remote path 'no-dir/fw\.bin'"):
        conn.put(local, "no-dir/fw.bin")
    # A missing *local* file is a short error naming the local path (issue 22 item 6; it
    # was Python's own FileNotFoundError, under paramiko's frames): a test failure too.
    with pytest.raises(LocalFileError, match=r"local path '.*absent\.bin'") as missing:
        conn.put(tmp_path / "absent.bin", "fw.bin")
    assert isinstance(missing.value, OSError) and not is_infrastructure(missing.value)


def test_remote_permission_error_is_a_test_failure(
    conn: ssh.Connection, tmp_path: pathlib.Path
) -> None:
    # Unreadable for root too, with or without the simulator's sandbox: a write-only
    # sysctl (the kernel checks a sysctl's mode for root as well).
    denied = "'/proc/sys/vm/drop_caches'.*permission denied"
    with pytest.raises(RemoteFileError, match=denied) as info:
        conn.get("/proc/sys/vm/drop_caches", tmp_path / "x")
    assert not is_infrastructure(info.value) and info.value.reason == "permission denied"
    assert not (tmp_path / "x").exists()


def test_a_path_the_host_refuses_is_a_test_failure(
    robot: Robot, conn: ssh.Connection, tmp_path: pathlib.Path
) -> None:
    if robot.hosts.sandbox_problem is not None:  # /usr would be this machine's own
        pytest.skip(f"needs a sandboxed robot: {robot.hosts.sandbox_problem}")
    # A read-only file system: the SFTP server says only "Failure", and the host is there.
    local = tmp_path / "x"
    local.write_text("x")
    with pytest.raises(RemoteFileError, match=r"'/usr/x'.*refused by the host") as info:
        conn.put(local, "/usr/x")
    assert not is_infrastructure(info.value)


def test_connection_close_is_idempotent(robot: Robot) -> None:
    connection = ssh.Connection(robot.connect())
    assert connection.sftp.normalize(".")
    connection.close()
    connection.close()
    assert connection.closed
    with pytest.raises(SSHError):
        connection.run("true")
    with pytest.raises(SSHError, match="closed"):
        _ = connection.sftp


# -- connect ---------------------------------------------------------------------------------


def test_host_key_mismatch_is_refused_and_not_retried(robot: Robot) -> None:
    impostor = paramiko.ECDSAKey.generate()
    line = f"{impostor.get_name()} {impostor.get_base64()} root@elsewhere"
    naps = Naps()
    with pytest.raises(HostKeyMismatch) as info:
        robot.connect(hostkeys=[line], attempts=5, sleep=naps)
    presented = paramiko.PKey.from_type_string(*_split(robot.info.hostkey))
    assert impostor.fingerprint in str(info.value)  # expected
    assert presented.fingerprint in str(info.value)  # presented
    assert naps.calls == []


def test_host_key_with_comment_and_several_keys(robot: Robot) -> None:
    other = paramiko.ECDSAKey.generate()
    hostkeys = [f"{other.get_name()} {other.get_base64()}", robot.info.hostkey + " root@newc59"]
    # paramiko pins one key per type; the host's own key must win over a stale one.
    client = robot.connect(hostkeys=hostkeys[1:])
    client.close()


def test_unusable_hostkeys_refuse_to_connect(robot: Robot) -> None:
    with pytest.raises(SSHConnectError, match="no usable host key"):
        robot.connect(hostkeys=[])
    with pytest.raises(SSHConnectError, match="no usable host key"):
        robot.connect(hostkeys=["ssh-ed25519"])


def test_wrong_client_key_is_refused_and_not_retried(robot: Robot) -> None:
    stranger, _ = ssh.generate_client_key()
    naps = Naps()
    with pytest.raises(SSHConnectError, match="refused the login"):
        robot.connect(pkey=stranger, attempts=5, sleep=naps)
    assert naps.calls == []


def test_refused_connections_are_retried_then_reported() -> None:
    with socket.socket() as probe:  # a port where nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    naps = Naps()
    pkey, _ = ssh.generate_client_key()
    hostkey = paramiko.ECDSAKey.generate()
    with pytest.raises(SSHConnectError, match=r"127.0.0.1:\d+ \(3 attempts\): .*refused") as info:
        ssh.connect(
            "127.0.0.1", port, hostkeys=[f"{hostkey.get_name()} {hostkey.get_base64()}"],
            pkey=pkey, attempts=3, sleep=naps,
        )
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert len(naps.calls) == 2
    assert all(0 < nap <= 3.0 for nap in naps.calls)


def test_reset_then_accepted_is_retried_to_success(
    tmp_path: pathlib.Path, backend: str, client_key: tuple[paramiko.PKey, str]
) -> None:
    verdicts = iter(["REJECT", "REJECT"])
    lock = threading.Lock()

    def firewall(_src: str) -> str:
        with lock:
            return next(verdicts, "ACCEPT")

    with HostManager(tmp_path, backend) as hosts:
        info = hosts.start_host(
            "i-1", authorized_keys=[client_key[1]], firewall=firewall, files={}, commands=[]
        )
        naps = Naps()
        client = ssh.connect(
            "127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=client_key[0],
            username=hosts.login_user, attempts=5, sleep=naps,
        )
        client.close()
    assert len(naps.calls) == 2


def test_dropped_connection_times_out(
    tmp_path: pathlib.Path, backend: str, client_key: tuple[paramiko.PKey, str]
) -> None:
    with HostManager(tmp_path, backend) as hosts:
        info = hosts.start_host(
            "i-1", authorized_keys=[client_key[1]], files={}, commands=[],
            firewall=lambda src: "DROP" if src == "127.0.0.2" else "ACCEPT",
        )
        started = time.monotonic()
        with pytest.raises(SSHConnectError, match=r"\(2 attempts\).*banner"):
            ssh.connect(
                "127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=client_key[0],
                username=hosts.login_user, timeout=0.3, attempts=2, sleep=Naps(),
                source_address=("127.0.0.2", 0),
            )
        assert time.monotonic() - started < 3
        client = ssh.connect(
            "127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=client_key[0],
            username=hosts.login_user, source_address=("127.0.0.3", 0),
        )
        client.close()


def _split(line: str) -> tuple[str, bytes]:
    import base64

    keytype, blob = line.split()[:2]
    return keytype, base64.b64decode(blob)
