"""The simulated robot hosts (pytest_rerobots.sim.hosts), on real sockets and processes."""

from __future__ import annotations

import os
import pathlib
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import paramiko
import pytest

from pytest_rerobots import ssh
from pytest_rerobots.errors import ConfigurationError, RerobotsError, SSHConnectError, SSHError
from pytest_rerobots.sim.hosts import SSHD, HostInfo, HostManager


def _backend_param(name: str) -> str:
    if name == "openssh" and not os.access(SSHD, os.X_OK):
        if os.environ.get("REROBOTS_REQUIRE_OPENSSH") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_OPENSSH=1 but {SSHD} is missing")
        pytest.skip(f"{SSHD} is missing")
    return name


@pytest.fixture(params=["asyncssh", "openssh"])
def backend(request: pytest.FixtureRequest) -> str:
    return _backend_param(request.param)


def sandbox_mode() -> str:
    """Sandboxed where the machine can; REROBOTS_REQUIRE_SANDBOX=1 (as CI sets) insists."""
    return "require" if os.environ.get("REROBOTS_REQUIRE_SANDBOX") == "1" else "auto"


@pytest.fixture
def hosts(tmp_path: pathlib.Path, backend: str) -> Iterator[HostManager]:
    manager = HostManager(tmp_path / "hosts", backend, sandbox_mode())
    try:
        yield manager
    finally:
        manager.close()
    manager.check()


@pytest.fixture(scope="module")
def client_key() -> tuple[paramiko.PKey, str]:
    return ssh.generate_client_key()


def _start(
    hosts: HostManager,
    keys: list[str],
    *,
    instance_id: str = "i-1",
    firewall: Callable[[str], str] = lambda _src: "ACCEPT",
    files: dict[str, str] | None = None,
    commands: list[str] | None = None,
) -> HostInfo:
    return hosts.start_host(
        instance_id,
        authorized_keys=keys,
        firewall=firewall,
        files=files or {},
        commands=commands or [],
    )


def _connect(
    hosts: HostManager, info: HostInfo, pkey: paramiko.PKey, **kwargs: object
) -> ssh.Connection:
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("attempts", 1)
    return ssh.Connection.open(
        "127.0.0.1",
        info.port,
        hostkeys=[info.hostkey],
        pkey=pkey,
        username=hosts.login_user,
        **kwargs,
    )


def _raw(port: int, source: str, timeout: float = 2.0) -> socket.socket:
    """A plain TCP connection from ``source`` (any 127.x.y.z works on Linux)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout, (source, 0))
    sock.settimeout(timeout)
    return sock


def _expect_reset(port: int, source: str) -> None:
    # The RST may beat connect() to its final check, or come after it.
    with pytest.raises(ConnectionResetError), _raw(port, source) as sock:
        sock.recv(64)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie that nobody has reaped yet counts as gone)."""
    try:
        data = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] != b"Z"


# Prints the pids from the command's shell up to pid 1.
_ANCESTRY = 'p=$$; while [ "$p" -gt 1 ]; do echo "$p"; read -r _ _ _ p _ < /proc/$p/stat; done'


def _child_of_ours(ancestry: str) -> int:
    """From ``_ANCESTRY``'s output, the ancestor that this test process started:
    sshd -i for the openssh backend, the command's shell for asyncssh."""
    chain = [int(pid) for pid in ancestry.split()]
    index = chain.index(os.getpid())
    return chain[index - 1]


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- construction ---------------------------------------------------------------------


def test_unknown_backend_is_a_configuration_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown SSH host backend 'telnet'"):
        HostManager(tmp_path, "telnet")


def test_host_info(hosts: HostManager, client_key: tuple[paramiko.PKey, str]) -> None:
    info = _start(hosts, [client_key[1]], instance_id="abc-1")
    assert info.port not in (0, 22)
    keytype, blob = info.hostkey.split(" ")  # exactly two fields: no comment
    assert keytype in {"ecdsa-sha2-nistp256", "ssh-ed25519"}
    assert blob.startswith("AAAA")
    assert info.directory == (hosts.root / "abc-1").resolve()
    assert info.directory.is_dir()
    other = _start(hosts, [client_key[1]], instance_id="abc-2")
    assert other.port != info.port
    assert other.hostkey != info.hostkey  # a fresh key per host


