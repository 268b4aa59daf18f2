"""A user catalog can build on a built-in profile (issue 22, item 13): a top-level
``profile = "realistic"`` makes the file add to that profile instead of the built-in catalog."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.sim import Simulator
from pytest_rerobots.sim.catalog import default_catalog, load_catalog, profile_catalog

DOCS = Path(__file__).resolve().parent.parent / "docs" / "simulator-catalog.md"


def test_a_catalog_builds_on_the_realistic_profile(tmp_path: Path):
    lab = tmp_path / "lab.toml"
    lab.write_text('profile = "realistic"\n\n[timings]\nready_delay = [2.0, 4.0]\n\n'
                   '[types.lab_arm]\ndesc = "the lab\'s arm"\n\n'
                   '[[deployments]]\ntype = "lab_arm"\n')
    catalog = load_catalog(lab)
    realistic = profile_catalog("realistic")
    assert catalog.timings.ready_delay == (2.0, 4.0)  # the file's wins
    # The rest is the profile's, not the built-in catalog's.
    assert catalog.timings.terminate_delay == realistic.timings.terminate_delay
    assert catalog.timings.terminate_delay != default_catalog().timings.terminate_delay
    assert catalog.switches.busy_race is True
    assert catalog.faults.not_found_window == realistic.faults.not_found_window
    assert set(catalog.types) == {*realistic.types, "lab_arm"}
    assert len(catalog.deployments) == len(realistic.deployments) + 1
    with Simulator(lab, ssh_backend="none") as sim:  # and a simulator serves it
        assert sim.catalog.switches.busy_race is True


def test_without_profile_a_catalog_adds_to_the_built_in_one(tmp_path: Path):
    lab = tmp_path / "lab.toml"
    lab.write_text("[timings]\nready_delay = 0.5\n")
    catalog = load_catalog(lab)
    assert catalog.timings.terminate_delay == default_catalog().timings.terminate_delay
    assert catalog.switches.busy_race is False


@pytest.mark.parametrize(("text", "error"), [
    ('profile = "nosuch"\n', r"lab\.toml: profile: .*nosuch"),
    ("profile = 3\n", r"lab\.toml: profile: "),
    ('profile = "realistic"\nreplace_builtin = true\n',
     r"lab\.toml: profile: .*replace_builtin = true"),
])
def test_a_bad_profile_key_names_the_file_and_the_key(tmp_path: Path, text: str, error: str):
    lab = tmp_path / "lab.toml"
    lab.write_text(text)
    with pytest.raises(ConfigurationError, match=error):
        load_catalog(lab)


def test_the_docs_example_loads(tmp_path: Path):
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    example = [b for b in blocks if b.lstrip().startswith('profile = "realistic"')]
    assert len(example) == 1
    lab = tmp_path / "lab.toml"
    lab.write_text(re.sub(r"(?m)^  ", "", example[0]))
    assert load_catalog(lab).switches.busy_race is True


def test_the_plugin_runs_on_a_catalog_built_on_a_profile(pytester: pytest.Pytester):
    pytester.makefile(".toml", lab='profile = "realistic"\n\n[timings]\n'
                                   "ready_delay = 0.2\nterminate_delay = 0.1\n")
    pytester.makepyfile("""
        import pytest
        @pytest.mark.rerobots("basic_kobuki")
        def test_it(rerobots_instance, rerobots_sim):
            assert rerobots_sim.catalog.switches.busy_race is True
            assert rerobots_instance.run("echo ok").stdout == "ok\\n"
    """)
    result = pytester.runpytest_subprocess("--rerobots-sim", "--rerobots-sim-config=lab.toml",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
