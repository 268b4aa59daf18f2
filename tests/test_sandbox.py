"""The simulated robots' sandbox (pytest_rerobots.sim.hosts.sandbox), with both backends.

Everything here runs real bubblewrap namespaces, real SSH servers and real processes; a
machine that cannot sandbox skips, unless REROBOTS_REQUIRE_SANDBOX=1 (as CI sets).
"""

from __future__ import annotations

import logging
import os
import pathlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import paramiko
import pytest

from pytest_rerobots import ssh
from pytest_rerobots.errors import ConfigurationError, SSHConnectError, SSHError
from pytest_rerobots.sim.hosts import SSHD, HostInfo, HostManager, asyncssh_backend
from pytest_rerobots.sim.hosts import sandbox as sandbox_module
from pytest_rerobots.sim.hosts.processes import cmdline, descendants


def _can_sandbox() -> None:
    problem = sandbox_module.SandboxSetup.probe()
    if isinstance(problem, str):
        if os.environ.get("REROBOTS_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_SANDBOX=1 but this machine cannot sandbox: {problem}")
        pytest.skip(f"this machine cannot sandbox: {problem}")


@pytest.fixture(params=["asyncssh", "openssh"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "openssh" and not os.access(SSHD, os.X_OK):
        if os.environ.get("REROBOTS_REQUIRE_OPENSSH") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_OPENSSH=1 but {SSHD} is missing")
        pytest.skip(f"{SSHD} is missing")
    return str(request.param)


@pytest.fixture
def hosts(tmp_path: pathlib.Path, backend: str) -> Iterator[HostManager]:
    _can_sandbox()
    manager = HostManager(tmp_path / "hosts", backend, "require")
    try:
        yield manager
    finally:
        manager.close()
    manager.check()


@pytest.fixture(scope="module")
def client_key() -> tuple[paramiko.PKey, str]:
    return ssh.generate_client_key()


def _start(hosts: HostManager, key: str, instance_id: str = "i-1",
           firewall: Callable[[str], str] = lambda _src: "ACCEPT",
           **kwargs: object) -> HostInfo:
    return hosts.start_host(instance_id, authorized_keys=[key], firewall=firewall,
                            files=kwargs.pop("files", {}),  # type: ignore[arg-type]
                            commands=kwargs.pop("commands", []),  # type: ignore[arg-type]
                            **kwargs)  # type: ignore[arg-type]


def _connect(hosts: HostManager, info: HostInfo, pkey: paramiko.PKey) -> ssh.Connection:
    return ssh.Connection.open("127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=pkey,
                               username=hosts.login_user, timeout=5.0, attempts=1)


def _pid_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _in_namespace(namespace: str) -> list[int]:
    """The pids (as this machine sees them) of every process in PID namespace ``namespace``."""
    return [int(e.name) for e in os.scandir("/proc")
            if e.name.isdigit() and _pid_ns(int(e.name)) == namespace]


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_destructive_commands_leave_the_runners_files_and_processes_alone(
    hosts: HostManager, backend: str, client_key: tuple[paramiko.PKey, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"rerobots-sandbox-test-{uuid.uuid4().hex[:8]}"
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("REROBOTS_API_TOKEN", secret)  # the runner's token, in our environ
    # The runner's own /tmp and /opt are the point here.
    runner_files = [pathlib.Path("/tmp", name)]  # noqa: S108
    if os.access("/opt", os.W_OK):
        runner_files.append(pathlib.Path("/opt", name))
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        for path in runner_files:
            path.mkdir()
            (path / "firmware.bin").write_text("keep me")
        info = _start(hosts, client_key[1])
        with _connect(hosts, info, client_key[0]) as conn:
            result = conn.run(
                f"rm -rf /tmp/{name} /opt/{name}; ls /tmp/{name} /opt/{name} 2>&1;"
                f" echo evil > /etc/{name}; cat /etc/{name};"
                " cat /proc/1/environ /proc/$PPID/environ 2>&1 | tr '\\0' '\\n'", timeout=10)
            assert "No such file" in result.stdout  # gone, as far as the robot can tell
            assert "evil" in result.stdout
            assert secret not in result.stdout + result.stderr
            try:
                conn.run("kill -9 -1; echo survived", timeout=10)
            except SSHError:
                assert backend == "openssh"  # it killed the robot's own sshd, as on a robot
        # The robot lives on after its kill -9 -1; its writes are its own.
        with _connect(hosts, info, client_key[0]) as conn:
            assert conn.run(f"cat /etc/{name}", timeout=10).stdout == "evil\n"
        for path in runner_files:
            assert (path / "firmware.bin").read_text() == "keep me"
        assert not pathlib.Path("/etc", name).exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        for path in runner_files:
            if path.exists():
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()


def test_own_hostname_environment_view_and_capabilities(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    info = _start(hosts, client_key[1], commands=["echo setup > /opt/flag"])
    with _connect(hosts, info, client_key[0]) as conn:
        assert conn.run("hostname", timeout=10).stdout.strip() == "sim-i-1"
        assert "sim-i-1" in conn.run("cat /etc/hostname /etc/hosts", timeout=10).stdout
        assert socket.gethostname() != "sim-i-1"
        env = dict(line.split("=", 1) for line in conn.run("env", timeout=10).stdout.split("\n")
                   if "=" in line)
        leaked = set(env) - {"PATH", "HOME", "PWD", "USER", "LOGNAME", "SHELL", "LANG", "SHLVL",
                             "OLDPWD", "REROBOTS_SIM_HOST", "SSH_CLIENT", "SSH_CONNECTION",
                             "MAIL", "_", "SSH_ORIGINAL_COMMAND"}
        assert not leaked
        # A setup command's write and a later command's read meet in the robot's /opt.
        assert conn.run("cat /opt/flag", timeout=10).stdout == "setup\n"
        listing = conn.run("ls /", timeout=10).stdout.split()
        assert "work" not in listing and "usr" in listing
        assert conn.run("ls /etc/shadow && grep -c '^root:\\*:' /etc/shadow",
                        timeout=10).stdout.split()[-1] == "1"  # no password hash of ours
        # No CAP_SYS_ADMIN: the read-only system stays read-only.
        remount = conn.run("mount -o remount,rw,bind /usr 2>&1; touch /usr/x 2>&1", timeout=10)
        assert "Read-only file system" in remount.stdout
        assert not pathlib.Path("/usr/x").exists()


def test_every_process_ends_with_the_instance(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    info = _start(hosts, client_key[1])
    with _connect(hosts, info, client_key[0]) as conn:
        # Without the marker variable (env -i), and in a session of its own (setsid).
        conn.run("env -i setsid sleep 301 >/dev/null 2>&1 </dev/null & echo started", timeout=10)
        inner = conn.run("ps -e -o pid= | wc -l", timeout=10).stdout
        assert int(inner) >= 3  # init, the sleep, this shell (and ps)
    namespace = next(_pid_ns(pid) for pid in descendants(os.getpid())
                     if "sleep 301" in cmdline(pid))
    assert namespace and namespace != _pid_ns(os.getpid())
    assert _in_namespace(namespace)
    hosts.stop_host("i-1")
    assert _wait_until(lambda: not _in_namespace(namespace))


@pytest.mark.parametrize("mode", ["require", "off"])
def test_no_sshd_listens_and_the_firewall_decides_every_connection(
    tmp_path: pathlib.Path, backend: str, mode: str, client_key: tuple[paramiko.PKey, str]
) -> None:
    def firewall(src: str) -> str:
        return "ACCEPT" if src == "127.0.0.1" else "REJECT"

    if mode == "require":
        _can_sandbox()
    with HostManager(tmp_path / "hosts", backend, mode) as hosts:
        _check_listeners(hosts, _start(hosts, client_key[1], firewall=firewall), client_key)
        hosts.check()


def _check_listeners(hosts: HostManager, info: HostInfo,
                     client_key: tuple[paramiko.PKey, str]) -> None:
    with _connect(hosts, info, client_key[0]) as conn:
        assert conn.run("echo in", timeout=10).stdout == "in\n"
        # No process this test started (sshd, bwrap, commands) holds a listening socket:
        # the only listener of the host is the simulator's own, behind the firewall.
        listening = _listening_inodes()
        for pid in descendants(os.getpid()):
            assert not _socket_inodes(pid) & listening, cmdline(pid)
        assert info.port in _listening_ports(_socket_inodes(os.getpid()) & listening)
    with pytest.raises(SSHConnectError):
        ssh.Connection.open("127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=client_key[0],
                            username=hosts.login_user, timeout=2.0, attempts=1,
                            source_address=("127.0.0.2", 0))


_DIES_WITH_THE_SIMULATOR = """
import pathlib, sys
from pytest_rerobots import ssh
from pytest_rerobots.sim.hosts import HostManager
pkey, public = ssh.generate_client_key()
hosts = HostManager(pathlib.Path(sys.argv[1]), sys.argv[2], "require")
info = hosts.start_host("i-1", authorized_keys=[public], firewall=lambda src: "ACCEPT",
                        files={}, commands=[], devices={"/dev/ttyS0": "sleep 303"})
conn = ssh.Connection.open("127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=pkey,
                           username=hosts.login_user)
conn.run("env -i setsid sleep 302 >/dev/null 2>&1 </dev/null &", timeout=10)
print(hosts._hosts["i-1"].sandbox.pid, flush=True)
sys.stdin.read()  # killed here, with no close()
"""


def test_a_killed_simulator_leaves_no_robot_process(tmp_path: pathlib.Path, backend: str) -> None:
    _can_sandbox()
    with subprocess.Popen([sys.executable, "-c", _DIES_WITH_THE_SIMULATOR, str(tmp_path),
                           backend], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stdout is not None
            init = int(proc.stdout.readline())
            namespace = _pid_ns(init)
            assert namespace and len(_in_namespace(namespace)) >= 3  # init, sleeps, emulator
        finally:
            proc.kill()
    assert _wait_until(lambda: not _in_namespace(namespace))
    # Its copy of /etc (in /dev/shm where there is one) goes at the next simulator's start.
    shm = pathlib.Path("/dev/shm")  # noqa: S108
    stale = f"rerobots-etc-{proc.pid}-*"
    with HostManager(tmp_path / "next", backend, "require") as hosts:
        _start(hosts, ssh.generate_client_key()[1])
        assert not list(shm.glob(stale)) and not list((tmp_path / "next").glob(stale))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with_target = os.readlink(fd.path) if fd.is_symlink() else ""
            if with_target.startswith("socket:["):
                inodes.add(with_target[8:-1])
    except OSError:
        pass
    return inodes


def _listening_rows() -> list[list[str]]:
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows += [line.split() for line in f.readlines()[1:]]
    return [row for row in rows if row[3] == "0A"]  # TCP_LISTEN


def _listening_inodes() -> set[str]:
    return {row[9] for row in _listening_rows()}


def _listening_ports(inodes: set[str]) -> set[int]:
    return {int(row[1].rsplit(":", 1)[1], 16) for row in _listening_rows() if row[9] in inodes}


def test_a_serial_device_served_by_the_catalogs_command(
    hosts: HostManager, client_key: tuple[paramiko.PKey, str]
) -> None:
    console = ("printf 'BOOT banner v1\\n'; while IFS= read -r line; do"
               " printf 'echo:%s\\n' \"$line\"; done")
    info = _start(hosts, client_key[1], devices={"/dev/ttyUSB0": console})
    with _connect(hosts, info, client_key[0]) as conn:
        assert conn.run("timeout 5 head -n1 /dev/ttyUSB0", timeout=10).stdout == "BOOT banner v1\n"
        reply = conn.run("exec 3<>/dev/ttyUSB0; printf 'ping\\n' >&3; timeout 5 head -n1 <&3",
                         timeout=10)
        assert reply.stdout == "echo:ping\n"
        assert conn.run("test -c /dev/ttyUSB0 && echo char", timeout=10).stdout == "char\n"


def test_sftp_reaches_only_the_robots_files(
    hosts: HostManager, tmp_path: pathlib.Path, client_key: tuple[paramiko.PKey, str]
) -> None:
    # Both backends serve SFTP with sftp-server inside the sandbox: a path means there what
    # it means to the robot's commands (tests/test_sandbox_sftp.py races a flipping link).
    info = _start(hosts, client_key[1])
    with _connect(hosts, info, client_key[0]) as conn:
        local = tmp_path / "fw.bin"
        local.write_text("image")
        conn.put(str(local), "/opt/fw.bin")  # the robot's /opt
        assert conn.run("cat /opt/fw.bin", timeout=10).stdout == "image"
        assert not pathlib.Path("/opt/fw.bin").exists() or (
            pathlib.Path("/opt/fw.bin").read_text() != "image")
        with pytest.raises(OSError):
            conn.sftp.open("/usr/evil", "w")
        assert not pathlib.Path("/usr/evil").exists()
        # A link the robot made leads SFTP to the robot's files, never to the runner's.
        target = tmp_path / "runner-file"
        target.write_text("mine")
        conn.run(f"ln -s {target} escape", timeout=10)
        with conn.sftp.open("escape", "w") as f:
            f.write("theirs")
        assert target.read_text() == "mine"
        assert conn.run(f"cat {target}", timeout=10).stdout == "theirs"  # in the robot's /tmp


def test_a_sandboxed_asyncssh_host_without_sftp_server_refuses_sftp(
    tmp_path: pathlib.Path, client_key: tuple[paramiko.PKey, str],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # Never asyncssh's own server instead: that one opens paths outside the sandbox.
    _can_sandbox()
    monkeypatch.setattr(asyncssh_backend, "find_sftp_server", lambda: None)
    with caplog.at_level(logging.WARNING), \
            HostManager(tmp_path / "hosts", "asyncssh", "require") as hosts:
        info = _start(hosts, client_key[1])
        with _connect(hosts, info, client_key[0]) as conn:
            assert conn.run("echo still", timeout=10).stdout == "still\n"
            with pytest.raises(SSHError, match="cannot open an SFTP session"):
                _ = conn.sftp
    assert any("refuses SFTP" in r.getMessage() for r in caplog.records)


def test_require_is_an_error_and_auto_warns_once_where_the_machine_cannot_sandbox(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sandbox_module, "BWRAP", str(tmp_path / "no-bwrap"))
    with pytest.raises(ConfigurationError, match=r"cannot sandbox.*bubblewrap"):
        HostManager(tmp_path / "a", "asyncssh", "require")
    with caplog.at_level(logging.WARNING):
        with HostManager(tmp_path / "b", "asyncssh", "auto") as manager:
            assert manager.sandbox_problem is not None
            assert "no-bwrap" in manager.sandbox_problem
    warnings = [r for r in caplog.records if "UNSANDBOXED" in r.getMessage()]
    assert len(warnings) == 1
    with pytest.raises(ConfigurationError, match="sandbox mode"):
        HostManager(tmp_path / "c", "asyncssh", "sometimes")
