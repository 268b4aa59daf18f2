"""The plugin, run by pytest itself (pytester) against a simulator."""

from __future__ import annotations

import textwrap

import pytest

from pytest_rerobots import BusyWorkspaceInstance, InstanceNotFound, RerobotsClient
from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]


def test_help_lists_every_option_in_one_group(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    out = result.stdout.str()
    assert "hardware-in-the-loop tests on rerobots instances" in out
    for flag in ("--rerobots-wtype", "--rerobots-deployment", "--rerobots-api-url",
                 "--rerobots-token-file", "--rerobots-sim", "--rerobots-sim-config",
                 "--rerobots-ready-timeout", "--rerobots-queue-timeout", "--rerobots-lease",
                 "--rerobots-allow", "--rerobots-scope", "--rerobots-xdist",
                 "--rerobots-require", "--rerobots-ledger", "--rerobots-sweep"):
        assert flag in out, flag
    for ini in ("rerobots_wtype", "rerobots_api_url", "rerobots_scope", "rerobots_allow"):
        assert ini in out, ini


@pytest.mark.parametrize(
    ("args", "env", "ini", "message"),
    [
        (["--rerobots-scope=class"], {}, "", "--rerobots-scope (from command line"),
        ([], {"REROBOTS_API_URL": "not a url"}, "",
         "--rerobots-api-url (from environment variable REROBOTS_API_URL)"),
        ([], {}, "rerobots_ready_timeout = never", "(from ini option rerobots_ready_timeout)"),
        (["--rerobots-allow=999.1.1.1"], {}, "", "'999.1.1.1' is not an IPv4 address"),
    ],
)
def test_bad_values_are_usage_errors(pytester: pytest.Pytester, monkeypatch, args, env, ini,
                                     message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_no_token_skips_with_reason_and_one_summary_line(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_robot(rerobots_instance): pass
        @pytest.mark.rerobots("basic_kobuki")
        def test_robot_again(rerobots_ssh): pass
        def test_plain(): pass
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["rerobots: 2 test(s) skipped: no API token*",
                                 "SKIPPED*no rerobots API token: set REROBOTS_API_TOKEN*"])


def test_require_turns_the_skip_into_an_error(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_robot(rerobots_instance): pass
        """
    )
    result = pytester.runpytest("--rerobots-require")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no rerobots API token*--rerobots-require*"])


def test_report_header_never_shows_the_token(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    result.stdout.fnmatch_lines([f"rerobots: {sim_env.url} (remote API), token set*"])
    assert sim_env.token not in result.stdout.str() + result.stderr.str()


def test_marker_selection_rules(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("fixed_misty2")
        def test_misty_only(rerobots_instance): pass
        @pytest.mark.rerobots("basic_kobuki", "fixed_misty2")
        def test_either(rerobots_instance):
            assert rerobots_instance.wtype == "basic_kobuki"
        def test_unmarked(rerobots_instance):
            assert rerobots_instance.wtype == "basic_kobuki"
        """
    )
    result = pytester.runpytest("--rerobots-wtype=basic_kobuki", "-rs", "--strict-markers")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*test is for rerobots workspace type fixed_misty2; "
                                 "this run is for basic_kobuki*"])


def test_markers_of_modules_classes_and_parameters_select_too(pytester: pytest.Pytester):
    # Where get_closest_marker finds it: on the test, its class, its module or its
    # parameter set (each module and class is looked at once, not once per test).
    pytester.makepyfile(test_misty="""
        import pytest
        pytestmark = pytest.mark.rerobots("fixed_misty2")
        def test_module_marked(): pass
        @pytest.mark.rerobots("basic_kobuki")
        def test_own_marker_wins(): pass
    """, test_mixed="""
        import pytest
        @pytest.mark.rerobots("fixed_misty2")
        class TestMisty:
            def test_a(self): pass
            def test_b(self): pass
        class TestPlain:
            def test_c(self): pass
        MISTY = pytest.mark.rerobots("fixed_misty2")
        @pytest.mark.parametrize("n", [1, pytest.param(2, marks=MISTY)])
        def test_param(n): pass
        def test_unmarked(): pass
    """)
    result = pytester.runpytest("--rerobots-wtype=basic_kobuki", "-rs", "-p", "no:randomly")
    result.assert_outcomes(passed=4, skipped=4)
    result.stdout.fnmatch_lines(["*test_misty.py: test is for rerobots workspace type "
                                 "fixed_misty2*"])


