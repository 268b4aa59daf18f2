"""The simulator against a hostile local caller: what one may cost it and what one may see.

The limits are :class:`pytest_rerobots.sim.ServerLimits` (docs/security.md); the tests
lower them where that keeps them fast. The memory and connection tests run the simulator as
a process (``python -m pytest_rerobots.sim``) to measure it from outside.
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import helpers
import paramiko
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from test_sim_api import Api

from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.sim import ServerLimits, Simulator
from pytest_rerobots.sim.hosts import SSHD

FAST = dict(ready_delay=0.05, terminate_delay=0.05, not_found_window=0.0)


@contextmanager
def sim_process(tmp_path: Path, *args: str, nofile: int | None = None
                ) -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:
    """``python -m pytest_rerobots.sim`` with ``args``: (process, url, token); stopped after."""
    token_file = tmp_path / "sim-token"
    token_file.write_text("limits-token\n")

    with helpers.sim_process("--ssh-backend", "none", "--token-file", str(token_file), *args,
                             nofile=nofile) as sim:
        yield sim.proc, sim.url, sim.token
        assert sim.proc.poll() is None, "the simulator died"


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ---------------------------------------------------------------------- request bodies


def test_a_100_mb_body_is_a_quick_413_without_the_memory(tmp_path: Path) -> None:
    size = 100 * 1024 * 1024
    chunk = b"x" * (1024 * 1024)
    with sim_process(tmp_path) as (proc, url, token):
        assert requests.get(f"{url}/workspaces", timeout=5).status_code == 200
        before = _rss_kb(proc.pid)
        # Declared: answered from the headers, before any of the body.
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"POST /new/basic_kobuki HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer " + token.encode() + b"\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(size).encode() + b"\r\n\r\n")
            head = sock.recv(4096)
            answered = time.monotonic() - started
            assert head.startswith(b"HTTP/1.1 413 "), head
            assert b"larger than 1048576 bytes" in head or b"Connection: close" in head
            try:  # the rest, as a client that does not read answers would send it
                for _ in range(size // len(chunk)):
                    sock.sendall(chunk)
            except OSError:
                pass
        assert answered < 2.0
        # Chunked, so only reading tells: cut off at the limit.
        def body() -> Iterator[bytes]:
            for _ in range(size // len(chunk)):
                yield chunk
        try:
            res = requests.post(f"{url}/new/basic_kobuki", data=body(), timeout=30,
                                headers={"Authorization": f"Bearer {token}"})
            assert res.status_code == 413
        except requests.ConnectionError:
            pass  # the server may close before the client has sent it all: no answer read
        peak_growth = _rss_kb(proc.pid, "VmHWM") - before
        assert peak_growth < 32 * 1024, f"peak RSS grew by {peak_growth} kB"
        assert requests.get(f"{url}/instances", timeout=5,
                            headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert live_instances(url, token) == []


def live_instances(url: str, token: str) -> list[str]:
    res = requests.get(f"{url}/instances", timeout=5, headers={"Authorization": f"Bearer {token}"})
    return list(res.json()["workspace_instances"])


def test_body_limit_is_a_setting() -> None:
    with Simulator(ssh_backend="none", limits=ServerLimits(max_body=100), **FAST) as sim:
        api = Api(sim.url, sim.token)
        try:
            res = api.post("/new/basic_kobuki", data=" " * 101)
            assert res.status_code == 413
            assert res.json() == {"error_message": "request body larger than 100 bytes"}
            assert "close" in res.headers["Connection"]
            assert api.post("/new/basic_kobuki", data=" " * 99 + "{}").status_code == 413
            assert api.post("/new/basic_kobuki", json={}).status_code == 200
        finally:
            api.close()
    for bad in (dict(max_body=0), dict(idle_timeout=-1), dict(max_connections=True),
                dict(trust_forwarded_for="yes")):
        with pytest.raises(ConfigurationError, match="simulator limit"):
            ServerLimits(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("body", [
    "[" * 100_000,
    '{"a":' * 50_000 + "1" + "}" * 50_000,
    '{"sshkey": "' + "[" * 1000 + '", "x": ' + "[" * 65 + "]" * 65 + "}",
])
def test_deep_json_is_a_400(body: str) -> None:
    with Simulator(ssh_backend="none", **FAST) as sim:
        api = Api(sim.url, sim.token)
        try:
            res = api.post("/new/basic_kobuki", data=body)
            assert res.status_code == 400
            assert res.json() == {"error_message": "request body nests deeper than 64 levels"}
            # Brackets inside strings do not count, and 64 levels are fine.
            shallow = '{"eurl": "' + "[" * 1000 + '", "x": ' + "[" * 63 + "]" * 63 + "}"
            assert api.post("/new/basic_kobuki", data=shallow).status_code == 200
            assert len(sim.live_instances()) == 1
            sim.check()
        finally:
            api.close()


# ---------------------------------------------------------------------- X-Forwarded-For


def test_rotating_forwarded_for_does_not_reset_the_limit_untrusted() -> None:
    with Simulator(ssh_backend="none", ip_budget=3, **FAST) as sim:
        anon = Api(sim.url)
        try:
            codes = [anon.get("/workspaces", headers={"X-Forwarded-For": f"203.0.113.{n}"}
                              ).status_code for n in range(10)]
            assert codes == [200] * 4 + [403] * 6
            assert sim.world.accounts.window_count() == 1
        finally:
            anon.close()


def test_forwarded_for_sets_the_default_firewall_rule_only_when_trusted() -> None:
    for trusted, expected in ((False, "127.0.0.1"), (True, "198.51.100.9")):
        with Simulator(ssh_backend="none", limits=ServerLimits(trust_forwarded_for=trusted),
                       **FAST) as sim:
            api = Api(sim.url, sim.token)
            try:
                iid = api.post("/new/basic_kobuki").json()["id"]
                assert api.post(f"/firewall/{iid}",
                                headers={"X-Forwarded-For": "198.51.100.9"}).status_code == 200
                assert api.get(f"/firewall/{iid}").json() == {"rules": [[expected, "ACCEPT"]]}
            finally:
                api.close()


def test_the_rate_table_and_the_deployments_cache_stay_bounded() -> None:
    limits = ServerLimits(trust_forwarded_for=True, rate_table_max=50)
    with Simulator(ssh_backend="none", limits=limits, deployments_cache=60.0, **FAST) as sim:
        anon = Api(sim.url)
        try:
            for n in range(400):
                res = anon.get(f"/deployments?q=x{n}",
                               headers={"X-Forwarded-For": f"10.0.{n // 250}.{n % 250}"})
                assert res.status_code == 200
                assert sim.world.accounts.window_count() <= 50
            for n in range(1100):
                anon.get(f"/deployments?q=y{n}")
            assert sim._server is not None
            assert len(sim._server.app._deployments_cache) <= 1024
            # A bounded table forgets the oldest callers, not the newest.
            res = anon.get("/workspaces", headers={"X-Forwarded-For": "10.0.1.149"})
            assert res.headers["X-RateLimit-Remaining"] == str(sim.world.accounts.limits
                                                               .ip_budget - 2)
        finally:
            anon.close()


# ---------------------------------------------------------------------- connections


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room for this process's own 1100 client sockets (the simulator gets 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1100 + 200
    if soft >= want:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the hard limit on open files is {hard}; the test needs {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("many_files")
def test_1100_idle_and_slow_connections_do_not_stop_it(tmp_path: Path) -> None:
    args = ("--max-connections", "64", "--idle-timeout", "3", "--request-timeout", "1")
    with sim_process(tmp_path, *args, nofile=1024) as (proc, url, token):
        port = _port(url)
        held: list[socket.socket] = []
        try:
            for n in range(1100):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                if n % 2:  # slow: a request that never ends
                    sock.sendall(b"GET /workspaces HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                held.append(sock)
            started = time.monotonic()
            res = requests.get(f"{url}/instances", timeout=5,
                               headers={"Authorization": f"Bearer {token}"})
            assert res.status_code == 200
            assert time.monotonic() - started < 3
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            assert fds < 64 + 40, f"the simulator holds {fds} descriptors"
            # One trickling a byte at a time is cut off at the request deadline.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
                slow.sendall(b"GET /workspaces HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                began = time.monotonic()
                closed = False
                while time.monotonic() - began < 4:
                    try:
                        slow.sendall(b"a")
                        slow.settimeout(0.2)
                        if slow.recv(1024) == b"":
                            closed = True
                            break
                    except TimeoutError:
                        continue
                    except OSError:
                        closed = True
                        break
                assert closed, "a trickling request was never cut off"
                assert time.monotonic() - began < 3
        finally:
            for sock in held:
                sock.close()
        # (Slow requests cut off at the end of a header line were answered: anonymous
        # calls, charged to this address's budget; the token's is its own.)
        assert requests.get(f"{url}/instances", timeout=5,
                            headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_at_the_connection_cap_a_request_being_answered_is_closed_last() -> None:
    with Simulator(ssh_backend="none", limits=ServerLimits(max_connections=4), **FAST) as sim:
        sim.set_endpoint_fault("workspaces", latency=0.8)
        answers: list[int] = []
        worker = threading.Thread(target=lambda: answers.append(
            requests.get(f"{sim.url}/workspaces", timeout=10).status_code))
        worker.start()
        assert sim._server is not None
        deadline = time.monotonic() + 5
        while not sim._server._answering:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        idle = [socket.create_connection(("127.0.0.1", _port(sim.url)), timeout=5)
                for _ in range(10)]
        try:
            worker.join(timeout=10)
            assert answers == [200]
            # The idle ones went instead: the oldest first, the newest still open.
            assert idle[0].recv(16) == b""
            assert sim._server.open_connections() <= 4
        finally:
            for sock in idle:
                sock.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    limits = ServerLimits(idle_timeout=0.3)
    with Simulator(ssh_backend="none", limits=limits, **FAST) as sim:
        with socket.create_connection(("127.0.0.1", _port(sim.url)), timeout=3) as sock:
            began = time.monotonic()
            assert sock.recv(1024) == b""
            assert time.monotonic() - began < 2.5
        assert sim._server is not None
        deadline = time.monotonic() + 2
        while sim._server.open_connections() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim._server.open_connections() == 0


def _exchange(conn: http.client.HTTPConnection, method: str, path: str,
              body: bytes | None = None, headers: dict[str, str] | None = None
              ) -> http.client.HTTPResponse:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    response.read()
    return response


def test_a_connection_is_kept_for_the_next_request() -> None:
    """HTTP/1.1 connections stay open, as the real service's do: one socket serves a GET,
    a POST with a body and another GET, and the server says nothing of closing."""
    with Simulator(ssh_backend="none", **FAST) as sim:
        auth = {"Authorization": f"Bearer {sim.token}", "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", _port(sim.url), timeout=5)
        try:
            first = _exchange(conn, "GET", "/workspaces")
            sock = conn.sock
            assert first.status == 200 and first.getheader("Connection") is None
            made = _exchange(conn, "POST", "/new/basic_kobuki", b"{}", auth)
            assert made.status == 200 and made.getheader("Connection") is None
            again = _exchange(conn, "GET", "/instances", headers=auth)
            assert again.status == 200
            assert conn.sock is sock, "the connection was closed between requests"
        finally:
            conn.close()


@pytest.mark.parametrize("case", ["asked", "http/1.0", "refused body"])
def test_a_connection_is_closed_when_it_cannot_serve_another_request(case: str) -> None:
    with Simulator(ssh_backend="none", limits=ServerLimits(max_body=100), **FAST) as sim:
        conn = http.client.HTTPConnection("127.0.0.1", _port(sim.url), timeout=5)
        if case == "http/1.0":
            conn._http_vsn, conn._http_vsn_str = 10, "HTTP/1.0"  # type: ignore[attr-defined]
        try:
            if case == "refused body":
                answer = _exchange(conn, "POST", "/new/basic_kobuki", b"x" * 1000,
                                   {"Content-Type": "application/json"})
                assert answer.status == 413
            else:
                answer = _exchange(conn, "GET", "/workspaces",
                                   headers={"Connection": "close"} if case == "asked" else {})
                assert answer.status == 200
            assert answer.getheader("Connection") == "close"
        finally:
            conn.close()


def test_stopping_the_simulator_hangs_up_a_kept_connection() -> None:
    sim = Simulator(ssh_backend="none", **FAST).start()
    try:
        with socket.create_connection(("127.0.0.1", _port(sim.url)), timeout=5) as sock:
            sock.sendall(b"GET /workspaces HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            sim.stop()
            while sock.recv(4096):  # the end of the connection, not the socket's timeout
                pass
    finally:
        sim.stop()


# ---------------------------------------------------------------------- owners and keys


def test_another_token_sees_nothing_of_an_instance() -> None:
    with Simulator(ssh_backend="none", **FAST) as sim:
        owner = Api(sim.url, sim.token)
        other = Api(sim.url, sim.add_user("mallory"))
        try:
            iid = owner.post("/new/basic_kobuki").json()["id"]
            deadline = time.monotonic() + 5
            while owner.get(f"/instance/{iid}").json()["status"] != "READY":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert owner.get(f"/instance/{iid}/sshkey").json()["key"].startswith("-----BEGIN")
            for method, path in [("GET", f"/instance/{iid}"), ("GET", f"/instance/{iid}/sshkey"),
                                 ("GET", f"/firewall/{iid}"), ("POST", f"/firewall/{iid}"),
                                 ("DELETE", f"/firewall/{iid}"), ("GET", f"/vpn/{iid}"),
                                 ("POST", f"/vpn/{iid}"), ("POST", f"/terminate/{iid}")]:
                res = other.session.request(method, other.url + path, timeout=5)
                assert res.status_code == 404, (method, path, res.status_code)
                assert res.json() == {"error_message": "instance not found"}, (method, path)
                assert "BEGIN" not in res.text
            assert other.post(f"/instance/{iid}/ka").status_code == 404
            assert other.get("/instances?include_terminated").json()["workspace_instances"] == []
            assert other.get("/instances?user=tester").status_code == 403
            assert owner.get(f"/firewall/{iid}").json() == {"rules": []}
            assert [i.id for i in sim.live_instances()] == [iid]
        finally:
            owner.close()
            other.close()


def _pinned(hostkey_line: str, port: int) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    kind, data = hostkey_line.split()[:2]
    client.get_host_keys().add(f"[127.0.0.1]:{port}", kind,
                               paramiko.PKey.from_type_string(kind, base64.b64decode(data)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


@pytest.mark.parametrize("backend", ["asyncssh", "openssh"])
def test_the_robot_admits_only_the_sent_key_and_the_generated_key(backend: str) -> None:
    if backend == "openssh" and not os.access(SSHD, os.X_OK):
        if os.environ.get("REROBOTS_REQUIRE_OPENSSH") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_OPENSSH=1 but {SSHD} is missing")
        pytest.skip(f"{SSHD} is missing")
    sent = ed25519.Ed25519PrivateKey.generate()
    stranger = ed25519.Ed25519PrivateKey.generate()
    sent_public = sent.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH).decode()

    def pkey(key: ed25519.Ed25519PrivateKey) -> paramiko.PKey:
        text = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption()).decode()
        return paramiko.Ed25519Key.from_private_key(io.StringIO(text))

    with Simulator(ssh_backend=backend, **FAST) as sim:
        api = Api(sim.url, sim.token)
        try:
            iid = api.post("/new/basic_kobuki", json={"sshkey": sent_public}).json()["id"]
            deadline = time.monotonic() + 10
            while (info := api.get(f"/instance/{iid}").json())["status"] != "READY":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            api.post(f"/firewall/{iid}")
            generated = paramiko.RSAKey.from_private_key(
                io.StringIO(api.get(f"/instance/{iid}/sshkey").json()["key"]))
            port = info["fwd"]["port"]
            for key, admitted in ((pkey(sent), True), (generated, True),
                                  (pkey(stranger), False)):
                client = _pinned(info["hostkeys"][0], port)
                try:
                    if admitted:
                        client.connect("127.0.0.1", port, username="root", pkey=key,
                                       look_for_keys=False, allow_agent=False, timeout=10)
                        _, out, _ = client.exec_command("echo in")
                        assert out.read() == b"in\n"
                    else:
                        with pytest.raises(paramiko.AuthenticationException):
                            client.connect("127.0.0.1", port, username="root",
                                           pkey=key, look_for_keys=False, allow_agent=False,
                                           timeout=10)
                finally:
                    client.close()
            api.post(f"/terminate/{iid}")
        finally:
            api.close()
