"""What a failing test on a robot shows (issue 10): short reports of the package's errors,
both streams of a command, remote-file failures, the transcript, the step summary. Run
by pytest itself (pytester) against a simulator."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]

FAILING = """
    import pytest

    @pytest.mark.rerobots("basic_kobki")
    def test_unknown_type(rerobots_instance):
        rerobots_instance.run("true")

    def test_busy_robot(rerobots_acquire):
        first = rerobots_acquire("fixed_misty2")
        rerobots_acquire("fixed_misty2", queue_timeout=0)

    @pytest.mark.rerobots("basic_kobuki")
    def test_failed_command(rerobots_instance):
        rerobots_instance.run("echo flashing...; echo 'E: CRC mismatch at 0x4000' >&2; exit 3",
                              check=True)
"""


def _section(out: str, name: str) -> str:
    """The lines of the report section headed ``_ name _`` (up to the next header)."""
    match = re.search(rf"^_+ {re.escape(name)} _+$\n(.*?)(?=^[_=]{{5,}} )", out, re.S | re.M)
    assert match, f"no section {name!r} in:\n{out}"
    return match.group(1)


def test_the_package_errors_show_the_tests_frames_and_one_message(
        pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(FAILING)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1, errors=2)
    out = result.stdout.str()

    unknown = _section(out, "ERROR at setup of test_unknown_type")
    assert "valid types: basic_kobuki, " in unknown  # the closest first
    assert "fixed_misty2" in unknown and "--rerobots-wtype" in unknown
    busy = _section(out, "ERROR at call of test_busy_robot")
    assert "fixed_misty2 is in use" in busy and "--rerobots-queue-timeout" in busy
    failed = _section(out, "test_failed_command")
    assert "flashing..." in failed and "E: CRC mismatch at 0x4000" in failed
    assert "exited with status 3" in failed and "basic_kobuki " in failed
    for text, most in ((unknown, 8), (busy, 16), (failed, 24)):
        # The test's own lines and the message; none of the package's frames or code.
        assert "pytest_rerobots/" not in text and "raise " not in text, text
        assert len(text.strip().splitlines()) <= most, text
    assert "test_the_package_errors_show_the_tests_frames_and_one_message.py:" in busy

    # --full-trace shows the package's frames again.
    full = pytester.runpytest("--full-trace")
    full.assert_outcomes(failed=1, errors=2)
    assert "pytest_rerobots/instance.py" in full.stdout.str()
    assert len(full.stdout.str().splitlines()) > 2 * len(out.splitlines())


def test_a_failed_call_keeps_the_report_of_foreign_errors(pytester: pytest.Pytester,
                                                          sim_env: Simulator):
    # Only the package's errors are shortened: an assertion keeps pytest's report.
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_x(rerobots_instance):
            out = rerobots_instance.run("echo 41").stdout
            assert int(out) == 42
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert 41 == 42*"])


def test_missing_remote_file_is_a_failure_naming_the_path(pytester: pytest.Pytester,
                                                          sim_env: Simulator):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_boot_log(rerobots_instance, tmp_path):
            rerobots_instance.get("/var/log/boot-missing.log", tmp_path / "boot.log")
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E *RemoteFileError: remote path '/var/log/boot-missing.log' "
                                 "on basic_kobuki * (deployment *): no such file or directory*"])
    assert "infrastructure trouble" not in result.stdout.str()


def test_command_timeout_option_and_ini(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_hangs(rerobots_instance):
            rerobots_instance.run("echo waiting for the robot; exec sleep 30")
        @pytest.mark.rerobots("basic_kobuki")
        def test_asks_for_no_timeout(rerobots_instance):
            assert rerobots_instance.run("sleep 0.5; echo ok", timeout=None).stdout == "ok\\n"
        """
    )
    result = pytester.runpytest("--rerobots-command-timeout=0.2")
    result.assert_outcomes(passed=1, failed=1)  # a timeout is a failure, not an error
    result.stdout.fnmatch_lines(["*CommandTimeout*did not finish within 0.2 s*",
                                 "*waiting for the robot*"])
    pytester.makeini("[pytest]\nrerobots_command_timeout = 0.3\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*did not finish within 0.3 s*"])


TRANSCRIBED = """
    import os
    import pytest

    @pytest.mark.rerobots("basic_kobuki")
    def test_passes(rerobots_instance):
        rerobots_instance.run("echo hello from the robot")

    @pytest.mark.rerobots("basic_kobuki")
    def test_fails(rerobots_instance, tmp_path):
        local = tmp_path / "fw.bin"
        local.write_text("fw")
        rerobots_instance.put(local, "fw.bin")
        # A test that (wrongly) puts the token into a command: the transcript hides it.
        rerobots_instance.run("echo " + os.environ["REROBOTS_API_TOKEN"] + " >/dev/null")
        rerobots_instance.run("echo flashing; echo CRC mismatch >&2; exit 2", check=True)
"""