def test_files_and_commands_are_in_place(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    files = {
        "bin/hello": "#!/bin/sh\necho hello from \"$HOME\"\n",
        "etc/robot.conf": "speed = 3\n",
    }
    commands = ["mkdir -p var && cat etc/robot.conf > var/copied", "echo \"$HOME\" > var/home"]
    info = _start(hosts, [client_key[1]], files=files, commands=commands)
    home = info.directory
    assert (home / "bin/hello").stat().st_mode & stat.S_IXUSR
    assert not (home / "etc/robot.conf").stat().st_mode & stat.S_IXUSR
    assert (home / "var/copied").read_text() == "speed = 3\n"
    assert (home / "var/home").read_text().strip() == str(home)
    with _connect(hosts, info, client_key[0]) as conn:
        result = conn.run('pwd; echo "$HOME"; ./bin/hello; cat var/copied', check=True)
        expected = [str(home), str(home), f"hello from {home}", "speed = 3"]
        assert result.stdout.splitlines() == expected
        # SFTP starts in the same directory.
        assert conn.sftp.normalize(".") == str(home)
        assert sorted(conn.sftp.listdir(".")) == ["bin", "etc", "var"]


def test_failing_setup_command_is_a_clear_error(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    message = r"exited with status 3: 'echo oops >&2; exit 3'\noops"
    with pytest.raises(ConfigurationError, match=message):
        _start(hosts, [client_key[1]], commands=["echo oops >&2; exit 3"])
    # The id is free again: nothing was left running.
    _start(hosts, [client_key[1]])


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", ""])
def test_files_must_stay_inside_the_host(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str], path: str
) -> None:
    with pytest.raises(ConfigurationError, match="relative path inside the host"):
        _start(hosts, [client_key[1]], files={path: "x"})


def test_bad_authorized_key_is_a_configuration_error(hosts: HostManager) -> None:
    with pytest.raises(ConfigurationError, match="not an OpenSSH public key"):
        _start(hosts, ["ssh-ed25519 not-base64"])


def test_starting_a_running_id_again_is_an_error(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    _start(hosts, [client_key[1]])
    with pytest.raises(ConfigurationError, match="already running"):
        _start(hosts, [client_key[1]])


# -- authentication --------------------------------------------------------------------


def test_rsa_and_ed25519_keys_both_log_in(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    rsa = paramiko.RSAKey.generate(2048)
    rsa_line = f"ssh-rsa {rsa.get_base64()} simulator-issued"
    info = _start(hosts, [rsa_line, "", "# a comment", client_key[1]])
    for pkey in (rsa, client_key[0]):
        with _connect(hosts, info, pkey) as conn:
            assert conn.run("echo in").stdout == "in\n"


def test_only_the_given_keys_and_user_log_in(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    info = _start(hosts, [client_key[1]])
    stranger, _ = ssh.generate_client_key()
    with pytest.raises(SSHConnectError, match="refused the login"):
        _connect(hosts, info, stranger)
    with pytest.raises(SSHConnectError, match="refused the login of 'someone-else'"):
        ssh.connect(
            "127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=client_key[0],
            username="someone-else", timeout=5.0, attempts=1,
        )


# -- exec ---------------------------------------------------------------------------------


def test_exec_semantics(hosts: HostManager, client_key: tuple[paramiko.PKey, str]) -> None:
    info = _start(hosts, [client_key[1]])
    with _connect(hosts, info, client_key[0]) as conn:
        assert conn.run("exit 7").exit_status == 7
        assert conn.run("kill -TERM $$").exit_status == 128 + 15
        assert conn.run("kill -KILL $$").exit_status == 128 + 9
        assert conn.run("tr a-z A-Z", stdin="shout\n").stdout == "SHOUT\n"
        both = conn.run("echo out; echo err >&2")
        assert (both.stdout, both.stderr) == ("out\n", "err\n")
        # /bin/sh, not the login shell of whoever runs the simulator.
        assert conn.run("readlink /proc/$$/exe").stdout.strip() == os.path.realpath("/bin/sh")


# -- firewall -------------------------------------------------------------------------------


def test_firewall_accept_drop_reject_per_source(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    rules = {"127.0.0.1": "ACCEPT", "127.0.0.2": "DROP", "127.0.0.3": "REJECT"}
    seen: list[str] = []

    def firewall(src: str) -> str:
        seen.append(src)
        return rules[src]

    info = _start(hosts, [client_key[1]], firewall=firewall)

    with _raw(info.port, "127.0.0.1") as accepted:
        assert accepted.recv(64).startswith(b"SSH-2.0-")

    with _raw(info.port, "127.0.0.2", timeout=0.5) as dropped:
        with pytest.raises(socket.timeout):
            dropped.recv(64)  # held open, and silent: no banner

    _expect_reset(info.port, "127.0.0.3")

    with pytest.raises(SSHConnectError, match="banner"):
        _connect(hosts, info, client_key[0], source_address=("127.0.0.2", 0), timeout=0.5)
    with pytest.raises(SSHConnectError):
        _connect(hosts, info, client_key[0], source_address=("127.0.0.3", 0))
    with _connect(hosts, info, client_key[0], source_address=("127.0.0.1", 0)) as conn:
        assert conn.run("true").exit_status == 0

    # The callable decides for each new connection, at accept time.
    rules["127.0.0.2"] = "ACCEPT"
    with _connect(hosts, info, client_key[0], source_address=("127.0.0.2", 0)) as conn:
        assert conn.run("true").exit_status == 0
    assert {"127.0.0.1", "127.0.0.2", "127.0.0.3"} <= set(seen)


def test_firewall_errors_reject_and_surface(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    def broken(src: str) -> str:
        raise RuntimeError("rules table is gone")

    info = _start(hosts, [client_key[1]], firewall=broken)
    _expect_reset(info.port, "127.0.0.1")
    with pytest.raises(RerobotsError, match="rules table is gone"):
        hosts.check()
    hosts.check()  # reported once


# -- stopping -------------------------------------------------------------------------------


def test_stop_host_closes_listener_and_every_connection(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    info = _start(
        hosts, [client_key[1]], firewall=lambda src: "DROP" if src == "127.0.0.2" else "ACCEPT"
    )
    conn = _connect(hosts, info, client_key[0])
    held = _raw(info.port, "127.0.0.2", timeout=5.0)
    try:
        running: list[BaseException] = []

        def long_command() -> None:
            try:
                conn.run("sleep 30", timeout=20)
            except BaseException as exc:
                running.append(exc)

        worker = threading.Thread(target=long_command)
        worker.start()
        time.sleep(0.3)  # let the command start
        started = time.monotonic()
        hosts.stop_host("i-1")
        worker.join(10)
        assert not worker.is_alive()
        assert time.monotonic() - started < 8
        assert running and isinstance(running[0], SSHError)  # the connection died under it
        with pytest.raises(SSHError):
            conn.run("true")
        assert held.recv(64) == b""  # the dropped connection was closed too
        with pytest.raises(SSHConnectError):
            _connect(hosts, info, client_key[0])
        hosts.stop_host("i-1")  # idempotent
        hosts.stop_host("never-started")
    finally:
        conn.close()
        held.close()


def test_close_leaves_no_process_or_thread(
    tmp_path: pathlib.Path, backend: str, client_key: tuple[paramiko.PKey, str]
) -> None:
    before = {t.ident for t in threading.enumerate()}
    # Unsandboxed: the pids a command sees are this machine's (test_sandbox.py has the
    # sandboxed counterpart).
    hosts = HostManager(tmp_path, backend, "off")
    try:
        info = _start(hosts, [client_key[1]])
        with _connect(hosts, info, client_key[0]) as conn:
            # A background process that outlives its session, as a daemon would.
            orphan = int(conn.run("sleep 300 >/dev/null 2>&1 </dev/null & echo $!").stdout)
            server = _child_of_ours(conn.run(_ANCESTRY, check=True).stdout)
            assert _alive(orphan)
            if backend == "openssh":
                assert "sshd" in pathlib.Path(f"/proc/{server}/cmdline").read_text()
                assert _alive(server)
    finally:
        hosts.close()
    hosts.close()  # idempotent
    assert _wait_until(lambda: not _alive(orphan))
    if backend == "openssh":
        assert not _alive(server)
    def ours() -> list[threading.Thread]:
        return [
            t for t in threading.enumerate()
            if t.ident not in before and t.name.startswith("rerobots")
        ]

    assert _wait_until(lambda: not ours())
    with pytest.raises(RerobotsError, match="closed"):
        _start(hosts, [client_key[1]], instance_id="late")


def test_openssh_backend_without_sshd_is_a_configuration_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pytest_rerobots.sim.hosts.openssh_backend as hosts_module

    monkeypatch.setattr(hosts_module, "SSHD", str(tmp_path / "no-sshd"))
    with pytest.raises(ConfigurationError, match="openssh-server"):
        HostManager(tmp_path, "openssh")


_EXIT_WITHOUT_CLOSE = """
import os, pathlib, sys
from pytest_rerobots import ssh
from pytest_rerobots.sim.hosts import HostManager
pkey, public = ssh.generate_client_key()
hosts = HostManager(pathlib.Path(sys.argv[1]), sys.argv[2], "off")
info = hosts.start_host("i-1", authorized_keys=[public], firewall=lambda src: "ACCEPT",
                        files={}, commands=[])
client = ssh.connect("127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=pkey,
                     username=hosts.login_user)
orphan = ssh.run(client, "sleep 300 >/dev/null 2>&1 </dev/null & echo $!").stdout.strip()
chain = [int(pid) for pid in ssh.run(client, sys.argv[3]).stdout.split()]
server = chain[chain.index(os.getpid()) - 1]  # sshd -i, or the command's shell
# sshd -i retitles itself; the manager's own record names its private directory.
private = [str(d) for d in hosts._leftovers.dirs if "rerobots-sshd-" in d.name]
print(orphan, server, private[0] if private else "-", flush=True)
# No close(): the interpreter exits with the host running.
"""


def test_exit_without_close_still_kills_what_the_hosts_started(
    tmp_path: pathlib.Path, backend: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_WITHOUT_CLOSE, str(tmp_path), backend, _ANCESTRY],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    orphan, server, private = done.stdout.split()
    assert _wait_until(lambda: not _alive(int(orphan)))
    assert _wait_until(lambda: not _alive(int(server)))
    if backend == "openssh":  # nor the private directory that holds the host key
        assert private != "-"
        assert not pathlib.Path(private).exists()
