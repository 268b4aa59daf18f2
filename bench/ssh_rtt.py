"""Exec round trip: ``pytest_rerobots.ssh.run`` against plain paramiko defaults.

For each host backend, start one simulated host, then time N sequential
``true`` commands twice: through :func:`pytest_rerobots.ssh.connect` +
:func:`pytest_rerobots.ssh.run`, and through a default ``SSHClient``
(``connect(hostname, port, pkey=...)``: paramiko's own socket, Nagle on) with
``exec_command`` + ``recv_exit_status``. Prints the medians and their ratio.

    python bench/ssh_rtt.py [-n 200] [--backend asyncssh --backend openssh]
"""

from __future__ import annotations

import argparse
import base64
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import paramiko

from pytest_rerobots import ssh
from pytest_rerobots.sim.hosts import SSHD, HostManager


def _median_ms(fn: Callable[[], object], n: int) -> float:
    fn()  # warm up: the first channel pays for lazy setup on both ends
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _plain_client(port: int, hostkey: str, pkey: paramiko.PKey, user: str) -> paramiko.SSHClient:
    keytype, blob = hostkey.split()[:2]
    client = paramiko.SSHClient()
    key = paramiko.PKey.from_type_string(keytype, base64.b64decode(blob))
    client.get_host_keys().add(f"[127.0.0.1]:{port}", keytype, key)
    client.connect(
        "127.0.0.1", port, username=user, pkey=pkey, look_for_keys=False, allow_agent=False
    )
    return client


def _plain_exec(client: paramiko.SSHClient) -> None:
    _stdin, stdout, _stderr = client.exec_command("true")
    stdout.read()
    stdout.channel.recv_exit_status()


def bench(backend: str, n: int) -> tuple[float, float]:
    pkey, public = ssh.generate_client_key()
    with tempfile.TemporaryDirectory() as tmp, HostManager(pathlib.Path(tmp), backend) as hosts:
        info = hosts.start_host(
            "bench", authorized_keys=[public], firewall=lambda _src: "ACCEPT", files={}, commands=[]
        )
        ours = ssh.connect(
            "127.0.0.1", info.port, hostkeys=[info.hostkey], pkey=pkey, username=hosts.login_user
        )
        plain = _plain_client(info.port, info.hostkey, pkey, hosts.login_user)
        try:
            run_ms = _median_ms(lambda: ssh.run(ours, "true", check=True), n)
            plain_ms = _median_ms(lambda: _plain_exec(plain), n)
        finally:
            ours.close()
            plain.close()
    return run_ms, plain_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="round trips per client (default 200)")
    parser.add_argument("--backend", action="append", choices=["asyncssh", "openssh"])
    args = parser.parse_args(argv)
    backends = args.backend or ["asyncssh", "openssh"]
    header = f"{'backend':<10} {'run() ms':>9} {'exec_command ms':>16} {'ratio':>6}"
    print(f"{header}   (median of {args.n})")
    for backend in backends:
        if backend == "openssh" and not os.access(SSHD, os.X_OK):
            print(f"{backend:<10} skipped: {SSHD} missing")
            continue
        run_ms, plain_ms = bench(backend, args.n)
        print(f"{backend:<10} {run_ms:9.2f} {plain_ms:16.2f} {run_ms / plain_ms:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
