"""Issue 22 item 5: ``run("sleep 300 &")`` waits until the timeout, as SSH keeps the
channel open while a background process holds the output; the ``CommandTimeout`` says so,
with the fix (redirect the output, or ``spawn()``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from conftest import FAST

from pytest_rerobots import CommandTimeout, Run
from pytest_rerobots.instance import Instance
from pytest_rerobots.sim import Simulator
from pytest_rerobots.sim.hosts import SSHD

pytest_plugins = ["pytester"]


@pytest.fixture(params=["asyncssh", "openssh"])
def robot(request: pytest.FixtureRequest) -> Iterator[Instance]:
    if request.param == "openssh" and not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} is missing")
    with Simulator(ssh_backend=request.param, **FAST) as sim, \
            Run(sim.url, sim.token, ledger=None, watchdog=False, signals=False) as run, \
            run.acquire("basic_kobuki") as inst:
        yield inst


def test_a_trailing_ampersand_is_named(robot: Instance):
    with pytest.raises(CommandTimeout) as timed_out:
        robot.run("sleep 30 &", timeout=0.5)
    text = str(timed_out.value)
    assert text.splitlines()[0].startswith("command 'sleep 30 &' on ")
    assert "in the background" in text.splitlines()[0]
    assert "2>&1 < /dev/null &" in text and "spawn(" in text
    assert "a longer timeout" not in text
    assert timed_out.value.background


def test_output_held_open_after_the_shell_exited_is_named(robot: Instance):
    with pytest.raises(CommandTimeout) as timed_out:
        robot.run("sleep 30 & echo started", timeout=1.0)
    text = str(timed_out.value)
    assert "started" in timed_out.value.stdout
    if robot.ssh.get_transport() is not None and "OpenSSH" in \
            robot.ssh.get_transport().remote_version:
        # OpenSSH (a real robot's) sends the exit status while the output stays open.
        assert "its shell exited (status 0) but the output stayed open" in text
        assert "spawn(" in text
    else:
        assert "a longer timeout" in text  # the status comes only with the end of output


def test_the_redirected_form_returns_at_once(robot: Instance):
    result = robot.run("sleep 30 > /tmp/bg.log 2>&1 < /dev/null &", timeout=10)
    assert result.ok and result.duration < 10


def test_a_plain_hung_command_keeps_the_old_hint(robot: Instance):
    with pytest.raises(CommandTimeout) as timed_out:
        robot.run("sleep 30", timeout=0.5)
    text = str(timed_out.value)
    assert "a longer timeout: run(..., timeout=S)" in text
    assert "background" not in text
    assert not timed_out.value.background


def test_in_a_pytest_run(pytester: pytest.Pytester, sim_env):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_daemon(rerobots_instance):
            rerobots_instance.run("sleep 300 &", timeout=1)
    """)
    result = pytester.runpytest("--rerobots-queue-timeout=5")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*CommandTimeout: command 'sleep 300 &' on *did not finish "
                                 "within 1 s: it ends with '&'*",
                                 "*redirect its output and stdin*spawn(*"])
