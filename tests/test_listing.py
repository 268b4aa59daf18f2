"""``pytest --rerobots-list`` against the simulator, with a token and without."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pytest_rerobots import InstanceNotFound, RerobotsClient
from pytest_rerobots.listing import UNLISTED, Deployment, Listing, render
from pytest_rerobots.sim import Simulator

pytest_plugins = ["pytester"]


def catalog(sim: Simulator) -> list[tuple[str, str, str]]:
    """(type, deployment id, region) of every deployment the simulator offers, read from
    its API rather than written out here, so that the tests follow its catalog."""
    with RerobotsClient(api_url=sim.url, ignore_env=True) as api:
        info = api.deployments(info=True)["info"]
    return [(d["type"], ident, d["region"]) for ident, d in info.items()]


def listed(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makepyfile("def test_never_runs(): raise AssertionError")
    result = pytester.runpytest("--rerobots-list", *args)
    out = result.stdout.str()
    assert "test_never_runs" not in out, out
    too_wide = [line for line in result.stdout.lines if len(line) > 80]
    assert not too_wide, out
    return result


def row(wtype: str, ident: str, region: str, queue: int) -> str:
    return f"{wtype} *{ident}  {region} * {queue}"


def test_lists_types_deployments_and_queues_without_a_token(
        pytester: pytest.Pytester, fast_sim: Simulator, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REROBOTS_API_URL", fast_sim.url)
    result = listed(pytester)
    assert result.ret == 0
    deployments = catalog(fast_sim)
    types = sorted({wtype for wtype, _, _ in deployments})
    result.stdout.fnmatch_lines([
        f"rerobots: {fast_sim.url} (remote API), no token",
        "workspace types: " + ", ".join(types),
        "type * deployment * region * queue",
    ])
    in_order = sorted(deployments, key=lambda d: (d[0], d[2], d[1]))  # type, region, id
    result.stdout.fnmatch_lines([row(*d, 0) for d in in_order], consecutive=True)
    result.stdout.fnmatch_lines(["queue: 0 free*", "(read without a token*", "", UNLISTED])


def rented(api: RerobotsClient, wtype: str) -> dict[str, Any]:
    """Rent through the API alone and wait for READY: the listing needs no SSH (and this
    loads no paramiko inside the pytester test, whose teardown would unload it)."""
    ident = api.new_instance(wtype).id
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            details = api.instance(ident)
        except InstanceNotFound:  # the moments after POST /new
            details = {"status": "INIT"}
        if details["status"] == "READY":
            return details
        time.sleep(0.05)
    api.terminate(ident)
    raise AssertionError(f"{ident} not READY in 10 s")


def test_with_a_token_lists_the_users_live_instances(
        pytester: pytest.Pytester, sim_env: Simulator):
    with RerobotsClient(sim_env.token, sim_env.url, ignore_env=True) as api:
        robot = rented(api, "basic_kobuki")
        try:
            result = listed(pytester)
        finally:
            api.terminate(robot["id"])
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        f"rerobots: {sim_env.url} (remote API), token set",
        row("basic_kobuki", robot["deployment"], robot["region"], 1),
        "your live instances (1):",
        "instance * type * region * status * age",
        f"{robot['id']}  basic_kobuki  {robot['region']} * READY * *s",
    ])
    assert "read without a token" not in result.stdout.str()


def test_with_a_token_and_nothing_rented(pytester: pytest.Pytester, sim_env: Simulator):
    result = listed(pytester)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["your live instances: none"])


def test_a_wrong_token_still_lists_what_is_public_and_exits_1(
        pytester: pytest.Pytester, fast_sim: Simulator, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REROBOTS_API_URL", fast_sim.url)
    monkeypatch.setenv("REROBOTS_API_TOKEN", "not-a-token-of-this-sim")
    result = listed(pytester)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["type * deployment * region * queue",
                                 "rerobots list: cannot list your instances: GET /instances: "
                                 "wrong authorization*"])


def test_on_the_embedded_simulator(pytester: pytest.Pytester):
    result = listed(pytester, "--rerobots-sim")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["rerobots: http://127.0.0.1:* (embedded simulator), token set",
                                 "workspace types: *basic_kobuki*",
                                 "basic_kobuki * us:cali * 0",
                                 "your live instances: none"])


def test_a_run_type_that_is_not_offered_is_pointed_out(
        pytester: pytest.Pytester, sim_env: Simulator):
    pytester.makeini("[pytest]\nrerobots_wtype = basic_kobukki\n")
    result = listed(pytester)
    result.stdout.fnmatch_lines(["this run's workspace type basic_kobukki (from ini option "
                                 "rerobots_wtype) is not*"])


def test_an_unreachable_api_is_an_error_line_and_exit_1(pytester: pytest.Pytester):
    result = listed(pytester, "--rerobots-api-url=http://127.0.0.1:1")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["rerobots list: cannot list the workspace deployments: "
                                 "GET /workspaces: no answer*"])


def test_help_shows_the_option(pytester: pytest.Pytester):
    pytester.runpytest("--help").stdout.fnmatch_lines(["*--rerobots-list*"])


def test_long_names_are_cut_to_80_columns_and_ids_never():
    deployment = "f9fc8622-4085-42c4-ada5-6eee7de23139"
    instance = "7c637d21-c79b-4b6a-8ba4-8e9442b7d81b"
    wtype = "a_workspace_type_whose_name_goes_on_and_on"
    found = Listing(
        api_url="https://api.example", mode="remote API",
        wtypes=[f"{wtype}_{n}" for n in range(5)],
        deployments=[Deployment(deployment, wtype, "eu:de", 12), Deployment("d", "t", "-", None)],
        live_queues=True,
        instances=[{"id": instance, "type": wtype, "region": "eu:de", "status": "READY",
                    "starttime": "2020-05-23T02:05:20.311535Z"}],
    )
    now = 1590199520.5 + 3 * 3600 + 7 * 60  # 3h07m after the start time above
    lines = render(found, has_token=True, now=now)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    assert deployment in text and instance in text
    assert any(line.startswith("a_workspace_type_") and line.split()[0].endswith("~")
               for line in lines)
    assert any(line.rstrip().endswith(" ?") for line in lines)  # a queue the API did not give
    assert any(instance in line and line.endswith("3h07m") for line in lines)
