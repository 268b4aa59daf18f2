"""Catalog files add to the built-in catalog; per-deployment faults; duration ranges; profiles;
host files, commands and serial devices inside the robots' sandbox.

The format is docs/simulator-catalog.md; these tests pin what it promises.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from pytest_rerobots import RerobotsClient, acquire
from pytest_rerobots.errors import ConfigurationError
from pytest_rerobots.sim import Simulator
from pytest_rerobots.sim.catalog import default_catalog, load_catalog, profile_catalog
from pytest_rerobots.sim.hosts import SSHD
from pytest_rerobots.sim.hosts import sandbox as sandbox_module
from pytest_rerobots.sim.world import ManualClock

KOBUKI_US = "b34d1ee4-2a7b-445a-824a-ba4a30759f7f"
MISTY = "38496d28-386c-4cad-8daf-ef8a86616687"
LAB_A = "11111111-1111-4111-8111-111111111111"
LAB_B = "22222222-2222-4222-8222-222222222222"

LAB = f"""
[types.lab_arm]
desc = "an arm on a bench"

[[deployments]]
id = "{LAB_A}"
type = "lab_arm"
region = "lab"

[[deployments]]
id = "{LAB_B}"
type = "basic_kobuki"
region = "lab"

[timings]
ready_delay = 0.5

[tokens]
"lab-token" = "lab"

[faults.endpoints.qlen]
latency = 0.0
"""


def write(tmp_path: Path, text: str, name: str = "catalog.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_file_adds_to_the_builtin_catalog(tmp_path: Path) -> None:
    builtin = default_catalog()
    catalog = load_catalog(write(tmp_path, LAB))
    # Types and deployments join the built-in ones, which come first.
    assert set(catalog.types) == set(builtin.types) | {"lab_arm"}
    assert [d.id for d in catalog.deployments] == (
        [d.id for d in builtin.deployments] + [LAB_A, LAB_B])
    # Sections override key by key.
    assert catalog.timings.ready_delay == 0.5
    assert catalog.timings.terminate_delay == builtin.timings.terminate_delay
    assert catalog.faults.not_found_window == builtin.faults.not_found_window
    assert catalog.tokens["lab-token"] == "lab"
    assert set(catalog.faults.endpoints) == {"qlen"}


def test_a_file_replaces_builtin_types_and_deployments_it_names_again(tmp_path: Path) -> None:
    catalog = load_catalog(write(tmp_path, f"""
[types.basic_kobuki]
desc = "our own kobuki"

[[deployments]]
id = "{KOBUKI_US}"
type = "basic_kobuki"
region = "lab"
"""))
    assert catalog.types["basic_kobuki"].desc == "our own kobuki"
    assert catalog.types["basic_kobuki"].files == {}
    (mine,) = [d for d in catalog.deployments if d.id == KOBUKI_US]
    assert mine.region == "lab"
    assert len(catalog.deployments) == len(default_catalog().deployments)


def test_replace_builtin_starts_from_nothing(tmp_path: Path) -> None:
    catalog = load_catalog(write(tmp_path, "replace_builtin = true\n" + LAB.replace(
        'type = "basic_kobuki"', 'type = "lab_arm"')))
    assert set(catalog.types) == {"lab_arm"}
    assert [d.id for d in catalog.deployments] == [LAB_A, LAB_B]
    assert catalog.timings.ready_delay == 0.5
    # Omitted settings keep the defaults, which are the built-in catalog's.
    assert catalog.timings.terminate_delay == default_catalog().timings.terminate_delay


def test_replace_builtin_still_needs_its_own_types(tmp_path: Path) -> None:
    path = write(tmp_path, "replace_builtin = true\n" + LAB)
    with pytest.raises(ConfigurationError, match=r"deployments\[1\]\.type: no workspace type"):
        load_catalog(path)


def test_replace_builtin_is_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="replace_builtin: expected true or false"):
        load_catalog(write(tmp_path, "replace_builtin = 1\n"))


def test_the_simulator_serves_both(tmp_path: Path) -> None:
    with Simulator(write(tmp_path, LAB), ssh_backend="none") as sim:
        res = requests.get(f"{sim.url}/workspaces", timeout=5)
        assert res.json()["workspace_types"] == [
            "basic_kobuki", "fixed_crazyflie", "fixed_misty2", "lab_arm"]
        res = requests.get(f"{sim.url}/deployments/basic_kobuki", timeout=5)
        assert LAB_B in res.json()["workspace_deployments"]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def faulty(tmp_path: Path, clock: ManualClock) -> Iterator[tuple[Simulator, requests.Session]]:
    path = write(tmp_path, f"""
