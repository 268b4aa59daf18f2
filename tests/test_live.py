"""Live processes and forwarded ports (pytest_rerobots.live), on real simulated hosts of both
backends."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request

import pytest
import test_ssh

from pytest_rerobots import ssh
from pytest_rerobots.errors import (
    CommandTimeout,
    ExpectEOF,
    ExpectTimeout,
    is_infrastructure,
)
from pytest_rerobots.transcript import Transcript

# The robot fixtures of test_ssh: a simulated host of each backend and a connection to it.
backend = test_ssh.backend
client_key = test_ssh.client_key
robot = test_ssh.robot
conn = test_ssh.conn

PROMPT = "printf 'name? '; read name; echo \"hello $name\"; sleep 30"


def _running(conn: ssh.Connection, pid: int) -> bool:
    return conn.run(f"kill -0 {pid}").exit_status == 0


def _gone(conn: ssh.Connection, pattern: str) -> bool:
    """No process on the host matches ``pattern`` (within 5 s: a killed one is reaped)."""
    deadline = time.monotonic() + 5
    while conn.run(f"pgrep -f {pattern!r}").exit_status == 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_prompt_answer_and_close_ends_the_process(conn: ssh.Connection) -> None:
    conn.transcript = Transcript()
    conn.label = "robot-1"
    proc = conn.spawn(PROMPT)
    first = proc.expect("name\\? ", timeout=10)
    assert first.index == 0 and first.text == "name? "
    proc.sendline("kobuki")
    found = proc.expect(["nope", re.compile(r"hello (\w+)")], timeout=10)
    assert found.index == 1 and found.match.group(1) == "kobuki"
    assert proc.pid is not None and _running(conn, proc.pid)
    started = time.monotonic()
    status = proc.close()
    assert time.monotonic() - started < 5
    assert status == 128 + 15  # SIGTERM, to the whole group: sh and its sleep
    assert _gone(conn, "[h]ello .name")
    assert _gone(conn, "[s]leep 30")
    # The test's own checks (run) are recorded too; close()'s signals are not.
    entries = [e for e in conn.transcript.take()[0] if e.kind == "spawn"]
    assert [(e.kind, e.instance, e.status) for e in entries] == [("spawn", "robot-1", 143)]
    assert "hello kobuki" in entries[0].stdout and "__rerobots_pid__" not in entries[0].stdout
    assert entries[0].note == "ended by close()"


def test_expect_timeout_shows_the_tail_and_is_a_test_failure(conn: ssh.Connection) -> None:
    proc = conn.spawn("echo booting; echo 'stage 2' >&2; sleep 30")
    with pytest.raises(ExpectTimeout) as info:
        proc.expect("login:", timeout=0.5)
    assert "did not print 'login:' within 0.5 s" in str(info.value)
    assert "booting\nstage 2" in info.value.output
    assert not is_infrastructure(info.value)
    proc.close()


def test_expect_eof_and_wait(conn: ssh.Connection) -> None:
    proc = conn.spawn("echo done; exit 3")
    with pytest.raises(ExpectEOF, match=r"ended with status 3 before printing 'never'"):
        proc.expect("never", timeout=10)
    assert proc.wait(10) == 3
    assert proc.read_available() == "done\n"
    assert proc.close() == 3


def test_wait_timeout_then_read_available(conn: ssh.Connection) -> None:
    proc = conn.spawn("cat")
    proc.sendline("one")
    proc.expect("one\n", timeout=10)
    with pytest.raises(CommandTimeout, match="still running"):
        proc.wait(0.2)
    proc.send("two\n")
    proc.expect("two", timeout=10)
    assert proc.read_available() == "\n"
    proc.send_eof()
    assert proc.wait(10) == 0


def test_close_kills_what_ignores_sigterm(conn: ssh.Connection) -> None:
    proc = conn.spawn("trap '' TERM; echo ready; while :; do sleep 0.1; done")
    proc.expect("ready", timeout=10)
    # 137 when the command leads its session (a robot's sshd, the asyncssh backend); the
    # simulator's sshd reports its session wrapper's 143, the command being KILLed after.
    assert proc.close(grace=0.5) in (128 + 9, 128 + 15)
    assert _gone(conn, "[t]rap .. TERM")


def test_tracker_closes_what_was_opened_since_the_mark(conn: ssh.Connection) -> None:
    kept = conn.spawn("sleep 30")
    mark = conn.tracker.mark()
    ended = conn.spawn("sleep 30")
    port = conn.forward(22)
    assert conn.tracker.close_since(mark) == []
    assert ended.exit_status is not None and kept.exit_status is None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).recv(1)
    kept.close()


def test_pty(conn: ssh.Connection, backend: str) -> None:
    proc = conn.spawn("tty; printf 'login: '; read user; echo \"user=$user\"; sleep 30",
                      pty=True)
    proc.expect("/dev/pts/", timeout=10)
    proc.expect("login: ", timeout=10)
    proc.sendline("root")
    proc.expect("user=root", timeout=10)
    assert proc.close() is not None
    assert _gone(conn, "[u]ser=")


# -- forwarded ports ---------------------------------------------------------------------


def test_forward_to_an_http_server_two_connections_at_once(conn: ssh.Connection) -> None:
    (conn.run("mkdir -p www && echo 'robot page' > www/index.html", check=True))
    server = conn.spawn("exec python3 -u -m http.server --bind 127.0.0.1 0 -d www")
    found = server.expect(r"port (\d+)", timeout=10)
    port = conn.forward(int(found.match.group(1)))
    # Two connections open together: both are served while the other is still open.
    first = socket.create_connection(("127.0.0.1", port), timeout=10)
    second = socket.create_connection(("127.0.0.1", port), timeout=10)
    bodies: list[bytes] = []
    for sock in (second, first):
        sock.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
    for sock in (first, second):
        with sock:
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            bodies.append(data)
    assert all(b.startswith(b"HTTP/1.0 200") and b.endswith(b"robot page\n") for b in bodies)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as answer:
        assert answer.read() == b"robot page\n"
    server.close()


def test_forward_many_parallel_echoes(conn: ssh.Connection) -> None:
    server = conn.spawn(
        "exec python3 -u -c \"import socketserver as s\n"
        "class H(s.StreamRequestHandler):\n"
        "  def handle(self): self.wfile.write(self.rfile.readline().upper())\n"
        "srv = s.ThreadingTCPServer(('127.0.0.1', 0), H); print('port', srv.server_address[1])\n"
        "srv.serve_forever()\"")
    port = conn.forward(int(server.expect(r"port (\d+)", timeout=10).match.group(1)))
    answers: dict[int, bytes] = {}

    def talk(k: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"robot %d\n" % k)
            answers[k] = sock.makefile("rb").readline()

    threads = [threading.Thread(target=talk, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {k: b"ROBOT %d\n" % k for k in range(8)}
    server.close()


def test_forward_to_a_closed_port_closes_the_local_connection(conn: ssh.Connection) -> None:
    with socket.socket() as probe:  # a port nobody listens on, on the same machine
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    port = conn.forward(free)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert sock.recv(1) == b""


def test_closing_the_connection_ends_its_processes_and_forwards(robot: test_ssh.Robot) -> None:
    first = ssh.Connection(robot.connect())
    proc = first.spawn("echo up; sleep 31")
    proc.expect("up", timeout=10)
    port = first.forward(22)
    first.close()
    assert proc.exit_status is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).recv(1)
    with ssh.Connection(robot.connect()) as second:
        assert _gone(second, "[s]leep 31")