def test_marked_test_runs_on_its_first_type_and_unmarked_errors(pytester: pytest.Pytester,
                                                                sim_env: Simulator):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("fixed_misty2", "basic_kobuki")
        def test_first_type(rerobots_instance):
            assert rerobots_instance.wtype == "fixed_misty2"
        def test_unmarked(rerobots_instance): pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*no workspace type for this test: pass --rerobots-wtype*"])


def test_bad_marker_arguments_are_usage_errors(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki", region="eu")
        def test_x(): pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR or "unknown keyword 'region'" in (
        result.stdout.str() + result.stderr.str())


@pytest.mark.parametrize(("scope", "distinct"), [("session", 1), ("module", 2), ("function", 4)])
def test_scopes(pytester: pytest.Pytester, sim_env: Simulator, scope: str, distinct: int):
    body = textwrap.dedent("""
        import pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki")
        def note(instance):
            with open("ids.txt", "a") as fh:
                print(instance.id, file=fh)
        def test_a(rerobots_instance):
            note(rerobots_instance)
        def test_b(rerobots_instance):
            note(rerobots_instance)
        """)
    pytester.makepyfile(test_one=body, test_two=body)
    result = pytester.runpytest(f"--rerobots-scope={scope}")
    result.assert_outcomes(passed=4)
    ids = (pytester.path / "ids.txt").read_text().split()
    assert len(ids) == 4 and len(set(ids)) == distinct


def test_ssh_sftp_and_client_fixtures(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki")
        def test_ssh(rerobots_ssh):
            _, out, _ = rerobots_ssh.exec_command("echo hello")
            assert out.read() == b"hello\\n"
        def test_sftp(rerobots_sftp):
            with rerobots_sftp.open("note.txt", "w") as fh:
                fh.write("hi")
            assert rerobots_sftp.stat("note.txt").st_size == 2
        def test_client(rerobots_client, rerobots_instance):
            info = rerobots_client.instance(rerobots_instance.id)
            assert info["status"] == "READY"
        """
    )
    pytester.runpytest().assert_outcomes(passed=3)


def test_acquire_rents_more_robots_and_ends_them(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(
        """
        def test_two(rerobots_acquire):
            a = rerobots_acquire("basic_kobuki")
            b = rerobots_acquire("fixed_misty2")
            assert a.run("echo a").stdout == "a\\n"
            assert b.run("echo b").stdout == "b\\n"
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)
    assert sim_env.live_instances() == []


def test_junit_properties(pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_x(rerobots_instance): pass
        """
    )
    pytester.runpytest("--junitxml=out.xml").assert_outcomes(passed=1)
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="rerobots_instance"' in xml and 'value="basic_kobuki"' in xml


def test_summary_lists_instances(pytester: pytest.Pytester, sim_env: Simulator, monkeypatch):
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_x(rerobots_instance): pass
        """
    )
    result = pytester.runpytest()
    result.stdout.fnmatch_lines(["*rerobots instances*", "*basic_kobuki*terminated*"])
    assert "| instance | type |" in summary.read_text()


# -- the lifecycle's error paths --------------------------------------------------------


def test_init_fail_is_an_error_naming_the_status(pytester: pytest.Pytester, sim_env: Simulator):
    sim_env.world.configure(init_fail_rate=1.0)
    pytester.makepyfile(
        """
        def test_x(rerobots_instance): pass
        """
    )
    result = pytester.runpytest("--rerobots-wtype=basic_kobuki")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*InstanceFailed*INIT_FAIL*"])


def test_ready_timeout_names_the_last_status(pytester: pytest.Pytester, sim_env: Simulator):
    # Stuck until init_timeout, when it becomes INIT_FAIL and teardown can end it.
    sim_env.world.configure(stuck_init=1.0, init_timeout=3.0)
    pytester.makepyfile("def test_x(rerobots_instance): pass")
    result = pytester.runpytest("--rerobots-wtype=fixed_misty2", "--rerobots-ready-timeout=0.5",
                                "--rerobots-init-retries=0")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*InstanceTimeout*not READY after 0.5 s (last status: INIT)*"])


def test_busy_with_a_zero_queue_timeout_is_an_error(pytester: pytest.Pytester,
                                                     sim_env: Simulator):
    with RerobotsClient(sim_env.token, sim_env.url) as api:
        held = api.new_instance("fixed_misty2")
        pytester.makepyfile("def test_x(rerobots_instance): pass")
        result = pytester.runpytest("--rerobots-wtype=fixed_misty2",
                                    "--rerobots-queue-timeout=0")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*BusyWorkspaceDeployment*fixed_misty2 is in use*"
                                     "--rerobots-queue-timeout S*"])
        _end(api, held.id)