[types.lab_arm]

[[deployments]]
id = "{LAB_A}"
type = "lab_arm"
init_fail_rate = 1.0

[[deployments]]
id = "{LAB_B}"
type = "lab_arm"
stuck_init = true
""")
    with Simulator(path, ssh_backend="none", clock=clock, not_found_window=0) as sim:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {sim.token}"
        yield sim, session
        session.close()


def test_per_deployment_init_fail_rate_and_stuck_init(faulty: tuple[Simulator, requests.Session],
                                                      clock: ManualClock) -> None:
    sim, session = faulty

    def rent(target: str) -> str:
        res = session.post(f"{sim.url}/new/{target}", timeout=5)
        assert res.status_code == 200, res.text
        return str(res.json()["id"])

    def status(iid: str) -> str:
        return str(session.get(f"{sim.url}/instance/{iid}", timeout=5).json()["status"])

    failing, stuck, plain = rent(LAB_A), rent(LAB_B), rent(MISTY)
    clock.advance(30)
    assert (status(failing), status(stuck), status(plain)) == ("INIT_FAIL", "INIT", "READY")
    clock.advance(31)  # the server gives up on a workspace stuck in INIT
    assert status(stuck) == "INIT_FAIL"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("init_fail_rate = 2\n", "deployments[0].init_fail_rate"),
        ("stuck_init = 'often'\n", "deployments[0].stuck_init"),
    ],
)
def test_per_deployment_faults_are_checked(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, f"[[deployments]]\ntype = 'basic_kobuki'\n{text}")
    with pytest.raises(ConfigurationError) as excinfo:
        load_catalog(path)
    assert key in str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_durations_are_seconds_or_ranges(tmp_path: Path) -> None:
    catalog = load_catalog(write(tmp_path, """
[timings]
ready_delay = [1, 2.5]
terminate_delay = 4
[faults]
not_found_window = [0.0, 0.5]
"""))
    assert catalog.timings.ready_delay == (1.0, 2.5)
    assert catalog.timings.terminate_delay == 4.0
    assert catalog.faults.not_found_window == (0.0, 0.5)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[timings]\nready_delay = [2, 1]\n", "timings.ready_delay: [low, high]"),
        ("[timings]\nready_delay = [1]\n", "timings.ready_delay: expected seconds"),
        ("[timings]\nterminate_delay = ['a', 1]\n", "timings.terminate_delay[0]"),
        ("[faults]\nnot_found_window = [0, -1]\n", "faults.not_found_window[1]"),
        ("[timings]\ndeployments_cache = -1\n", "timings.deployments_cache"),
        ("[switches]\nbusy_race = 'yes'\n", "switches.busy_race"),
    ],
)
def test_bad_durations(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigurationError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_catalog(write(tmp_path, text))


def test_overrides_take_ranges_too() -> None:
    sim = Simulator(ssh_backend="none", ready_delay=(0.1, 0.2), terminate_delay=[0.0, 0.1])
    assert sim.world.timings.ready_delay == (0.1, 0.2)
    assert sim.world.timings.terminate_delay == (0.0, 0.1)
    with pytest.raises(ConfigurationError, match="ready_delay"):
        Simulator(ssh_backend="none", ready_delay=(3, 1))


def test_profiles() -> None:
    assert profile_catalog("realistic").switches.busy_race is True
    with pytest.raises(ConfigurationError, match="no built-in simulator profile 'nope'"):
        profile_catalog("nope")
    # A name that is no profile is a file name.
    with pytest.raises(ConfigurationError, match="cannot read the catalog"):
        Simulator("nope", ssh_backend="none")
    assert Simulator(Path("realistic"), ssh_backend="none").world.switches.busy_race is True


# -- host files, commands and devices in the sandbox ------------------------------------

DEVICE_LAB = """
replace_builtin = true

[types.lab_arm]
commands = ["mkdir -p /opt/arm", "bin/calibrate > /opt/arm/offsets"]

