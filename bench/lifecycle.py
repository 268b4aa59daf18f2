"""Benchmark: the instance lifecycle of pytest-rerobots beside a naive loop with the
official client (``rerobots==0.11.0``) that polls every second.

Two figures, each for both, side by side against one simulator:

1. overhead: seconds from "give me a robot" to a connected SSH session, minus the
   simulator's configured ready delay (target for ours: under 0.150 s on loopback);
2. API calls per lifecycle (rent, wait, firewall, connect, terminate) with a long ready
   delay, and how late READY was noticed (target for ours: at most 20 calls, READY
   noticed within 2 s).

Usage: python bench/lifecycle.py [--rounds 10] [--short-delay 0.5] [--long-delay 30]
This is a measurement script, not a test; it prints ratios, it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import paramiko
import requests
from rerobots.api import APIClient

from pytest_rerobots import RerobotsClient
from pytest_rerobots.sim import Simulator
from pytest_rerobots.ssh import generate_client_key

WTYPE = "basic_kobuki"


class CallCounter:
    """Counts HTTP requests per thread (the official client calls ``requests.get`` etc.,
    which all end in ``Session.request``)."""

    def __init__(self) -> None:
        self.by_thread: dict[int, int] = {}
        self._original = requests.sessions.Session.request
        counter = self

        def counted(session: requests.Session, *args: object, **kwargs: object) -> object:
            ident = threading.get_ident()
            counter.by_thread[ident] = counter.by_thread.get(ident, 0) + 1
            return counter._original(session, *args, **kwargs)

        requests.sessions.Session.request = counted  # type: ignore[method-assign]

    def calls(self) -> int:
        return self.by_thread.get(threading.get_ident(), 0)

    def restore(self) -> None:
        requests.sessions.Session.request = self._original  # type: ignore[method-assign]


def ours(sim: Simulator, target: str, fast: bool = False) -> dict[str, float]:
    """One lifecycle with ``RerobotsClient.acquire``; returns seconds and calls.
    ``fast`` polls as the fixtures do under ``--rerobots-sim``."""
    with RerobotsClient(sim.token, sim.url, ignore_env=True) as api:
        begun = time.perf_counter()
        with api.acquire(target, fast_polling=fast) as robot:
            connected = time.perf_counter()
            robot.run("true")
            ready_seen = robot.timings.ready_at or 0.0
        return {"to_ssh": connected - begun, "calls": api.calls, "ready_seen": ready_seen}


def naive(sim: Simulator, target: str, counter: CallCounter) -> dict[str, float]:
    """The loop a user writes with the official client: request, poll every second,
    open the firewall, connect with paramiko's defaults, terminate."""
    pkey, public = generate_client_key()
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
    client = paramiko.SSHClient()
    keytype, blob = info["hostkeys"][0].split()[:2]
    host = f"[{info['fwd']['ipv4']}]:{info['fwd']['port']}"
    client.get_host_keys().add(host, keytype, paramiko.PKey.from_type_string(keytype,
                                                                           _b64(blob)))
    client.connect(info["fwd"]["ipv4"], info["fwd"]["port"], username="root", pkey=pkey,
                   look_for_keys=False, allow_agent=False)
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


def _b64(blob: str) -> bytes:
    import base64

    return base64.b64decode(blob)


def wait_free(api: RerobotsClient, deployment: str) -> None:
    """Until the deployment's last instance is TERMINATED (TERMINATING still holds it)."""
    while api.queue_length(deployment):
        time.sleep(0.01)


# The official client reads a 404 right after POST /new as "no such instance", so both
# simulators answer at once (docs/simulator-catalog.md, the example for rerobots 0.11).
def overhead(rounds: int, delay: float, counter: CallCounter) -> None:
    with Simulator(ready_delay=delay, terminate_delay=0.05, not_found_window=0) as sim:
        api = RerobotsClient(sim.token, sim.url)
        kobukis = api.deployments(WTYPE)["workspace_deployments"]
        fast_s, frugal_s, naive_s = [], [], []
        for _ in range(rounds):
            fast_s.append(ours(sim, kobukis[0], fast=True)["to_ssh"] - delay)
            wait_free(api, kobukis[0])
            frugal_s.append(ours(sim, kobukis[0])["to_ssh"] - delay)
            wait_free(api, kobukis[0])
            naive_s.append(naive(sim, kobukis[1], counter)["to_ssh"] - delay)
            wait_free(api, kobukis[1])
    fast, frugal, base = (statistics.median(x) for x in (fast_s, frugal_s, naive_s))
    print(f"overhead (to connected SSH minus ready delay {delay:g} s), median of {rounds}:")
    print(f"  pytest-rerobots, simulator polling (50 ms)   {fast * 1000:8.1f} ms  "
          f"ratio to naive {fast / base:.3f}")
    print(f"  pytest-rerobots, real-API polling (frugal)   {frugal * 1000:8.1f} ms  "
          f"ratio to naive {frugal / base:.3f}")
    print(f"  naive loop, official client, 1 s polls       {base * 1000:8.1f} ms")


def calls(delay: float, counter: CallCounter) -> None:
    with Simulator(ready_delay=delay, terminate_delay=0.05, not_found_window=0) as sim:
        kobukis = RerobotsClient(sim.token, sim.url).deployments(WTYPE)["workspace_deployments"]
        results: dict[str, dict[str, float]] = {}
        started = time.time()
        threads = [
            threading.Thread(target=lambda: results.__setitem__("ours", ours(sim, kobukis[0]))),
            threading.Thread(target=lambda: results.__setitem__(
                "naive", naive(sim, kobukis[1], counter))),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    print(f"API calls per lifecycle, ready delay {delay:g} s (both run at once):")
    for name in ("ours", "naive"):
        late = results[name]["ready_seen"] - started - delay
        print(f"  {name:6s} {int(results[name]['calls']):4d} calls, READY noticed "
              f"{late:5.2f} s after it happened")
    print(f"  ratio ours/naive {results['ours']['calls'] / results['naive']['calls']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--short-delay", type=float, default=0.5)
    parser.add_argument("--long-delay", type=float, default=30.0)
    args = parser.parse_args(argv)
    counter = CallCounter()
    try:
        overhead(args.rounds, args.short_delay, counter)
        calls(args.long_delay, counter)
    finally:
        counter.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
