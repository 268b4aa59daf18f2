"""Issue 22, item 13: prefetch rents nothing for tests that will never run (``skipif``,
``xfail(run=False)``), and a rerobots error in a fixture's setup gets a GitHub annotation
under GitHub Actions."""

from __future__ import annotations

import pytest

from pytest_rerobots.sim import Simulator


def test_prefetch_rents_nothing_for_tests_that_never_run(pytester: pytest.Pytester,
                                                        sim_env: Simulator):
    pytester.makepyfile(
        """
        import sys
        import pytest

        @pytest.mark.rerobots("basic_kobuki")
        def test_runs(rerobots_instance):
            pass

        @pytest.mark.rerobots("fixed_misty2")
        @pytest.mark.skipif(sys.platform != "nowhere", reason="never here")
        def test_skipped_by_condition(rerobots_instance):
            pass

        @pytest.mark.rerobots("fixed_misty2")
        @pytest.mark.skipif("True", reason="a string condition")
        def test_skipped_by_string(rerobots_ssh):
            pass

        @pytest.mark.rerobots("fixed_misty2")
        @pytest.mark.xfail(run=False, reason="known broken")
        def test_not_run(rerobots_instance):
            pass

        @pytest.mark.rerobots("fixed_misty2")
        @pytest.mark.skipif(False, reason="runs after all")
        @pytest.mark.xfail(reason="runs, and fails")
        def test_runs_and_fails(rerobots_instance):
            assert rerobots_instance.wtype == "basic_kobuki"
        """
    )
    before = sim_env.request_count("new")
    result = pytester.runpytest("-p", "no:randomly", "-k", "not runs_and_fails")
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    assert sim_env.request_count("new") - before == 1  # basic_kobuki's alone
    assert sim_env.live_instances() == []
    # A test that does run on the other type still gets it rented (with the rest).
    before = sim_env.request_count("new")
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=1, skipped=2, xfailed=2)
    assert sim_env.request_count("new") - before == 2
    assert sim_env.live_instances() == []


SETUP_ERRORS = """
import pytest

@pytest.mark.rerobots("no_such_type")
def test_unknown_type(rerobots_instance):
    pass

def test_plain_failure():
    assert False, "not a setup error"
"""


def test_a_rerobots_setup_error_is_annotated_under_github_actions(
        pytester: pytest.Pytester, sim_env: Simulator, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    pytester.makepyfile(test_errors=SETUP_ERRORS)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1, failed=1)
    annotations = [line for line in result.outlines if line.startswith("::error ")]
    assert len(annotations) == 1, result.stdout.str()
    line = annotations[0]
    assert line.startswith("::error file=test_errors.py,line=3,"
                           "title=rerobots%3A setup error in test_unknown_type::"), line
    assert "no_such_type" in line and "%0A" not in line.split("::", 2)[1]
    assert sim_env.live_instances() == []


def test_setup_errors_are_annotated_by_the_xdist_controller(
        pytester: pytest.Pytester, sim_env: Simulator, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("xdist")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    pytester.makepyfile(test_errors=SETUP_ERRORS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(errors=1, failed=1)
    annotations = [line for line in result.outlines if line.startswith("::error ")]
    assert len(annotations) == 1 and "test_unknown_type" in annotations[0], \
        result.stdout.str()
    assert "test_unknown_type::DeploymentNotFound: " in annotations[0]


def test_no_annotation_outside_github_actions(pytester: pytest.Pytester, sim_env: Simulator,
                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    pytester.makepyfile(test_errors=SETUP_ERRORS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1, failed=1)
    assert not [line for line in result.outlines if line.startswith("::error")]
