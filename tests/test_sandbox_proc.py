"""A simulated robot cannot write the kernel's settings under /proc (issue 19, item 1).

Run as root, bubblewrap leaves ``/proc/sys`` of a fresh ``/proc`` writable (it covers only
what ``access(W_OK)`` calls writable, and that says no to root there): a command on a robot
could set ``kernel.core_pattern`` to a program of its own, which the kernel then runs as
root outside every namespace at the next crash. Each case here runs a real simulator (as
root or as ``nobody``), a real sandbox and a real SSH server, and tries, over SSH and over
SFTP, to write back the value ``core_pattern`` already holds: harmless if it ever succeeds.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from pytest_rerobots.sim.hosts import SSHD

_NOBODY = 65534

# Runs in a simulator process of its own, as root or as nobody; prints one JSON line.
_ROBOT_WRITES_CORE_PATTERN = r"""
import json, os, pathlib, sys
from pytest_rerobots import ssh
from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.sim.hosts import HostManager

pkey, public = ssh.generate_client_key()
try:
    hosts = HostManager(pathlib.Path(sys.argv[1]), sys.argv[2], "require")
except ConfigurationError as exc:
    print(json.dumps({"cannot": str(exc)}))
    sys.exit(0)
with hosts:
    info = hosts.start_host("i-1", authorized_keys=[public], firewall=lambda src: "ACCEPT",
                            files={}, commands=[])
    with ssh.Connection.open("127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=pkey,
                             username=hosts.login_user, timeout=10.0, attempts=1) as conn:
        shell = conn.run(
            'v=$(cat /proc/sys/kernel/core_pattern) &&'
            ' printf "%s\n" "$v" > /proc/sys/kernel/core_pattern && echo WROTE;'
            ' echo "uid=$(id -u)"; grep " /proc " /proc/self/mountinfo', timeout=10)
        try:
            with conn.sftp.open("/proc/sys/kernel/core_pattern", "r+") as f:
                value = f.read()
                f.seek(0)
                f.write(value)
                f.flush()
            sftp = "WROTE"
        except OSError as exc:
            sftp = repr(exc)
    hosts.check()
print(json.dumps({"euid": os.geteuid(), "shell": shell.stdout + shell.stderr, "sftp": sftp}))
"""


@pytest.fixture
def simulator_dir() -> Iterator[pathlib.Path]:
    # Not under pytest's tmp_path: nobody may not enter root's 0700 pytest directory.
    path = pathlib.Path(tempfile.mkdtemp(prefix="rerobots-proc-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run_simulator(root: pathlib.Path, backend: str, as_root: bool) -> dict[str, object]:
    argv = [sys.executable, "-c", _ROBOT_WRITES_CORE_PATTERN, str(root / "hosts"), backend]
    if os.geteuid() == 0 and not as_root:
        os.chown(root, _NOBODY, _NOBODY)
        argv = ["setpriv", f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups",
                *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "LANG": "C.UTF-8"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                          cwd=root, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("as_root", [True, False], ids=["root", "nonroot"])
@pytest.mark.parametrize("backend", ["asyncssh", "openssh"])
def test_a_robot_cannot_write_kernel_core_pattern(
    simulator_dir: pathlib.Path, backend: str, as_root: bool
) -> None:
    if as_root and os.geteuid() != 0:
        pytest.skip("the root case needs this test run as root (as CI runs it)")
    if backend == "openssh" and not os.access(SSHD, os.X_OK):
        if os.environ.get("REROBOTS_REQUIRE_OPENSSH") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_OPENSSH=1 but {SSHD} is missing")
        pytest.skip(f"{SSHD} is missing")
    if backend == "openssh" and not as_root:
        pytest.skip("a non-root simulator never sandboxes the openssh backend (sshd's "
                    "privilege separation needs users its own user namespace cannot map), "
                    "so there is no sandbox to test: its robots run as the simulator's "
                    "user, whom the kernel already refuses /proc/sys writes")
    seen = _run_simulator(simulator_dir, backend, as_root)
    if "cannot" in seen:
        if os.environ.get("REROBOTS_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_SANDBOX=1 but the simulator cannot sandbox: "
                        f"{seen['cannot']}")
        pytest.skip(f"the simulator cannot sandbox here: {seen['cannot']}")
    assert seen["euid"] == (0 if as_root else _NOBODY)
    shell = str(seen["shell"])
    assert "uid=0" in shell  # root on the robot, in both cases
    assert "WROTE" not in shell, shell
    # Refused by the mount, not only by the kernel's check of who writes.
    assert "Read-only file system" in shell, shell
    proc_mount = next(line for line in shell.splitlines() if " /proc " in line)
    assert "ro" in proc_mount.split()[5].split(","), proc_mount
    assert seen["sftp"] != "WROTE"