[types.lab_arm.files]
"bin/calibrate" = '''
#!/bin/sh
echo "offsets=1,2,3 host=$(hostname)"
'''
"bin/console" = '''
#!/bin/sh
printf 'ARM boot rom 2.0\\n'
while IFS= read -r line; do printf 'arm: %s\\n' "$line"; done
'''

[types.lab_arm.devices]
"/dev/ttyACM0" = "bin/console"

[[deployments]]
type = "lab_arm"
"""


def _sandboxed_backend(name: str) -> str:
    problem = sandbox_module.SandboxSetup.probe()
    if isinstance(problem, str):
        if os.environ.get("REROBOTS_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_SANDBOX=1 but this machine cannot sandbox: {problem}")
        pytest.skip(f"this machine cannot sandbox: {problem}")
    if name == "openssh" and not os.access(SSHD, os.X_OK):
        if os.environ.get("REROBOTS_REQUIRE_OPENSSH") == "1":
            pytest.fail(f"REROBOTS_REQUIRE_OPENSSH=1 but {SSHD} is missing")
        pytest.skip(f"{SSHD} is missing")
    return name


@pytest.mark.parametrize("backend", ["asyncssh", "openssh"])
def test_host_files_commands_and_devices_work_in_the_sandbox(tmp_path: Path,
                                                            backend: str) -> None:
    with Simulator(write(tmp_path, DEVICE_LAB), ssh_backend=_sandboxed_backend(backend),
                   require_sandbox=True, ready_delay=0.05, not_found_window=0) as sim:
        client = RerobotsClient(token=sim.token, api_url=sim.url)
        with acquire(client, "lab_arm") as robot:
            # The setup commands ran inside the robot: its hostname, its own /opt.
            offsets = robot.run("cat /opt/arm/offsets").stdout
            assert offsets.startswith("offsets=1,2,3 host=sim-")
            assert not Path("/opt/arm/offsets").exists() or (
                Path("/opt/arm/offsets").read_text() != offsets)
            assert robot.run("bin/calibrate").stdout == offsets
            assert robot.run("timeout 5 head -n1 /dev/ttyACM0").stdout == "ARM boot rom 2.0\n"
            reply = robot.run("exec 3<>/dev/ttyACM0; echo home >&3; timeout 5 head -n1 <&3")
            assert reply.stdout == "arm: home\n"


def test_the_default_kobuki_has_a_serial_console(tmp_path: Path) -> None:
    with Simulator(ssh_backend=_sandboxed_backend("asyncssh"), require_sandbox=True,
                   ready_delay=0.05, not_found_window=0) as sim:
        client = RerobotsClient(token=sim.token, api_url=sim.url)
        with acquire(client, "basic_kobuki") as robot:
            assert robot.run("timeout 5 head -n1 /dev/ttyUSB0").stdout == (
                "Kobuki bootloader 1.4.2\r\n")
            image = tmp_path / "fw.bin"
            image.write_text("VERSION=2.1.0\n")
            robot.put(str(image), "fw.bin")
            robot.run("bin/flash-fw fw.bin", check=True)
            # Line by line: the console answers each command, then prompts again.
            answer = robot.run("exec 3<>/dev/ttyUSB0; timeout 5 head -n1 <&3 >/dev/null;"
                               " printf 'version\\r\\n' >&3; timeout 5 head -n1 <&3")
            assert answer.stdout.endswith("2.1.0\r\n")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('"/etc/passwd" = "true"', "a device path is /dev/NAME"),
        ('"/dev/../etc/x" = "true"', "a device path is /dev/NAME"),
        ('"/dev/ttyUSB0" = 3', "types.lab_arm.devices./dev/ttyUSB0"),
    ],
)
def test_device_entries_are_checked(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, f"[types.lab_arm.devices]\n{text}\n")
    with pytest.raises(ConfigurationError, match=problem.replace(".", r"\.")):
        load_catalog(path)


def test_require_sandbox_makes_an_unsandboxable_machine_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("asyncssh")
    monkeypatch.setattr(sandbox_module, "BWRAP", str(tmp_path / "no-bwrap"))
    path = write(tmp_path, "[switches]\nrequire_sandbox = true\n")
    assert load_catalog(path).switches.require_sandbox is True
    with pytest.raises(ConfigurationError, match="cannot sandbox its robots"), Simulator(path):
        pass  # __enter__ undoes the half-made start