def test_transcript_in_the_report_with_rA_and_in_junit(pytester: pytest.Pytester,
                                                       sim_env: Simulator):
    pytester.makepyfile(TRANSCRIBED)
    result = pytester.runpytest("-rA", "--junitxml=out.xml")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert sim_env.token not in out
    failed = _section(out, "test_fails")
    assert "Captured rerobots transcript call" in failed
    lines = failed[failed.index("Captured rerobots transcript call"):].splitlines()
    kinds = [line.split(")] ")[1].split(":")[0] for line in lines
             if re.match(r"\d\d:\d\d:\d\d \[", line)]
    assert kinds == ["put", "run", "run"]
    assert re.search(r"\[basic_kobuki \w{8} \(deployment \w{8}\)\] run: echo \*\*\* >/dev/null"
                     r"  \[exit 0, \d+\.\d\d s\]", failed)
    assert "[exit 2, " in failed and "    flashing" in failed and "    CRC mismatch" in failed
    # -rA: the passed test's transcript, in its PASSED section.
    passed = _section(out, "test_passes")
    assert "run: echo hello from the robot  [exit 0, " in passed

    tree = ET.parse(pytester.path / "out.xml")  # noqa: S314 (the XML this test wrote)
    cases = {case.get("name"): case for case in tree.iter("testcase")}
    for name, expected in (("test_passes", "hello from the robot"), ("test_fails", "[exit 2, ")):
        system_out = "".join(e.text or "" for e in cases[name].iter("system-out"))
        assert expected in system_out, name
    assert sim_env.token not in (pytester.path / "out.xml").read_text()


def test_step_summary_counts_and_failed_names(pytester: pytest.Pytester, sim_env: Simulator,
                                              monkeypatch: pytest.MonkeyPatch):
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_ok(rerobots_instance): pass
        @pytest.mark.rerobots("basic_kobuki")
        def test_bad(rerobots_instance):
            rerobots_instance.run("false", check=True)
        @pytest.mark.rerobots("no_such_type")
        def test_err(rerobots_instance): pass
        @pytest.mark.skip(reason="not today")
        def test_skip(): pass
        """
    )
    pytester.runpytest().assert_outcomes(passed=1, failed=1, errors=1, skipped=1)
    text = summary.read_text()
    assert "### rerobots: 1 passed, 1 failed, 1 errors, 1 skipped" in text
    assert "- `test_step_summary_counts_and_failed_names.py::test_bad`" in text
    assert "- `test_step_summary_counts_and_failed_names.py::test_err`" in text
    assert "test_ok`" not in text
    # Then the instance table.
    assert text.index("::test_bad") < text.index("### rerobots instances")
    assert "| instance | type |" in text and sim_env.token not in text


def test_step_summary_without_a_token_says_so_and_counts_every_skip(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    # Session-scoped fixtures skip once and pytest replays the skip: every test counts.
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.parametrize("i", range(3))
        @pytest.mark.rerobots("basic_kobuki")
        def test_instance(rerobots_instance, i): pass
        @pytest.mark.parametrize("i", range(3))
        def test_client(rerobots_client, i): pass
        @pytest.mark.parametrize("i", range(2))
        def test_run(rerobots_run, i): pass
        @pytest.mark.parametrize("i", range(2))
        def test_acquire(rerobots_acquire, i): pass
        def test_plain(): pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, skipped=10)
    result.stdout.fnmatch_lines(["rerobots: 10 test(s) skipped: no API token*"])
    text = summary.read_text()
    assert "### rerobots: 1 passed, 0 failed, 0 errors, 10 skipped" in text
    no_robot = [line for line in text.splitlines() if "No robot was rented" in line]
    assert len(no_robot) == 1 and "10 test(s) were skipped" in no_robot[0]
    assert "| instance |" not in text


def test_init_fail_names_every_rental_and_its_status(pytester: pytest.Pytester,
                                                     sim_env: Simulator):
    sim_env.world.configure(init_fail_rate=1.0)
    pytester.makepyfile("def test_x(rerobots_instance): pass")
    result = pytester.runpytest("--rerobots-wtype=basic_kobuki", "--rerobots-init-retries=1")
    result.assert_outcomes(errors=1)
    text = _section(result.stdout.str(), "ERROR at setup of test_x")
    ids = re.findall(r"([0-9a-f-]{36}) \(INIT_FAIL\)", text)
    assert len(set(ids)) == 2, text  # both rentals, each with its status
    assert "--rerobots-init-retries" in text and "pytest_rerobots/" not in text


def test_under_xdist_transcripts_reach_the_report_and_junit_and_skips_count(
        pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(TRANSCRIBED)
    result = pytester.runpytest_subprocess("-n", "2", "-rA", "--junitxml=out.xml",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "run: echo hello from the robot  [exit 0, " in out and "[exit 2, " in out
    assert "pytest_rerobots/" not in _section(out, "test_fails")
    xml = ET.parse(pytester.path / "out.xml")  # noqa: S314 (the XML this test wrote)
    cases = {c.get("name"): c for c in xml.iter("testcase")}
    assert "[exit 2, " in "".join(e.text or "" for e in cases["test_fails"].iter("system-out"))
    assert sim_env.token not in out + (pytester.path / "out.xml").read_text()


def test_under_xdist_every_skip_for_want_of_a_token_counts(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.parametrize("i", range(4))
        def test_client(rerobots_client, i): pass
        @pytest.mark.parametrize("i", range(3))
        @pytest.mark.rerobots("basic_kobuki")
        def test_instance(rerobots_instance, i): pass
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=7)
    result.stdout.fnmatch_lines(["rerobots: 7 test(s) skipped: no API token*"])
