"""An example hardware-in-the-loop suite for a Kobuki robot's firmware.

On the simulator, with no account::

    pytest examples --rerobots-sim

On a real robot, with a token::

    REROBOTS_API_TOKEN=... pytest examples --rerobots-wtype=basic_kobuki

A real ``basic_kobuki`` runs the tests that need only what every such robot has (SSH, a
shell, SFTP, ``sha256sum``). The others flash and read the robot with this suite's own
tools, ``bin/flash-fw`` and ``bin/robot-status``. Only the simulator's catalog has those
(pretend ones); on a real robot they are skipped unless ``--robot-tools DIR`` gives
yours, which are then uploaded to each robot (see ``conftest.py``).
"""

from __future__ import annotations

import pytest

from pytest_rerobots import CommandFailed

# -- what every basic_kobuki has ---------------------------------------------------------


def test_upload_keeps_the_image_intact(rerobots_instance, firmware):
    rerobots_instance.put(str(firmware.path), "fw.bin")
    result = rerobots_instance.run("sha256sum fw.bin", check=True)
    assert result.stdout.split()[0] == firmware.sha256


# -- with the suite's robot tools (the simulator's pretend ones, or --robot-tools) ---------


def test_flashing_reports_the_new_version(rerobots_instance, flash, firmware):
    flashed = flash(rerobots_instance)
    assert f"version {firmware.version}" in flashed.stdout
    status = rerobots_instance.run("bin/robot-status", check=True)
    assert f"fw={firmware.version}" in status.stdout


def test_flashing_a_missing_image_fails_cleanly(rerobots_instance, robot_tools):
    robot_tools(rerobots_instance)
    with pytest.raises(CommandFailed) as failed:
        rerobots_instance.run("bin/flash-fw no-such-image.bin", check=True)
    assert failed.value.result.exit_status == 2
    assert "no-such-image.bin" in failed.value.result.stderr


def test_base_reports_healthy(rerobots_instance, robot_tools, rerobots_ssh):
    robot_tools(rerobots_instance)
    # The plain paramiko client is there for code that already speaks paramiko.
    _, stdout, _ = rerobots_ssh.exec_command("bin/robot-status")
    assert "base=ok" in stdout.read().decode()


@pytest.mark.rerobots("fixed_misty2")
def test_misty_head_camera_answers(rerobots_instance, robot_tools):
    # Skipped in this suite's default run (rerobots_wtype = basic_kobuki in pytest.ini);
    # run it with --rerobots-wtype=fixed_misty2.
    assert rerobots_instance.wtype == "fixed_misty2"
    robot_tools(rerobots_instance)
    assert rerobots_instance.run("bin/robot-status", check=True).exit_status == 0


def test_two_robots_run_the_same_firmware(rerobots_instance, rerobots_acquire, flash,
                                           firmware):
    second = rerobots_acquire("basic_kobuki")
    assert second.id != rerobots_instance.id
    for robot in (rerobots_instance, second):
        flash(robot)
    versions = {robot.run("bin/robot-status", check=True).stdout.split()[1]
                for robot in (rerobots_instance, second)}
    assert versions == {f"fw={firmware.version}"}


def test_console_boots_the_flashed_firmware(rerobots_instance, flash, firmware):
    # The base's serial console, read live: the simulator's sandboxed robots have one at
    # /dev/ttyUSB0 (see "Live processes" in docs/writing-tests.md); real robots vary.
    if rerobots_instance.run("test -c /dev/ttyUSB0").exit_status != 0:
        pytest.skip("this robot has no serial console at /dev/ttyUSB0 (on the simulator, "
                    "robots have one in their sandbox: install bubblewrap)")
    flash(rerobots_instance)
    console = rerobots_instance.spawn("exec 3<>/dev/ttyUSB0; cat <&3 & exec cat >&3")
    # A console prompts once, to whoever reads first, and again on each newline: send one,
    # so that this test gets a prompt whichever test read the console before.
    console.sendline("")
    console.expect("kobuki> ", timeout=10)
    console.sendline("reboot")
    console.expect("Kobuki bootloader", timeout=10)
    booted = console.expect([r"firmware (\S+) booted", "panic"], timeout=10)
    assert booted.index == 0 and booted.match.group(1) == firmware.version
    console.expect("kobuki> ", timeout=10)
    console.sendline("status")
    console.expect(r"base=ok", timeout=10)


@pytest.mark.demo_failure
def test_a_corrupt_image_keeps_the_led_green(rerobots_instance, robot_tools):
    # Fails on purpose (run it with --show-a-failure): the flasher refuses an image without
    # a VERSION= line and the LED turns red. The plugin saves the robot's camera picture,
    # the red LED in it, under the artifacts directory (rerobots-artifacts/ by default).
    robot_tools(rerobots_instance)
    rerobots_instance.run("printf 'no header' > corrupt.bin; bin/flash-fw corrupt.bin")
    led = rerobots_instance.run("cat state/led 2>/dev/null || echo unknown").stdout.strip()
    assert led == "green", "the LED is not green after flashing a corrupt image"
