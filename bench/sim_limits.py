"""The simulator's HTTP server before and after its limits: latency and the attacks of issue 14.

::

    git worktree add /some/dir main          # or any checkout to compare with
    python bench/sim_limits.py --old /some/dir [--new .] [--rounds 20]

Each side runs ``python -m pytest_rerobots.sim`` from its own tree (``PYTHONPATH``), both at
once, with the same catalog. Latency: rounds of keep-alive calls, alternating between the
two sides so that load on the machine falls on both alike; it prints the medians and the
ratio new/old. Then each side in turn faces the attacks: a 100 MB body (time to an answer,
peak RSS growth), deeply nested JSON, a rotating ``X-Forwarded-For`` against the anonymous
budget, and 1100 idle or slow connections under ``ulimit -n 1024``. It asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

from pytest_rerobots.sim.launch import start_process

CATALOG = """
[rate_limits]
ip_budget = 5

[timings]
ready_delay = 0.05
terminate_delay = 0.05

[faults]
not_found_window = 0.0
"""


class Side:
    """One simulator process run from ``tree``."""

    def __init__(self, name: str, tree: Path, config: Path, nofile: int | None = None) -> None:
        self.name = name
        self.tree = tree
        self.config = config
        self.nofile = nofile
        self.url = self.token = ""

    def __enter__(self) -> Side:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REROBOTS_")}
        env["PYTHONPATH"] = str(self.tree)
        try:
            self.sim = start_process("--ssh-backend", "none", "--config", str(self.config),
                                     env=env, cwd=self.tree, nofile=self.nofile)
        except RuntimeError as exc:
            raise RuntimeError(f"{self.name}: {exc}") from exc
        self.proc = self.sim.proc
        self.url, self.token = self.sim.url, self.sim.token
        return self

    def __exit__(self, *exc: object) -> None:
        self.sim.stop()

    def status_kib(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return -1

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def latency(sides: list[Side], rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """Median milliseconds per call, by side and call, alternating sides every round."""
    sessions = {}
    ids = {}
    for side in sides:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {side.token}"
        ids[side.name] = session.post(f"{side.url}/new/basic_kobuki", timeout=10).json()["id"]
        sessions[side.name] = session
    calls = {
        "GET /workspaces": lambda s, u, i: s.get(f"{u}/workspaces", timeout=10),
        "GET /instance/:id": lambda s, u, i: s.get(f"{u}/instance/{i}", timeout=10),
        "POST /firewall/:id": lambda s, u, i: s.post(f"{u}/firewall/{i}",
                                                     json={"src": "10.0.0.1"}, timeout=10),
        "new connection, GET /": lambda s, u, i: requests.get(f"{u}/", timeout=10),
    }
    times: dict[str, dict[str, list[float]]] = {s.name: {c: [] for c in calls} for s in sides}
    for number in range(rounds):
        # Each side goes first every other round.
        for side in (sides if number % 2 == 0 else sides[::-1]):
            for call, fn in calls.items():
                for _ in range(per_round):
                    began = time.perf_counter()
                    fn(sessions[side.name], side.url, ids[side.name]).raise_for_status()
                    times[side.name][call].append((time.perf_counter() - began) * 1000)
    for session in sessions.values():
        session.close()
    return {name: {c: statistics.median(v) for c, v in by_call.items()}
            for name, by_call in times.items()}


def big_body(side: Side) -> str:
    size = 100 * 1024 * 1024
    chunk = b"x" * (1024 * 1024)
    before = side.status_kib("VmRSS")
    began = time.monotonic()
    status = "no answer"
    try:
        with socket.create_connection(("127.0.0.1", side.port), timeout=60) as sock:
            sock.sendall(b"POST /new/basic_kobuki HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + side.token.encode() + b"\r\nContent-Length: "
                         + str(size).encode() + b"\r\n\r\n")
            sent = 0
            status = "took all 100 MiB"
            try:
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
                    sent += len(chunk)
            except OSError as exc:  # the server hung up: did it answer first?
                status = f"hung up after {sent // 2**20} MiB ({type(exc).__name__})"
            answer = sock.recv(4096).split(b"\r\n", 1)[0].decode()
            status = f"{answer!r}, {status}" if answer else status
    except OSError as exc:
        status = f"{status} ({type(exc).__name__})"
    took = time.monotonic() - began
    peak = side.status_kib("VmHWM") - before
    time.sleep(0.5)
    after = side.status_kib("VmRSS") - before
    return (f"{status} in {took:.2f} s; peak RSS +{peak // 1024} MiB, "
            f"after +{after // 1024} MiB")


def deep_json(side: Side) -> str:
    res = requests.post(f"{side.url}/new/basic_kobuki", data="[" * 100_000, timeout=30,
                        headers={"Authorization": f"Bearer {side.token}"})
    return f"{res.status_code} {res.text[:60]!r}"


def rotating_xff(side: Side) -> str:
    codes = [requests.get(f"{side.url}/workspaces", timeout=10,
                          headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
             for n in range(20)]
    before = side.status_kib("VmRSS")
    for n in range(20_000):
        requests.get(f"{side.url}/workspaces", timeout=10,
                     headers={"X-Forwarded-For": f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"})
    grown = side.status_kib("VmRSS") - before
    return (f"budget 5: {codes.count(200)}/20 served; 20000 addresses: RSS +{grown} KiB")


def slow_connections(side: Side) -> str:
    held = []
    opened = 0
    try:
        for n in range(1100):
            try:
                sock = socket.create_connection(("127.0.0.1", side.port), timeout=5)
            except OSError:
                continue
            opened += 1
            if n % 2:
                try:
                    sock.sendall(b"GET /workspaces HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                except OSError:
                    pass
            held.append(sock)
        time.sleep(0.5)
        began = time.monotonic()
        try:
            res = requests.get(f"{side.url}/instances", timeout=10,
                               headers={"Authorization": f"Bearer {side.token}"})
            answer = f"{res.status_code} in {time.monotonic() - began:.2f} s"
        except requests.RequestException as exc:
            answer = f"no answer in {time.monotonic() - began:.1f} s ({type(exc).__name__})"
        fds = len(os.listdir(f"/proc/{side.proc.pid}/fd"))
    finally:
        for sock in held:
            sock.close()
    return f"{opened} opened; a caller got {answer}; simulator fds {fds}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="checkout to compare with")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--per-round", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "catalog.toml"
        config.write_text(CATALOG)
        roomy = Path(tmp) / "roomy.toml"
        roomy.write_text(CATALOG.replace("ip_budget = 5", "ip_budget = 1000000"))
        trees = {"old": args.old.resolve(), "new": args.new.resolve()}
        print(f"$ {' '.join(sys.argv)}")
        print(f"cpus {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
        with Side("old", trees["old"], roomy) as old, Side("new", trees["new"], roomy) as new:
            medians = latency([old, new], args.rounds, args.per_round)
        print(f"\nlatency, median ms over {args.rounds * args.per_round} calls each")
        print(f"{'call':28} {'old':>8} {'new':>8} {'new/old':>8}")
        for call in medians["old"]:
            o, n = medians["old"][call], medians["new"][call]
            print(f"{call:28} {o:8.3f} {n:8.3f} {n / o:8.2f}")
        for attack in (big_body, deep_json, rotating_xff):
            print(f"\n{attack.__name__}")
            for name, tree in trees.items():
                with Side(name, tree, roomy if attack is big_body else config) as side:
                    print(f"  {name}: {attack(side)}")
        print("\nslow_connections (ulimit -n 1024)")
        for name, tree in trees.items():
            with Side(name, tree, config, nofile=1024) as side:
                print(f"  {name}: {slow_connections(side)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
