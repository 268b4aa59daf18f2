"""Issue 22 item 6: ``put()`` of a missing local file is one short error naming the local
path (like ``RemoteFileError`` for the remote side), a test failure, shown briefly: no
plugin or paramiko frames."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_put_of_a_missing_local_file_is_a_short_failure(pytester: pytest.Pytester, sim_env):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_flash(rerobots_instance):
            rerobots_instance.put("build/firmware.bin", "/tmp/firmware.bin")
        @pytest.mark.rerobots("basic_kobuki")
        def test_fetch(rerobots_instance, tmp_path):
            rerobots_instance.run("echo log > boot.log", check=True)
            rerobots_instance.get("boot.log", tmp_path / "no-dir" / "boot.log")
    """)
    result = pytester.runpytest("--rerobots-queue-timeout=5")
    result.assert_outcomes(failed=2)  # the test's own mistake: failures, not errors
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*LocalFileError: local path 'build/firmware.bin': no such file or directory "
        "(put build/firmware.bin -> /tmp/firmware.bin on basic_kobuki *",
        "*LocalFileError: local path '*no-dir/boot.log': no such file or directory (get *",
    ])
    assert "paramiko" not in out and "sftp_client" not in out
    assert "FileNotFoundError" not in out
    assert "infrastructure trouble" not in out
    assert "ssh.py" not in out and "instance.py" not in out


def test_put_of_a_missing_local_file_is_an_oserror_naming_the_path(fast_sim, tmp_path):
    from pytest_rerobots import LocalFileError, Run
    from pytest_rerobots.errors import is_infrastructure

    with Run(fast_sim.url, fast_sim.token, ledger=None, watchdog=False, signals=False) as run, \
            run.acquire("basic_kobuki") as robot:
        with pytest.raises(LocalFileError) as missing:
            robot.put(tmp_path / "absent.bin", "fw.bin")
        assert isinstance(missing.value, OSError) and missing.value.errno == 2
        assert missing.value.path == str(tmp_path / "absent.bin")
        assert not is_infrastructure(missing.value)