def test_busy_with_queue_timeout_waits_for_the_reservation(pytester: pytest.Pytester,
                                                           sim_env: Simulator):
    sim_env.world.configure(ready_delay=0.3)
    with RerobotsClient(sim_env.token, sim_env.url) as api:
        held = api.new_instance("fixed_misty2")
        pytester.makeconftest(
            f"""
            import threading, time
            from pytest_rerobots import RerobotsClient
            def pytest_sessionstart():
                def free():
                    time.sleep(1.0)
                    RerobotsClient({sim_env.token!r}, {sim_env.url!r}).terminate({held.id!r})
                threading.Thread(target=free, daemon=True).start()
            """
        )
        pytester.makepyfile(
            """
            def test_x(rerobots_instance):
                assert rerobots_instance.timings.queued > 0.3
            """
        )
        result = pytester.runpytest("--rerobots-wtype=fixed_misty2",
                                    "--rerobots-queue-timeout=20")
        result.assert_outcomes(passed=1)


def test_queue_timeout_cancels_the_reservation(pytester: pytest.Pytester, sim_env: Simulator):
    with RerobotsClient(sim_env.token, sim_env.url) as api:
        held = api.new_instance("fixed_misty2")
        pytester.makepyfile("def test_x(rerobots_instance): pass")
        result = pytester.runpytest("--rerobots-wtype=fixed_misty2",
                                    "--rerobots-queue-timeout=0.5")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*fixed_misty2: still busy after waiting 0.5 s*"
                                     "--rerobots-queue-timeout S, now 0.5*reservation cancelled*"])
        assert api.reservations() == []
        _end(api, held.id)


def test_embedded_simulator(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_x(rerobots_instance, rerobots_sim):
            assert rerobots_sim.url.startswith("http://127.0.0.1:")
            assert rerobots_instance.run("echo ok").stdout == "ok\\n"
        """
    )
    result = pytester.runpytest("--rerobots-sim")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["rerobots: http://127.0.0.1:* (embedded simulator), token set*"])


def _end(api, ident: str) -> None:
    import time

    for _ in range(100):
        try:
            api.terminate(ident)
            return
        # Still in INIT, or not visible yet: right after POST /new the server answers 404.
        except (BusyWorkspaceInstance, InstanceNotFound):
            time.sleep(0.05)


def test_infrastructure_trouble_in_a_test_is_an_error(pytester: pytest.Pytester,
                                                      sim_env: Simulator):
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.rerobots("basic_kobuki")
        def test_host_vanishes(rerobots_instance, rerobots_client):
            rerobots_instance.ssh.close()  # as if the robot's host went away
            rerobots_instance.run("true")
        def test_firmware_command_fails(rerobots_instance):
            rerobots_instance.run("exit 3", check=True)
        """
    )
    result = pytester.runpytest("-rfE")
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(["FAILED*test_firmware_command_fails*",
                                 "ERROR*test_host_vanishes*"])


def test_token_never_appears_when_the_api_is_unreachable(pytester: pytest.Pytester,
                                                          monkeypatch: pytest.MonkeyPatch):
    secret = "tok-5f1e9a-never-print-me"
    monkeypatch.setenv("REROBOTS_API_TOKEN", secret)
    monkeypatch.setenv("REROBOTS_API_URL", "http://127.0.0.1:9")
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_x(rerobots_instance): pass
        """
    )
    result = pytester.runpytest("-l", "--junitxml=out.xml", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*TransportError*no answer from http://127.0.0.1:9*"])
    everything = result.stdout.str() + result.stderr.str() + (pytester.path / "out.xml").read_text()
    assert secret not in everything


def test_a_long_wait_shows_progress_lines(pytester: pytest.Pytester, sim_env: Simulator):
    sim_env.world.configure(ready_delay=1.6)
    pytester.makepyfile(
        """
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_x(rerobots_instance): pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    # Not a terminal: plain lines, the first after a second of waiting, then READY.
    result.stdout.fnmatch_lines(["rerobots: basic_kobuki * INIT 1s",
                                 "rerobots: basic_kobuki * READY *s"])
