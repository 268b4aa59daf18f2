"""The plugin's side of live processes, forwarded ports and testinfra: what a test opened
ends at its teardown, whatever the instance's scope; ``rerobots_host``."""

from __future__ import annotations

import pytest

from pytest_rerobots.sim import Simulator


@pytest.mark.parametrize("scope", ["session", "function"])
def test_processes_and_forwards_end_with_the_test(pytester: pytest.Pytester,
                                                   sim_env: Simulator, scope: str) -> None:
    pytester.makepyfile(
        """
        import socket, pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki")
        seen = {}

        def test_opens(rerobots_instance):
            server = rerobots_instance.spawn(
                "exec python3 -u -m http.server --bind 127.0.0.1 0")
            port = int(server.expect(r"port (\\d+)", timeout=10).match.group(1))
            proc = rerobots_instance.spawn("echo up; sleep 300")
            proc.expect("up", timeout=10)
            seen.update(pid=proc.pid, port=rerobots_instance.forward(port),
                        id=rerobots_instance.id)
            with socket.create_connection(("127.0.0.1", seen["port"]), timeout=5) as s:
                s.sendall(b"HEAD / HTTP/1.0\\r\\n\\r\\n")
                assert s.recv(12) == b"HTTP/1.0 200"

        def test_they_ended(rerobots_instance):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", seen["port"]), timeout=5).recv(1)
            if rerobots_instance.id == seen["id"]:  # the same instance (session scope)
                assert rerobots_instance.run(f"kill -0 {seen['pid']}").exit_status != 0
            else:
                assert "SCOPE" == "function"

        def test_expect_timeout_is_a_failure(rerobots_instance):
            rerobots_instance.spawn("echo 'U-Boot 2024.01'; sleep 300").expect(
                "login:", timeout=0.3)
        """.replace("SCOPE", scope)
    )
    result = pytester.runpytest(f"--rerobots-scope={scope}")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*ExpectTimeout: \"echo 'U-Boot 2024.01'; sleep 300\" did not print 'login:' "
        "within 0.3 s; it printed:",
        "*U-Boot 2024.01",
    ])
    assert sim_env.token not in result.stdout.str()


def test_rerobots_host_is_testinfra_on_the_pinned_connection(pytester: pytest.Pytester,
                                                              sim_env: Simulator) -> None:
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki")

        def test_host(rerobots_host, rerobots_instance):
            assert rerobots_host.backend.connection is rerobots_instance.connection
            rerobots_instance.run("printf 'speed=3\\\\n' > robot.conf", check=True)
            conf = rerobots_host.file("robot.conf")
            assert conf.exists and conf.is_file and conf.contains("speed=3")
            assert not rerobots_host.file("/nonexistent/robot").exists
            out = rerobots_host.run("echo %s; exit 4", "a b")
            assert (out.rc, out.stdout) == (4, "a b\\n")
            assert rerobots_host.check_output("echo hi") == "hi"
            assert rerobots_host.exists("sh")
            assert rerobots_host.system_info.type == "linux"
            assert not rerobots_host.service("rerobots-no-such-unit").is_running
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


def test_rerobots_host_without_testinfra_says_what_to_install(pytester: pytest.Pytester,
                                                               sim_env: Simulator) -> None:
    pytester.makeconftest(
        """
        import sys
        sys.modules["testinfra"] = None  # as if pytest-testinfra were not installed
        """
    )
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki")
        def test_host(rerobots_host):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:testinfra")
    result.assert_outcomes(errors=1)
    assert ("rerobots_host needs pytest-testinfra: pip install 'pytest-rerobots[testinfra]'"
            in result.stdout.str())
    assert "During handling" not in result.stdout.str()
