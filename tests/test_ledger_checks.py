"""How the plugin refuses a ledger or kept directory another user could write, and warns of
a ledger's directory that others may write (issue 19, item 3); the ``kept/`` directory of
earlier versions. The attacks themselves are ``test_ledger_attacks.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import wait_until

from pytest_rerobots import RerobotsClient, keep
from pytest_rerobots.ledger import Ledger
from pytest_rerobots.sim import Simulator
from pytest_rerobots.sweep import sweep

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants files of another uid (root)")

OTHER = 65534  # nobody

SUITE = '''
import pytest
pytestmark = pytest.mark.rerobots("basic_kobuki")
def test_robot(rerobots_instance):
    assert rerobots_instance.id
'''


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o1777)
    return directory


@pytest.mark.parametrize("option", [[], ["--rerobots-reuse=1"], ["--rerobots-sweep"]])
def test_a_kept_directory_of_another_user_is_one_usage_error_and_nothing_is_rented(
        pytester: pytest.Pytester, sim_env: Simulator, shared: Path,
        monkeypatch: pytest.MonkeyPatch, option: list[str]):
    ledger = shared / "ledger.jsonl"
    kept = keep.kept_dir(ledger)
    kept.mkdir(mode=0o700)
    os.chown(kept, OTHER, OTHER)
    monkeypatch.setenv("REROBOTS_LEDGER", str(ledger))
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_subprocess(*option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if "refused" in line]
    assert errors == [f"ERROR: rerobots: refused: the kept directory {kept} is owned by uid "
                      f"{OTHER}, not by this user (uid 0); remove it (or, if it is yours, "
                      "chmod go-w it), or keep the ledger in a directory only you can write "
                      "(--rerobots-ledger, REROBOTS_LEDGER)"]
    assert sim_env.request_count("new") == 0
    assert not ledger.exists()


def test_a_world_writable_ledger_directory_is_one_warning_line(
        pytester: pytest.Pytester, sim_env: Simulator, shared: Path,
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REROBOTS_LEDGER", str(shared / "ledger.jsonl"))
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    warning = (f"rerobots: warning: the ledger's directory {shared} is writable by others "
               "(sticky): another user may plant files beside the ledger (refused if seen); "
               "a ledger in a directory of your own is safer (--rerobots-ledger)")
    assert result.stdout.lines.count(warning) == 1
    swept = pytester.runpytest_subprocess("--rerobots-sweep")
    assert swept.ret == 0
    assert swept.stdout.lines[:2] == [
        warning, f"rerobots sweep: no live instances in {shared / 'ledger.jsonl'}"]
    # A ledger of one's own directory: no warning.
    monkeypatch.delenv("REROBOTS_LEDGER")
    assert "rerobots: warning" not in pytester.runpytest_subprocess().stdout.str()


def test_the_kept_directory_of_earlier_versions_is_swept_if_it_is_ones_own(tmp_path: Path):
    with Simulator(ssh_backend="none", ready_delay=0.05, terminate_delay=0.05,
                   not_found_window=0.0) as fast_sim, \
            RerobotsClient(fast_sim.token, fast_sim.url, ignore_env=True) as api:
        ident = api.new_instance("basic_kobuki").id
        assert wait_until(lambda: api.instance(ident)["status"] == "READY", 10)
        ledger = Ledger(tmp_path / "ledger.jsonl", api_url=fast_sim.url)
        old = tmp_path / "kept"
        (old / ident).mkdir(parents=True, mode=0o700)
        old.chmod(0o700)
        (old / ident / "record.json").write_text(json.dumps(
            {"id": ident, "api_url": fast_sim.url, "token_sha256": api.token_sha256(),
             "wtype": "basic_kobuki", "kind": "failure"}))
        lines: list[str] = []
        assert sweep(api, ledger, lines.append) == 0
        assert f"rerobots sweep: {ident} (basic_kobuki) terminated" in lines
        assert not (old / ident).exists()

        # Another user's kept/ (in /tmp, say) is theirs: one line, and left alone.
        (old / "theirs").mkdir()
        os.chown(old, OTHER, OTHER)
        lines.clear()
        assert sweep(api, ledger, lines.append) == 0
        assert [line for line in lines if str(old) in line] == [
            f"rerobots sweep: {old} (of an earlier version) not read: rerobots: refused: the "
            f"kept directory {old} is owned by uid {OTHER}, not by this user (uid 0); remove it "
            "(or, if it is yours, chmod go-w it), or keep the ledger in a directory only you "
            "can write (--rerobots-ledger, REROBOTS_LEDGER)"]
        assert (old / "theirs").exists()
        assert fast_sim.live_instances() == []
